"""A single-process trainer for the recipes: AdamW + cosine schedule with warmup, gradient clipping,
gradient accumulation (open_clip's ``accum_freq``), JSONL metrics, and exactly resumable checkpoints.

    from medvl.train.trainer import TrainConfig, train
    final = train(TrainConfig(recipe="siglip", steps=60, batch_size=8, out="runs/siglip"))

Only the contrastive part of a recipe is trained: the "siglip" recipe's "prompts" and "localization"
terms need model outputs (prompt embeddings, per-depth features, snippets) that the trainer does not
produce, so their weights default to 0 (``TrainConfig.loss_weights`` overrides).

Layout of ``out``::

    metrics.jsonl                       one JSON object per optimiser step: step, loss, lr, volumes_per_s,
                                        and every loss term
    checkpoint-<step>/model.safetensors "model.<name>" and "loss.<name>" tensors
    checkpoint-<step>/state.pt          optimizer, scheduler, step, data position, RNG states
                                        (loadable with torch.load(weights_only=True))
    latest                              the name of the newest checkpoint directory

Resuming (``resume="latest"`` or a checkpoint path) restores the model, loss module, optimizer,
scheduler, RNG states and the data position: the order of the samples is a deterministic function of
(seed, epoch), and the trainer starts the current epoch at the first batch not yet consumed, so N steps
+ resume + N steps gives the same parameters as 2N uninterrupted steps (on CPU).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from medvl.data import collate
from medvl.train.data import parse_size, synthetic_dataset
from medvl.train.recipes import create_loss, get_recipe

__all__ = ["TrainConfig", "train", "load_checkpoint_weights", "resolve_checkpoint", "DEFAULT_LOSS_WEIGHTS"]

# Terms the trainer cannot feed (see the module docstring), switched off unless loss_weights says otherwise.
DEFAULT_LOSS_WEIGHTS: Dict[str, Dict[str, float]] = {"siglip": {"prompts": 0.0, "localization": 0.0}}


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take the recipe's value (``lr``, ``weight_decay``,
    ``model``, ``data``); ``warmup_steps=None`` takes ``min(recipe.warmup_steps, steps // 10)``.

    data: "synthetic-ct" | "synthetic-mr"; n_train phantoms of ``size`` (X, Y, Z), which also sets the
    model's ``vision.img_size``. vision: extra overrides of the model's vision tower (e.g. patch_size).
    checkpoint_every: also save every that many steps (0: only at the end).
    """

    recipe: str = "siglip"
    model: Optional[str] = None
    data: Optional[str] = None
    steps: int = 60
    batch_size: int = 8
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_steps: Optional[int] = None
    accum_steps: int = 1
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    out: str = "runs/siglip"
    device: str = "cpu"
    resume: Optional[str] = None
    log_every: int = 10
    n_train: int = 256
    size: Any = (64, 64, 32)
    vision: Dict[str, Any] = field(default_factory=dict)
    loss_weights: Optional[Dict[str, float]] = None
    checkpoint_every: int = 0
    log_fn: Any = None  # callable(str) for progress lines; None: silent

    def validate(self) -> None:
        for key in ("steps", "batch_size", "accum_steps", "log_every", "n_train"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0, got {self.checkpoint_every!r}")
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.warmup_steps is not None and (int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.data is not None and self.data not in ("synthetic-ct", "synthetic-mr"):
            raise ValueError(f"data must be 'synthetic-ct' or 'synthetic-mr', got {self.data!r}")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        parse_size(self.size)
        need = self.batch_size
        if self.n_train < need:
            raise ValueError(f"n_train ({self.n_train}) must be at least batch_size ({self.batch_size}): "
                             "the loader drops incomplete batches")


# ----------------------------------------------------------------------------------------------------------
# data order


def _epoch_permutation(n: int, seed: int, epoch: int) -> List[int]:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2 ** 63))
    return torch.randperm(n, generator=g).tolist()


