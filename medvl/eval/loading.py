"""The model under evaluation, as :func:`~medvl.eval.evaluation.evaluate` and :func:`~medvl.eval.qc.qc_dicom`
take it: a checkpoint (or run) folder of ``medvl train`` or an in-memory ``(model, run_config)`` pair, with
RadFinder's prompt head, the device it runs on, and the volume size it accepts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch

from medvl.eval.cache import _fold, head_tensors, model_fingerprint
from medvl.options import look_up_option, parse_size

__all__ = ["check_device", "check_size", "device_of", "load_model", "prompt_head_of"]


def prompt_head_of(checkpoint: Path) -> Optional[torch.nn.Linear]:
    """RadFinder's prompt head of a checkpoint, with the stored standardisation of its output folded in as a
    bias (when the checkpoint has one); None without a head."""
    from safetensors import safe_open

    from medvl.nn.standardize import FeatureStandardizer

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        if "loss.prompts.head.weight" not in keys:
            return None
        weight = f.get_tensor("loss.prompts.head.weight").float()
        prefix = "loss.prompt_standardizer."
        standardizer = None
        if f"{prefix}mean" in keys:
            standardizer = FeatureStandardizer(weight.shape[0])
            standardizer.load_state_dict({k: f.get_tensor(prefix + k) for k in ("mean", "var", "num_samples")})
    weight, bias = _fold(weight, standardizer)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device: the CPU, or a CUDA GPU that is there."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available here; use device='cpu'")
    look_up_option(device.type, ("cpu", "cuda"), name="device")
    return device


def load_model(checkpoint_or_model, device, prompt_head):
    """(model, run_config, prompt head weight or None, model key, checkpoint dir or None). The key of an
    in-memory model is the fingerprint of its weights and head."""
    from medvl.models.checkpoint import checkpoint_dir, checkpoint_hash, load_checkpoint

    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        path = checkpoint_dir(checkpoint_or_model)
        model, run_config = load_checkpoint(path, device)
        head = prompt_head_of(path) if prompt_head is None else prompt_head
        return model, run_config, head, checkpoint_hash(path), path
    if isinstance(checkpoint_or_model, (tuple, list)) and len(checkpoint_or_model) == 2:
        model, run_config = checkpoint_or_model
        if not isinstance(run_config, Mapping):
            raise TypeError(f"checkpoint_or_model: the second item must be the run config dict, got "
                            f"{type(run_config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"checkpoint_or_model: the first item must be the CLIPModel, got {type(model).__name__}")
        return model, dict(run_config), prompt_head, model_fingerprint(model, head_tensors(prompt_head)), None
    raise TypeError("checkpoint_or_model: expected a checkpoint path (a checkpoint-<step> or run directory of "
                    f"`medvl train`) or a (model, run_config) pair, got {type(checkpoint_or_model).__name__}")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def check_size(size, run_config: Mapping[str, Any], patch_size: Sequence[int],
               log: Callable[[str], None]) -> Tuple[int, int, int]:
    """The (X, Y, Z) volume size to evaluate at: ``size``, or the training size when None; a multiple of the
    patch size (another size than the training one resamples the position table, which ``log`` says)."""
    trained = run_config.get("size")
    if size is None:
        if trained is None:
            raise ValueError("size: the run config has no 'size'; pass size=(X, Y, Z)")
        size = trained
    size = parse_size(size)
    bad = [f"{axis} {s} (patch {p})" for axis, s, p in zip("XYZ", size, patch_size) if s < p or s % p]
    if bad:
        raise ValueError(f"size {size} does not fit the checkpoint's patch size {tuple(patch_size)}: "
                         f"{', '.join(bad)} is not a multiple of the patch; the checkpoint was trained at "
                         f"{tuple(trained) if trained else '?'}; use that size or another multiple of the patch")
    if trained is not None and tuple(size) != tuple(int(s) for s in trained):
        log(f"size {size} differs from the training size {tuple(trained)}: the position table is resampled")
    return size
