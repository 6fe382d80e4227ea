"""CLIPModel: a 3D volume tower and a text tower projected into one space, with SigLIP's logit scale and bias.

Called as open_clip's models are: ``model(volume, text)`` returns a dict with ``image_features``,
``text_features`` (L2-normalised), ``logit_scale`` (the multiplier, already exponentiated) and
``logit_bias``, which ``medvl.nn.SigLIPLoss`` takes as they are.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from medvl.models.text_encoder import TextEncoder
from medvl.models.volume_encoder import VolumeEncoder


class CLIPModel(torch.nn.Module):
    """Volume and text towers; SigLIP initialisation of the logit scale (10) and bias (-10), both learnable.

    Example:
        >>> model = medvl.models.create_model("vit3d-tiny")
        >>> out = model(torch.randint(-1024, 2000, (2, 1, 64, 64, 32), dtype=torch.int16), ["no effusion", "a nodule"])
        >>> loss = medvl.nn.SigLIPLoss()(out["image_features"], out["text_features"], out["logit_scale"],
        ...                              out["logit_bias"])
    """

    def __init__(self, visual: VolumeEncoder, text: TextEncoder, *, init_logit_scale: float = 10.0,
                 init_logit_bias: float = -10.0):
        super().__init__()
        if visual.proj.out_features != text.proj.out_features:
            raise ValueError(f"the towers project to different sizes: volume {visual.proj.out_features}, "
                             f"text {text.proj.out_features}")
        self.visual, self.text = visual, text
        # Learned in log space (exp keeps it positive), as SigLIP and open_clip do.
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_logit_bias)))

    @property
    def embed_dim(self) -> int:
        return self.visual.proj.out_features

    def encode_volume(self, volume: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual(volume)["embedding"]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Union[Sequence[str], Dict[str, torch.Tensor]], normalize: bool = True, *,
                    kind: str = "text") -> torch.Tensor:
        """Text features of ``kind`` ("text": paired with volumes; "prompt", "snippet": see ``TEXT_KINDS``)."""
        features = self.text(text, kind=kind)["embedding"]
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def standardizes(self) -> bool:
        """Whether both towers standardise their projected embeddings (:mod:`medvl.nn.standardize`)."""
        return self.visual.standardizer is not None and self.text.standardizer is not None

    def forward(self, volume: Optional[torch.Tensor] = None,
                text: Union[Sequence[str], Dict[str, torch.Tensor], None] = None, *,
                extra_texts: Optional[Mapping[str, Sequence[str]]] = None,
                return_depth: bool = False) -> Dict[str, torch.Tensor]:
        """``image_features`` / ``text_features`` (normalised), ``logit_scale`` (exp'd), ``logit_bias``.

        ``extra_texts``: name -> strings encoded by the text tower in the same call (so that
        DistributedDataParallel sees one forward), returned normalised as ``<name>_features``; the
        trainer passes disease prompts and report snippets this way. A name is the texts' kind
        (``medvl.models.text_encoder.TEXT_KINDS``: "prompt", "snippet"), whose statistics standardise them. ``return_depth`` adds the volume
        tower's ``volume_embeddings`` (pooled, before the projection) and ``depth_features``
        (B, n_z, width): what RadFinder's prompt and localization terms read.

        When the towers standardise (:attr:`standardizes`), the features use the stored statistics, and
        ``image_embeddings``, ``text_embeddings`` and ``<name>_embeddings`` hold the projections before any
        standardisation: what the training losses standardise with the statistics of the batch they see
        (``medvl.train.recipes.RecipeLoss``).
        """
        out = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        raw = self.standardizes
        if volume is not None:
            visual = self.visual(volume, return_depth=return_depth)
            out["image_features"] = F.normalize(visual["embedding"], dim=-1)
            if raw:
                out["image_embeddings"] = visual["projected"]
            if return_depth:
                out["volume_embeddings"], out["depth_features"] = visual["pooled"], visual["depth"]
        texts = {} if text is None else {"text": text}
        texts.update({name: list(t) for name, t in (extra_texts or {}).items() if t})
        for name, value in texts.items():
            encoded = self.text(value, kind=name)
            out[f"{name}_features"] = F.normalize(encoded["embedding"], dim=-1)
            if raw:
                out[f"{name}_embeddings"] = encoded["projected"]
        return out

    def no_weight_decay(self) -> set:
        """Parameter names that take no weight decay: norms, biases, embeddings, logit scale and bias."""
        names = {"logit_scale", "logit_bias"}
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names
