"""The run folder of ``medvl train`` on disk: checkpoints written whole or not at all, ``latest``, the training
state read back for a resume, and what a run may do to a folder that already holds one.

Layout of ``out``::

    metrics.jsonl                       one JSON object per optimiser step: step, loss, lr, volumes_per_s,
                                        peak_memory_mib and every loss term (averaged over the ranks)
    loss.png                            the loss curve, at the end
    tensorboard/                        scalars, when TensorBoard is installed
    profile/trace.json                  with --profile: a Chrome trace of a few steps
    checkpoint-<step>/model.safetensors "model.<name>" and "loss.<name>" tensors
    checkpoint-<step>/state.pt          optimizer, scheduler, step, data position, RNG states
                                        (loadable with torch.load(weights_only=True))
    checkpoint-<step>/config.json       the model config and the run's settings (what medvl eval reads)
    checkpoint-<step>/tokenizer/        the text tower's tokenizer (medvl.models.load_checkpoint)
    latest                              the name of the newest checkpoint directory

A checkpoint is written into a hidden folder of ``out`` and renamed into place (``os.replace``) once
complete, and ``latest`` is replaced (also by a rename) only after that, so a run killed while saving
leaves every earlier checkpoint and a ``latest`` that names a complete one. A new run into an ``out``
that holds a run (metrics.jsonl, latest or a checkpoint) is refused unless ``resume`` continues it or
``overwrite`` discards it first.

Resuming a checkpoint of ``out`` itself cuts ``metrics.jsonl`` back to its step (the steps after it are trained
again) and points ``latest`` at it; checkpoints after that step must be discarded with ``overwrite``. A
checkpoint from elsewhere starts a fresh ``metrics.jsonl`` in an ``out`` that holds no run (or is overwritten).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from medvl.models.checkpoint import (CONFIG_FILE, LATEST_FILE, STATE_FILE, WEIGHTS_FILE, checkpoint_name,
                                     checkpoint_step, read_weights)

__all__ = ["METRICS_FILE", "RunFolderPlan", "apply_run_folder_plan", "load_checkpoint_weights", "load_training_state",
           "plan_run_folder", "restore_checkpoint", "save_checkpoint"]

METRICS_FILE = "metrics.jsonl"
_PARTIAL = ".partial-"  # the infix of a checkpoint folder still being written


# ----------------------------------------------------------------------------------------------------------
# RNG state as tensors / plain containers (torch.load(weights_only=True) can read it)


def _rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# checkpoints


_STATE_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch", "rng")


def load_training_state(path) -> Dict[str, Any]:
    """The ``state.pt`` of a checkpoint (``torch.load(weights_only=True)``), checked for what resuming reads."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle that is not weights-only, ...: the file cannot be used
        raise ValueError(f"{file}: cannot be read ({type(e).__name__}: {str(e)[:300]}); the checkpoint is damaged (an "
                         "interrupted copy?): resume from another checkpoint-<step> of the run") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not all(isinstance(state[k], int) and state[k] >= 0 for k in ("step", "epoch", "batch")):
        raise ValueError(f"{file}: not the training state `medvl train` saves (missing or invalid: "
                         f"{', '.join(missing) or 'step/epoch/batch'}); resume from another checkpoint-<step>")
    return state


def restore_checkpoint(checkpoint: Path, state: Mapping[str, Any], model, loss_fn, optimizer, scheduler) -> None:
    """Load a checkpoint (its ``state``: :func:`load_training_state`) into a run's objects; a checkpoint of other
    settings is named, with its settings."""
    try:
        load_checkpoint_weights(checkpoint, model, loss_fn)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(checkpoint)):
            raise  # read_weights already named the damaged file
        try:
            saved = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
            settings = ", ".join(f"{k} {saved[k]}" for k in ("recipe", "model", "size", "world_size") if k in saved)
        except (OSError, ValueError):
            settings = f"unknown: {checkpoint / CONFIG_FILE} is unreadable"
        raise ValueError(f"{checkpoint} does not fit this run ({type(e).__name__}: {str(e)[:300]}); resume it with "
                         f"the settings it was trained with ({settings}, and the same patch size and loss weights), "
                         "or start a new run") from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_folder(staging: Path, final: Path) -> None:
    """Move a complete ``staging`` folder to ``final``. A rename cannot replace a non-empty folder, so an
    existing ``final`` is first renamed aside and removed once the new one is in place."""
    if not final.exists():
        os.replace(staging, final)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, aside / final.name)
    os.replace(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def _write_latest(out: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{LATEST_FILE}-", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / LATEST_FILE)


def save_checkpoint(out: Path, step: int, model, loss_fn, optimizer, scheduler, position,
                    run_config: Mapping[str, Any]) -> Path:
    """Write the checkpoint of ``step`` into a hidden folder of ``out``, flush it to disk, rename it to
    ``checkpoint-<step>`` and only then point ``latest`` at it: an interrupted save leaves the previous
    checkpoints and ``latest`` as they were (and a ``.checkpoint-*.partial-*`` folder, removed by the next run)."""
    from safetensors.torch import save_file

    final = out / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{_PARTIAL}", dir=out))
    try:
        tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        tensors.update({f"loss.{k}": v.detach().cpu().contiguous().clone() for k, v in loss_fn.state_dict().items()})
        save_file(tensors, str(staging / WEIGHTS_FILE))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": int(step),
                 "epoch": int(position["epoch"]), "batch": int(position["batch"]), "rng": _rng_state()}
        torch.save(state, staging / STATE_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps({**run_config, "step": int(step)}, indent=2, default=str) + "\n")
        tokenizer = getattr(getattr(model, "text", None), "tokenizer", None)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(staging / "tokenizer"))
        # on disk before the rename makes them the checkpoint: a crash of the machine must not leave a
        # renamed folder of empty files
        for file in staging.rglob("*"):
            if file.is_file():
                _fsync(file)
        _replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync(out)
    _write_latest(out, final.name)
    return final