class _EpochSampler(Sampler):
    """The seeded permutation of one epoch, from sample position ``start`` on."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.indices = _epoch_permutation(n, seed, epoch)[start:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _batches(dataset, batch_size: int, seed: int, position: Dict[str, int]) -> Iterator[Dict[str, Any]]:
    """Micro-batches forever; ``position`` ({"epoch", "batch"}) is updated as batches are handed out."""
    per_epoch = len(dataset) // batch_size
    while True:
        sampler = _EpochSampler(len(dataset), seed, position["epoch"], position["batch"] * batch_size)
        # a private generator: creating the iterator must not draw from the global RNG (dropout uses it),
        # or a resumed run would see different random numbers than an uninterrupted one
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=collate,
                            drop_last=True, generator=torch.Generator().manual_seed(int(seed)))
        for batch in loader:
            position["batch"] += 1
            yield batch
        if position["batch"] < per_epoch:  # pragma: no cover - defensive
            raise RuntimeError("data loader ended early")
        position["epoch"] += 1
        position["batch"] = 0


def _to_device(batch: Mapping[str, Any], device) -> Dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = tuple(v.to(device) for v in value)
        else:
            out[key] = value
    return out


def _concat_batches(batches: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The loss-relevant keys of micro-batches joined into one batch (label, labels, entities)."""
    out: Dict[str, Any] = {}
    first = batches[0]
    for key in ("label", "labels"):
        if first.get(key) is not None:
            out[key] = torch.cat([b[key] for b in batches])
    if first.get("entities") is not None:
        out["entities"] = tuple(torch.cat([b["entities"][k] for b in batches]) for k in range(3))
    return out


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def resolve_checkpoint(resume: str, out: Optional[str] = None) -> Path:
    """The checkpoint directory named by ``resume``: "latest" (read from ``out/latest``) or a path to a
    checkpoint directory (or to a run directory that has a ``latest`` file)."""
    if resume == "latest":
        if out is None:
            raise ValueError("resume='latest' needs the run's out directory")
        marker = Path(out) / "latest"
        if not marker.is_file():
            raise FileNotFoundError(f"resume='latest': {marker} does not exist (no checkpoint saved in {out} yet)")
        path = Path(out) / marker.read_text().strip()
    else:
        path = Path(resume)
        if path.is_dir() and (path / "latest").is_file() and not (path / "state.pt").is_file():
            path = path / (path / "latest").read_text().strip()
    if not path.exists():
        raise FileNotFoundError(f"resume: checkpoint {str(path)!r} does not exist")
    for name in ("model.safetensors", "state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"resume: {path} is not a checkpoint (no {name})")
    return path


def _save_checkpoint(out: Path, step: int, model, loss_fn, optimizer, scheduler, position) -> Path:
    from safetensors.torch import save_file

    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({f"loss.{k}": v.detach().cpu().contiguous().clone() for k, v in loss_fn.state_dict().items()})
    save_file(tensors, str(path / "model.safetensors"))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": int(step),
             "epoch": int(position["epoch"]), "batch": int(position["batch"]), "rng": _rng_state()}
    torch.save(state, path / "state.pt")
    tmp = out / "latest.tmp"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, out / "latest")
    return path


