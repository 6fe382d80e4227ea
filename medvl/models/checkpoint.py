"""Loading a trained CLIP model back from a ``medvl train`` checkpoint, for evaluation or fine-tuning.

    model, config = load_checkpoint("runs/siglip")              # the run's latest checkpoint
    model, config = load_checkpoint("runs/siglip/checkpoint-60", device="cuda")

A checkpoint directory holds ``model.safetensors`` (tensors only), ``config.json`` (the model config
and the run's settings), ``tokenizer/`` (the text tower's tokenizer, so a vocabulary trained on this
machine's corpus travels with the weights) and ``state.pt`` (optimizer state, for resuming only).
Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

__all__ = ["load_checkpoint", "checkpoint_dir", "checkpoint_hash"]


def checkpoint_dir(path: Union[str, Path]) -> Path:
    """The checkpoint directory ``path`` names: itself, or the one a run directory's ``latest`` points to."""
    path = Path(path)
    if path.is_file() and path.name == "model.safetensors":
        path = path.parent
    if path.is_dir() and not (path / "model.safetensors").is_file() and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    missing = [name for name in ("model.safetensors", "config.json") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a medvl checkpoint (missing {', '.join(missing)}); give a "
                                "checkpoint-<step> directory or the run directory of `medvl train`")
    return path


def checkpoint_hash(path: Union[str, Path]) -> str:
    """sha256 of the checkpoint's weights file (the key of evaluation caches)."""
    digest = hashlib.sha256()
    with open(checkpoint_dir(path) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """(CLIPModel in eval mode on ``device``, the run config saved with it)."""
    from safetensors.torch import load_file

    from medvl.models.clip import CLIPModel
    from medvl.models.text_encoder import TextEncoder
    from medvl.models.volume_encoder import VolumeEncoder

    path = checkpoint_dir(path)
    config = json.loads((path / "config.json").read_text())
    model_config = config["model_config"]
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    vision = {k: tuple(v) if isinstance(v, list) else v for k, v in model_config["vision"].items()}
    visual = VolumeEncoder(output_dim=model_config["embed_dim"], **vision)
    text = TextEncoder(output_dim=model_config["embed_dim"], tokenizer=tokenizer, **model_config["text"])
    scale = {k: model_config[k] for k in ("init_logit_scale", "init_logit_bias") if k in model_config}
    model = CLIPModel(visual, text, **scale)
    tensors = load_file(str(path / "model.safetensors"))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.to(device).eval(), config