def load_checkpoint_weights(path, model, loss_fn=None, *, strict: bool = True) -> None:
    """Load ``path/model.safetensors`` (or the file itself) into ``model`` (and ``loss_fn``)."""
    tensors = read_weights(path)
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd, strict=strict)
    if loss_fn is not None:
        loss_sd = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
        loss_fn.load_state_dict(loss_sd, strict=strict)


# ----------------------------------------------------------------------------------------------------------
# the run folder

# What a run leaves in its folder, beside the checkpoint-<step> folders and latest (what --overwrite removes).
_RUN_FILES = (METRICS_FILE, "loss.png", "tensorboard", "profile")


@dataclass
class RunFolderPlan:
    """What to do to ``out`` before the first step: decided (and refused) before anything is built, done
    only when the run is about to start, so a run that fails to start changes nothing."""

    out: Path
    discard: List[Path]            # removed (overwrite)
    keep_metrics_to: Optional[int]  # resuming a checkpoint of out: metrics.jsonl cut back to this step
    latest: Optional[str]          # the name latest is set to (that checkpoint)


def _checkpoints_in(out: Path) -> Dict[int, Path]:
    found = {}
    if out.is_dir():
        for entry in out.iterdir():
            step = checkpoint_step(entry.name)
            if step is not None and entry.is_dir():
                found[step] = entry
    return found


def _run_contents(out: Path) -> List[Path]:
    if not out.is_dir():
        return []
    names = [out / n for n in (METRICS_FILE, LATEST_FILE) if (out / n).exists()]
    return names + [path for _, path in sorted(_checkpoints_in(out).items())]


def plan_run_folder(out: Path, checkpoint: Optional[Path], resumed_step: Optional[int],
                    overwrite: bool, via_latest: bool = False) -> RunFolderPlan:
    """Refuse a run that would mix with the run already in ``out``; otherwise say what to change."""
    held = _run_contents(out)
    shown = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
    whole_run = [p for p in held] + [out / n for n in _RUN_FILES if (out / n).exists() and out / n not in held]
    if checkpoint is None:
        if held and not overwrite:
            raise ValueError(f"out {out} already holds a run ({shown}); continue it with --resume latest "
                             "(resume='latest'), discard it with --overwrite, or give another --out")
        return RunFolderPlan(out, whole_run if overwrite else [], None, None)
    inside = out.is_dir() and checkpoint.resolve().parent == out.resolve()
    if not inside:
        if held and not overwrite:
            raise ValueError(f"out {out} already holds a run ({shown}) and the checkpoint {checkpoint} is not one of "
                             "its own; resume into an empty --out, or discard that run with --overwrite")
        return RunFolderPlan(out, whole_run if overwrite else [], None, None)
    later = [path for step, path in sorted(_checkpoints_in(out).items()) if step > resumed_step]
    if later and not overwrite and via_latest:
        raise ValueError(f"out {out} holds checkpoint(s) after the one latest names ({checkpoint.name}): "
                         f"{', '.join(p.name for p in later)}, complete but saved by a run stopped before it updated "
                         f"latest; resume the newest with --resume {later[-1]}, or discard them with --overwrite")
    if later and not overwrite:
        raise ValueError(f"out {out} holds checkpoint(s) after the resumed step {resumed_step} "
                         f"({', '.join(p.name for p in later)}): resuming {checkpoint.name} would mix two histories; "
                         "resume from latest, or discard the later checkpoints with --overwrite")
    return RunFolderPlan(out, later, resumed_step, checkpoint.name)


def _cut_metrics(path: Path, last_step: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``last_step`` (steps after it are trained again); a line cut
    short by a kill is dropped. Rewritten through a renamed temporary file. Returns the rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and int(row["step"]) <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return dropped


def apply_run_folder_plan(plan: RunFolderPlan, log) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    for stale in plan.out.glob(f".checkpoint-*{_PARTIAL}*"):
        log(f"removing {stale}, left by a save that was interrupted")
        shutil.rmtree(stale, ignore_errors=True)
    if plan.discard:
        log(f"overwrite: removing {', '.join(p.name for p in plan.discard)} from {plan.out}")
    for path in plan.discard:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if plan.keep_metrics_to is not None:
        dropped = _cut_metrics(plan.out / METRICS_FILE, plan.keep_metrics_to)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} row(s) after step {plan.keep_metrics_to}, which are trained again")
    if plan.latest is not None:
        _write_latest(plan.out, plan.latest)
