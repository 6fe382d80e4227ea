"""Loading a trained CLIP model back from a ``medvl train`` checkpoint, for evaluation or fine-tuning.

    model, config = load_checkpoint("runs/siglip")              # the run's latest checkpoint
    model, config = load_checkpoint("runs/siglip/checkpoint-60", device="cuda")

A checkpoint directory holds ``model.safetensors`` (tensors only), ``config.json`` (the model config
and the run's settings), ``tokenizer/`` (the text tower's tokenizer, so a vocabulary trained on this
machine's corpus travels with the weights) and ``state.pt`` (optimizer state, for resuming only).
Nothing is unpickled.

A run directory's ``latest`` file holds the name of its newest checkpoint, ``checkpoint-<step>``, and
nothing else: any other content (a path, ``../``) is refused rather than followed. A damaged checkpoint
(an unreadable weights file, a config.json that is not the one saved with the weights) raises a
``ValueError`` naming the file and what to do, before any model is built from it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from medvl.models.factory import create_model, create_towers

__all__ = ["load_checkpoint", "checkpoint_dir", "checkpoint_hash", "checkpoint_name", "checkpoint_step",
           "read_latest", "read_weights", "read_run_config", "CONFIG_FILE", "LATEST_FILE", "STATE_FILE",
           "WEIGHTS_FILE"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint saved after ``step`` optimiser steps."""
    return f"checkpoint-{int(step)}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name; None for any other name."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return None if match is None else int(match.group(1))


def read_latest(run_dir: Union[str, Path]) -> Path:
    """The checkpoint folder that ``run_dir/latest`` names.

    The file must hold one ``checkpoint-<step>`` name: it is written by the trainer, and a path in it
    (absolute, or with ``..``) would send a resume or an evaluation to another run's folder."""
    run_dir = Path(run_dir)
    marker = run_dir / LATEST_FILE
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{marker} does not exist: no checkpoint has been saved in {run_dir}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{marker} cannot be read ({e}); write the name of the checkpoint to use (e.g. "
                         "checkpoint-12) into it, or give that checkpoint's path") from None
    if checkpoint_step(text) is None:
        raise ValueError(f"{marker} holds {text[:200]!r}, not the name of a checkpoint-<step> folder of {run_dir}; "
                         "write the name of one (e.g. checkpoint-12) into it, or give that checkpoint's path")
    return run_dir / text


def checkpoint_dir(path: Union[str, Path], needs: Sequence[str] = (WEIGHTS_FILE, CONFIG_FILE)) -> Path:
    """The checkpoint directory ``path`` names: itself, or the one a run directory's ``latest`` points to. It
    must hold the files ``needs`` names: loading reads the weights and config.json, resuming the weights and
    state.pt."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if path.is_dir() and not (path / WEIGHTS_FILE).is_file() and (path / LATEST_FILE).is_file():
        path = read_latest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    missing = [name for name in needs if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a medvl checkpoint (missing {', '.join(missing)}); give a "
                                "checkpoint-<step> directory or the run directory of `medvl train`")
    return path


def checkpoint_hash(path: Union[str, Path]) -> str:
    """sha256 of the checkpoint's weights file (the key of evaluation caches)."""
    digest = hashlib.sha256()
    with open(checkpoint_dir(path) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_DAMAGED_HINT = ("the checkpoint is damaged (an interrupted copy or save?): use another checkpoint-<step> of the run, "
                 "or restore this one from a backup")


def _weights_header(path: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError, ...: all mean the file cannot be used
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); {_DAMAGED_HINT}") from None


def read_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's ``model.safetensors`` (``path``: the file or its folder)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a checkpoint-<step> folder of `medvl train`")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); {_DAMAGED_HINT}") from None


def read_run_config(path: Union[str, Path]) -> Dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, checked for what loading needs: a JSON object whose
    ``model_config`` holds ``embed_dim`` and the ``vision`` / ``text`` dicts."""
    file = Path(path) / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} does not exist; {_DAMAGED_HINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e}); {_DAMAGED_HINT}") from None
    problem = None
    model_config = config.get("model_config") if isinstance(config, dict) else None
    if not isinstance(config, dict):
        problem = f"a JSON {type(config).__name__}, not an object"
    elif not isinstance(model_config, dict):
        problem = "no 'model_config' object"
    else:
        missing = [k for k in ("embed_dim", "vision", "text") if k not in model_config]
        if missing:
            problem = f"'model_config' lacks {', '.join(missing)}"
        elif not all(isinstance(model_config[k], dict) for k in ("vision", "text")):
            problem = "'model_config' 'vision' and 'text' must be objects"
        elif isinstance(model_config["embed_dim"], bool) or not isinstance(model_config["embed_dim"], int) \
                or model_config["embed_dim"] < 1:
            problem = f"'model_config' 'embed_dim' is {model_config['embed_dim']!r}, not a positive integer"
    if problem is not None:
        raise ValueError(f"{file}: {problem}; it is not the config.json that `medvl train` saves: {_DAMAGED_HINT}")
    return config


def _check_config_matches_weights(path: Path, model_config: Mapping[str, Any], shapes: Mapping[str, Tuple[int, ...]],
                                  tokenizer: Any) -> None:
    """Build the towers that config.json describes on the meta device (no memory) and compare their
    tensor shapes with the weights file's header, so an edited config.json cannot make loading allocate
    what the weights do not hold (one edit asked for 422 TB). The text tower is compared when its size
    comes from config.json (the tiny BERT); a pretrained one's size comes from its own files."""
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    tiny_text = model_config["text"].get("model", "tiny") == "tiny"
    try:
        with torch.device("meta"):
            visual, text = create_towers(model_config, tokenizer=tokenizer, text=tiny_text)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{config_file}: its model_config does not describe a model that fits the weights in "
                         f"{weights_file} ({type(e).__name__}: {e}); the config was edited or belongs to other "
                         "weights; restore the config.json saved with these weights") from None
    expected = {f"model.visual.{k}": tuple(v.shape) for k, v in visual.state_dict().items()}
    if text is not None:
        expected.update({f"model.text.{k}": tuple(v.shape) for k, v in text.state_dict().items()})
    differences = []
    for name, shape in expected.items():
        stored = shapes.get(name)
        if stored != shape:
            differences.append(f"{name[len('model.'):]}: config {shape}, weights "
                               f"{'absent' if stored is None else stored}")
    if differences:
        raise ValueError(f"{config_file} does not describe the weights in {weights_file} ("
                         + "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
                         + "): the config was edited or belongs to other weights; restore the config.json saved "
                           "with these weights")


def load_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[Any, Dict[str, Any]]:
    """(CLIPModel in eval mode on ``device``, the run config saved with it)."""
    path = checkpoint_dir(path)
    config = read_run_config(path)
    model_config = config["model_config"]
    shapes = _weights_header(path / WEIGHTS_FILE)
    tokenizer = None
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    _check_config_matches_weights(path, model_config, shapes, tokenizer)
    model = create_model(model_config, tokenizer=tokenizer)
    tensors = read_weights(path)
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as e:
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit the model of {path / CONFIG_FILE}: {e}; "
                         f"{_DAMAGED_HINT}") from None
    return model.to(device).eval(), config