def load_checkpoint_weights(path, model, loss_fn=None, *, strict: bool = True) -> None:
    """Load ``path/model.safetensors`` (or the file itself) into ``model`` (and ``loss_fn``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    tensors = load_file(str(path))
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd, strict=strict)
    if loss_fn is not None:
        loss_sd = {k[len("loss."):]: v for k, v in tensors.items() if k.startswith("loss.")}
        loss_fn.load_state_dict(loss_sd, strict=strict)


# ----------------------------------------------------------------------------------------------------------
# the run


def _param_groups(model, loss_fn, weight_decay: float) -> List[Dict[str, Any]]:
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip or p.ndim <= 1 else decay).append(p)
    for _, p in loss_fn.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_lambda(warmup: int, total: int):
    def fn(step: int) -> float:  # step = number of optimiser steps taken so far
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return fn


def _step_loss(model, loss_fn, micro: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """One optimiser step's gradients over the micro-batches (accumulated as in open_clip's accum_freq:
    cached no-grad embeddings, then one re-forward with grad per micro-batch), returns the loss terms."""
    if len(micro) == 1:
        batch = micro[0]
        outputs = model(batch["volume"], batch["text"])
        terms = loss_fn(outputs, batch)
        terms["loss"].backward()
        return {k: v.detach() for k, v in terms.items()}
    joined = _concat_batches(micro)
    with torch.no_grad():
        cached = [model(b["volume"], b["text"]) for b in micro]
    images = [c["image_features"] for c in cached]
    texts = [c["text_features"] for c in cached]
    terms = None
    for j, batch in enumerate(micro):
        out = model(batch["volume"], batch["text"])
        outputs = {
            "image_features": torch.cat(images[:j] + [out["image_features"]] + images[j + 1:]),
            "text_features": torch.cat(texts[:j] + [out["text_features"]] + texts[j + 1:]),
            # the scalars get their gradient once, from the first pass
            "logit_scale": out["logit_scale"] if j == 0 else out["logit_scale"].detach(),
            "logit_bias": out["logit_bias"] if j == 0 else out["logit_bias"].detach(),
        }
        result = loss_fn(outputs, joined)
        result["loss"].backward()
        if terms is None:
            terms = {k: v.detach() for k, v in result.items()}
    # the loss module's own parameters took the full gradient in every pass
    for p in loss_fn.parameters():
        if p.grad is not None:
            p.grad.div_(len(micro))
    return terms


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run ``config``; returns the final metrics: step, loss (last step), first_loss, lr, volumes_per_s,
    the loss terms, out, checkpoint (the last checkpoint directory)."""
    from medvl.models.factory import create_model

    config.validate()
    weights = dict(DEFAULT_LOSS_WEIGHTS.get(config.recipe, {}))
    weights.update(config.loss_weights or {})
    recipe = get_recipe(config.recipe, loss_weights=weights)
    data = config.data or recipe.data
    lr = recipe.lr if config.lr is None else float(config.lr)
    weight_decay = recipe.weight_decay if config.weight_decay is None else float(config.weight_decay)
    warmup = min(recipe.warmup_steps, config.steps // 10) if config.warmup_steps is None else int(config.warmup_steps)
    size = parse_size(config.size)
    device = torch.device(config.device)
    out = Path(config.out)
    checkpoint_path = resolve_checkpoint(config.resume, str(out)) if config.resume else None
    log = config.log_fn or (lambda _msg: None)

    _seed_everything(config.seed)
    dataset = synthetic_dataset("ct" if data == "synthetic-ct" else "mr", config.n_train, config.seed, size)
    vision = {"img_size": list(size), **(config.vision or {})}
    if data == "synthetic-mr" and "window" not in (config.vision or {}):
        vision["window"] = None  # MR volumes are already normalised; the HU window is for CT
    model = create_model(config.model or recipe.model, vision=vision).to(device)
    loss_fn = create_loss(recipe).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, loss_fn, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(warmup, config.steps))
    position = {"epoch": 0, "batch": 0}
    step = 0
    if checkpoint_path is not None:
        load_checkpoint_weights(checkpoint_path, model, loss_fn)
        state = torch.load(checkpoint_path / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, position = int(state["step"]), {"epoch": int(state["epoch"]), "batch": int(state["batch"])}
        _set_rng_state(state["rng"])
        log(f"resumed from {checkpoint_path} at step {step}")
        if step >= config.steps:
            raise ValueError(f"checkpoint {checkpoint_path} is at step {step}, not before steps={config.steps}; "
                             "raise --steps to train further")
    if len(dataset) // config.batch_size < 1:
        raise ValueError("the dataset holds fewer samples than one batch")

    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    batches = _batches(dataset, config.batch_size, config.seed, position)
    model.train()
    loss_fn.train()
    first_loss, record, last_checkpoint = None, {}, checkpoint_path
    with open(out / "metrics.jsonl", "a") as metrics:
        while step < config.steps:
            start = time.perf_counter()
            micro = [_to_device(next(batches), device) for _ in range(config.accum_steps)]
            optimizer.zero_grad(set_to_none=True)
            terms = _step_loss(model, loss_fn, micro)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            elapsed = max(time.perf_counter() - start, 1e-9)
            loss_value = float(terms["loss"])
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step}: the loss is {loss_value}")
            first_loss = loss_value if first_loss is None else first_loss
            record = {"step": step, "loss": loss_value, "lr": lr_now,
                      "volumes_per_s": config.batch_size * config.accum_steps / elapsed}
            record.update({k: float(v) for k, v in terms.items() if k != "loss"})
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if step % config.log_every == 0 or step == config.steps:
                log(f"step {step}/{config.steps}  loss {loss_value:.4f}  lr {lr_now:.2e}  "
                    f"{record['volumes_per_s']:.1f} vol/s")
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                last_checkpoint = _save_checkpoint(out, step, model, loss_fn, optimizer, scheduler, position)
    return {**record, "first_loss": first_loss, "out": str(out),
            "checkpoint": None if last_checkpoint is None else str(last_checkpoint)}
