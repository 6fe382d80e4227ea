"""Model configs as files (medvl/models/configs/<name>.json), ``create_model`` and ``list_models``, as open_clip does."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

from medvl.data.transforms import CT_WINDOW
from medvl.options import look_up_option

CONFIG_DIR = Path(__file__).with_name("configs")
_SECTIONS = ("vision", "text")


@lru_cache(maxsize=None)
def _configs() -> Dict[str, Dict[str, Any]]:
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(CONFIG_DIR.glob("*.json"))}
    for config in configs.values():
        # a config that names no window reads CT through the data layer's; the model config written with
        # a checkpoint names it, so the checkpoint does not depend on this default
        config["vision"].setdefault("window", list(CT_WINDOW))
    return configs


def list_models() -> List[str]:
    """Names of the packaged model configs."""
    return sorted(_configs())


def model_config(name: str, **overrides) -> Dict[str, Any]:
    """The config of `name` with `overrides` applied: top-level keys replace, and the `vision` / `text`
    dicts are merged key by key (``create_model("vit3d-tiny", vision={"depth": 4})``)."""
    configs = _configs()
    look_up_option(name, list_models(), name="model")
    config = copy.deepcopy(configs[name])
    for key, value in overrides.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise TypeError(f"override {key!r} must be a dict of {key} tower arguments, got {type(value).__name__}")
            config[key].update(value)
        elif key in ("embed_dim", "init_logit_scale", "init_logit_bias"):
            config[key] = value
        else:
            raise ValueError(f"unknown override {key!r}: use embed_dim, init_logit_scale, init_logit_bias, "
                             "vision={...} or text={...}")
    return config


def create_model(name: str = "vit3d-tiny", **overrides):
    """A CLIPModel from a packaged config (see ``list_models()``), with optional overrides."""
    from medvl.models.clip import CLIPModel
    from medvl.models.text_encoder import TextEncoder
    from medvl.models.volume_encoder import VolumeEncoder

    config = model_config(name, **overrides)
    vision = {k: tuple(v) if isinstance(v, list) else v for k, v in config["vision"].items()}
    visual = VolumeEncoder(output_dim=config["embed_dim"], **vision)
    text = TextEncoder(output_dim=config["embed_dim"], **config["text"])
    scale = {k: config[k] for k in ("init_logit_scale", "init_logit_bias") if k in config}
    return CLIPModel(visual, text, **scale)
