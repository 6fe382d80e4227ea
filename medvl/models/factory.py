"""Model configs as files (medvl/models/configs/<name>.json), ``create_model`` and ``list_models``, as open_clip does."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Union

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


def model_config(model: Union[str, Mapping[str, Any]], **overrides) -> Dict[str, Any]:
    """The config of ``model`` (a packaged config's name, or a whole config such as a checkpoint's
    ``model_config``) with ``overrides`` applied: top-level keys replace, and the ``vision`` / ``text`` dicts
    are merged key by key (``create_model("vit3d-tiny", vision={"depth": 4})``)."""
    if isinstance(model, str):
        configs = _configs()
        look_up_option(model, list_models(), name="model")
        model = configs[model]
    config = copy.deepcopy(dict(model))
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


def create_towers(config: Mapping[str, Any], *, tokenizer: Any = None, text: bool = True):
    """(VolumeEncoder, TextEncoder) of a whole model config (what :func:`model_config` returns); the text
    tower is None with ``text=False``, and takes ``tokenizer`` instead of its own when one is given."""
    from medvl.models.text_encoder import TextEncoder
    from medvl.models.volume_encoder import VolumeEncoder

    vision = {k: tuple(v) if isinstance(v, list) else v for k, v in config["vision"].items()}
    visual = VolumeEncoder(output_dim=config["embed_dim"], **vision)
    if not text:
        return visual, None
    return visual, TextEncoder(output_dim=config["embed_dim"], tokenizer=tokenizer, **config["text"])


def create_model(model: Union[str, Mapping[str, Any]] = "vit3d-tiny", *, tokenizer: Any = None, **overrides):
    """A CLIPModel from a packaged config (see ``list_models()``) or a whole config (a checkpoint's
    ``model_config``: :func:`medvl.models.load_checkpoint` builds through here), with optional overrides
    (:func:`model_config`); ``tokenizer`` replaces the text tower's own (a checkpoint's saved one)."""
    from medvl.models.clip import CLIPModel

    config = model_config(model, **overrides)
    visual, text = create_towers(config, tokenizer=tokenizer)
    scale = {k: config[k] for k in ("init_logit_scale", "init_logit_bias") if k in config}
    return CLIPModel(visual, text, **scale)
