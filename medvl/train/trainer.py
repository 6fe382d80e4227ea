"""The trainer of the recipes, for one process or ``torchrun`` ranks: AdamW + cosine schedule with warmup,
gradient clipping, bf16 autocast on GPU, gradient checkpointing, contrastive-correct gradient
accumulation (open_clip's ``accum_freq``), JSONL metrics, a progress bar, ``loss.png``, TensorBoard
when installed, a profiler trace on request, and exactly resumable checkpoints.

    from medvl.train.trainer import TrainConfig, train
    final = train(TrainConfig(recipe="siglip", steps=60, batch_size=8, out="runs/siglip"))

Under ``torchrun --nproc_per_node N`` the model is wrapped in DistributedDataParallel (gloo on CPU,
NCCL on GPU), ``batch_size`` is per rank, and the contrastive losses take the process group: each
rank's volumes meet every rank's texts (and labels), gradients travel back to their owners, and the
prompt / localization means run over the global batch, so N ranks equal one process on the same
global batch. MedTrim's mining stays within each rank's batch (its triplets are mined locally).

Resuming (``resume="latest"`` or a checkpoint path) restores the model, loss module, optimizer,
scheduler, RNG states and the data position: the order of the samples is a deterministic function of
(seed, epoch), and the trainer starts the current epoch at the first batch not yet consumed, so N steps
+ resume + N steps gives the same parameters as 2N uninterrupted steps (on CPU). What a run leaves in
``out``, and what a new or resumed run may do to an ``out`` that holds one: :mod:`medvl.train.run_folder`.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from medvl.data import collate
from medvl.data.phantom_share import PhantomShare
from medvl.data.sources import SYNTHETIC_SOURCES
from medvl.models.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_dir, checkpoint_name, read_latest
from medvl.options import look_up_option, parse_size
from medvl.train.calibration import calibrate_standardizers
from medvl.train.diagnostics import run_diagnostics
from medvl.train.distributed import DistributedContext, device_for, init_distributed, rank_slice
from medvl.train.profiling import StepProfiler, stage
from medvl.train.radfinder_inputs import RadFinderInputs, joined_side_inputs
from medvl.train.recipes import Recipe, create_loss, get_recipe
from medvl.train.reporting import Progress, peak_memory_mib, plot_loss, tensorboard_writer
from medvl.train.run_folder import (METRICS_FILE, RunFolderPlan, apply_run_folder_plan, load_training_state,
                                    plan_run_folder, restore_checkpoint, save_checkpoint)

__all__ = ["TrainConfig", "train", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16")
# Losses that compare each sample with the other samples of its loss batch: with one sample there is
# nothing to compare, and the loss is 0 at every step. Value: the batch the loss sees.
_NEEDS_OTHER_SAMPLES = {
    "mrclip": "every rank's batch (a sample's positives are the other samples of its contrast category)",
    "medtrim": "this rank's batch (triplets are mined within it)",
}


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take the recipe's value (``lr``, ``weight_decay``,
    ``model``, ``data``); ``warmup_steps=None`` takes ``min(recipe.warmup_steps, steps // 10)``.

    data: "synthetic-ct" | "synthetic-mr" (n_train phantoms, generated when read and lightly augmented;
    default None: one new phantom per sample the run trains on, steps x global batch x accum_steps), a
    manifest (.csv / .jsonl), a CT-RATE
    folder or a folder of MR NIfTI files with sidecars (see :func:`medvl.data.sources.build_dataset`).
    size (X, Y, Z): the transformed volume size, which also sets the model's ``vision.img_size``.
    vision / text: extra overrides of the model's towers (e.g. vision patch_size, text pool).
    batch_size: per rank. precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16".
    checkpoint_every: also save every that many steps (0: only at the end).
    progress: a tqdm bar on the main rank. profile: trace steps 3-5 (see :mod:`medvl.train.profiling`).
    phantom_share: a :class:`~medvl.data.phantom_share.PhantomShare` when other processes train on the same
    phantoms at the same time (``medvl reproduce``'s side-by-side trainings): each phantom is generated once.
    overwrite: discard the run already in ``out`` (its checkpoints, metrics, plots), or with ``resume``
    the checkpoints of ``out`` after the resumed step; without it such a run is an error.
    """

    recipe: str = "siglip"
    model: Optional[str] = None
    data: Optional[str] = None
    # the embedded default (medvl train, medvl demo): what the tiny model needs to align the CT phantoms'
    # volumes and reports on 2 CPU cores in about 90 s (at 200 steps of 8 the contrastive loss stayed at its
    # collapsed level; bench/results/reproduce-cpu-epyc-2core.txt)
    steps: int = 500
    batch_size: int = 16
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_steps: Optional[int] = None
    accum_steps: int = 1
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    out: str = "runs/siglip"
    device: str = "cpu"
    precision: str = "auto"
    grad_checkpointing: bool = False
    resume: Optional[str] = None
    log_every: int = 10
    n_train: Optional[int] = None
    size: Any = (64, 64, 32)
    vision: Dict[str, Any] = field(default_factory=dict)
    text: Dict[str, Any] = field(default_factory=dict)
    loss_weights: Optional[Dict[str, float]] = None
    loss_options: Optional[Dict[str, Any]] = None
    checkpoint_every: int = 0
    split: str = "train"
    cache_dir: Optional[str] = None
    phantom_share: Optional[PhantomShare] = None
    skip_bad: bool = False
    num_workers: int = 0
    progress: bool = False
    profile: bool = False
    overwrite: bool = False
    log_fn: Any = None  # callable(str) for progress lines; None: silent

    def validate(self) -> None:
        for key in ("steps", "batch_size", "accum_steps", "log_every", "n_train"):
            value = getattr(self, key)
            if key == "n_train" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("checkpoint_every", "num_workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.warmup_steps is not None and (int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be a finite number > 0, or None to turn clipping off; got "
                             f"{self.grad_clip!r}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ValueError(f"out {self.out!r} is a file; give the path of a run folder (created when missing)")
        if self.data is not None and self.data not in SYNTHETIC_SOURCES and not Path(self.data).exists():
            raise FileNotFoundError(f"data {self.data!r} is neither {' / '.join(map(repr, SYNTHETIC_SOURCES))} nor an "
                                    "existing manifest file or data folder")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        look_up_option(self.precision, PRECISIONS, name="precision")
        parse_size(self.size)
        if self.phantom_share is not None and not isinstance(self.phantom_share, PhantomShare):
            raise TypeError(f"phantom_share must be a medvl.data.phantom_share.PhantomShare or None, got "
                            f"{type(self.phantom_share).__name__}")
        if (self.data is None or self.data in SYNTHETIC_SOURCES) and self.n_train is not None \
                and self.n_train < self.batch_size:
            raise ValueError(f"n_train ({self.n_train}) must be at least batch_size ({self.batch_size}): "
                             "the loader drops incomplete batches")
        self._validate_model()

    def _validate_model(self) -> None:
        """The model name, the patch size against the volume size, and a loss batch with something to compare."""
        from medvl.models.factory import list_models, model_config

        recipe = get_recipe(self.recipe)
        name = self.model or recipe.model
        look_up_option(name, list_models(), name="model")
        patch = (self.vision or {}).get("patch_size", model_config(name)["vision"]["patch_size"])
        patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
        size = parse_size(self.size)
        if len(patch) != 3 or any(not isinstance(p, int) or p < 1 for p in patch) \
                or any(s % p for s, p in zip(size, patch)):
            raise ValueError(f"size {','.join(map(str, size))} must be a multiple of the patch size "
                             f"{','.join(map(str, patch))} on every axis (the volume is cut into whole patches); "
                             f"choose a patch size that divides the size, or a size that the patch size divides")
        if recipe.loss in _NEEDS_OTHER_SAMPLES:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            per_loss = self.batch_size * self.accum_steps * (world if recipe.loss != "medtrim" else 1)
            if per_loss < 2:
                raise ValueError(f"recipe {self.recipe!r} compares each sample with the others of "
                                 f"{_NEEDS_OTHER_SAMPLES[recipe.loss]}, which holds {per_loss} sample (batch_size "
                                 f"{self.batch_size} x accum_steps {self.accum_steps}): the loss would be 0 at every "
                                 "step; use a batch size of 2 or more")


# ----------------------------------------------------------------------------------------------------------
# data order


def _epoch_permutation(n: int, seed: int, epoch: int) -> List[int]:
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2 ** 63))
    return torch.randperm(n, generator=g).tolist()


class _RankEpochSampler(Sampler):
    """This rank's share of the seeded permutation of one epoch, from global batch ``start`` on."""

    def __init__(self, n: int, seed: int, epoch: int, start: int, ctx: DistributedContext, batch_size: int):
        self.indices = rank_slice(_epoch_permutation(n, seed, epoch), ctx.rank, ctx.world_size, batch_size, start)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def _batches(dataset, batch_size: int, seed: int, position: Dict[str, int], ctx: DistributedContext,
             num_workers: int = 0) -> Iterator[Dict[str, Any]]:
    """This rank's micro-batches forever; ``position`` ({"epoch", "batch"}, in global batches) is updated
    as batches are handed out."""
    per_epoch = len(dataset) // (batch_size * ctx.world_size)
    while True:
        sampler = _RankEpochSampler(len(dataset), seed, position["epoch"], position["batch"], ctx, batch_size)
        # a private generator: creating the iterator must not draw from the global RNG (dropout uses it),
        # or a resumed run would see different random numbers than an uninterrupted one
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                            collate_fn=collate, drop_last=True, generator=torch.Generator().manual_seed(int(seed)),
                            persistent_workers=False)
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
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = tuple(v.to(device, non_blocking=True) for v in value)
        else:
            out[key] = value
    return out


def _concat_batches(batches: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The loss-relevant keys of micro-batches joined into one batch (label, labels, entities, side inputs)."""
    out: Dict[str, Any] = {}
    first = batches[0]
    for key in ("label", "labels"):
        if first.get(key) is not None:
            out[key] = torch.cat([b[key] for b in batches])
    if first.get("entities") is not None:
        out["entities"] = tuple(torch.cat([b["entities"][k] for b in batches]) for k in range(3))
    out.update(joined_side_inputs(batches))
    return out


# ----------------------------------------------------------------------------------------------------------
# random numbers


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# one step


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


def _forward(model, batch: Mapping[str, Any], side: Optional[RadFinderInputs], autocast_dtype) -> Dict[str, Any]:
    """The model's outputs for ``batch`` as the loss reads them (float32 features)."""
    device_type = batch["volume"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(batch["volume"], batch["text"], extra_texts=side.extra_texts(batch) if side else None,
                    return_depth=bool(side and side.needs_depth))
    # the losses run in fp32: bf16 logits would round scale * cos to a few bits
    out = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in out.items()}
    return side.loss_outputs(out, batch) if side else out


def _step_loss(model, loss_fn, micro: List[Dict[str, Any]], *, side: Optional[RadFinderInputs] = None,
               autocast_dtype=None, profiling: bool = False) -> Dict[str, torch.Tensor]:
    """One optimiser step's gradients over the micro-batches, returns the loss terms.

    K micro-batches are accumulated as in open_clip's accum_freq: every micro-batch is encoded once
    without grad and cached, then each is encoded again with grad and the loss is taken over the whole
    K·B batch with the cached outputs standing in for the other micro-batches, so the loss sees K·B
    pairs while only B samples' activations are alive. Per-sample outputs take their gradient in their
    own micro-batch's pass; shared scalars (logit scale and bias) in the last pass, which is the one
    DistributedDataParallel synchronises (the others run under ``no_sync``).
    """
    if len(micro) == 1:
        batch = micro[0]
        with stage("medvl.forward", profiling):
            outputs = _forward(model, batch, side, autocast_dtype)
        with stage("medvl.loss", profiling):
            terms = loss_fn(outputs, batch)
        with stage("medvl.backward", profiling):
            terms["loss"].backward()
        return {k: v.detach() for k, v in terms.items()}
    joined = _concat_batches(micro)
    with torch.no_grad(), stage("medvl.forward", profiling):
        cached = [_forward(model, b, side, autocast_dtype) for b in micro]
    last, terms = len(micro) - 1, None
    for j, batch in enumerate(micro):
        sync = model.no_sync() if hasattr(model, "no_sync") and j < last else nullcontext()
        with sync:
            with stage("medvl.forward", profiling):
                live = _forward(model, batch, side, autocast_dtype)
            outputs = {}
            for key, value in live.items():
                if not isinstance(value, torch.Tensor):
                    outputs[key] = value
                elif value.dim() == 0:
                    outputs[key] = value if j == last else value.detach()
                else:
                    outputs[key] = torch.cat([c[key] for c in cached[:j]] + [value] + [c[key] for c in cached[j + 1:]])
            with stage("medvl.loss", profiling):
                result = loss_fn(outputs, joined)
            with stage("medvl.backward", profiling):
                result["loss"].backward()
        if terms is None:
            terms = {k: v.detach() for k, v in result.items()}
    # the loss module's own parameters took the full gradient in every pass
    for p in loss_fn.parameters():
        if p.grad is not None:
            p.grad.div_(len(micro))
    return terms


# ----------------------------------------------------------------------------------------------------------
# the run


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run ``config``; returns the final metrics: step, loss (last step), first_loss, lr, volumes_per_s,
    the loss terms, out, checkpoint (the last checkpoint directory), skipped (data rows left out), diagnostics,
    phantom_share (None, or how many phantoms this process generated and read from its ``phantom_share``)."""
    config.validate()
    ctx = init_distributed(config.device)
    try:
        return _train(config, ctx)
    finally:
        ctx.close()


def _train(config: TrainConfig, ctx: DistributedContext) -> Dict[str, Any]:
    run = _build(config, ctx)
    step, position = _restore(run)
    trained = _loop(run, step, position)
    return _finish(run, trained)


@dataclass
class _Run:
    """A run's settings and the objects it trains, built before its first step (:func:`_build`)."""

    config: TrainConfig
    ctx: DistributedContext
    recipe: Recipe
    data: str                                # the source: config.data, or the recipe's
    kind: str                                # "ct" or "mr"
    size: Tuple[int, int, int]
    device: torch.device
    autocast_dtype: Optional[torch.dtype]    # None: fp32
    out: Path
    log: Callable[[str], None]               # silent on every rank but the main one
    checkpoint: Optional[Path]               # the checkpoint resumed from
    resumed_state: Optional[Dict[str, Any]]  # its state.pt
    folder_plan: RunFolderPlan
    dataset: Any
    info: Dict[str, Any]                     # what build_dataset says about the source
    model: torch.nn.Module                   # the CLIPModel itself (the loop wraps it for DDP)
    loss_fn: torch.nn.Module
    side: Optional[RadFinderInputs]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_config: Dict[str, Any]               # saved with every checkpoint

    @property
    def global_batch(self) -> int:
        """The samples of one micro-batch over every rank."""
        return self.config.batch_size * self.ctx.world_size


@dataclass
class _Trained:
    """What the loop leaves: the last step's record, the first step's loss, the last checkpoint."""

    record: Dict[str, Any] = field(default_factory=dict)
    first_loss: Optional[float] = None
    checkpoint: Optional[Path] = None


# ----------------------------------------------------------------------------------------------------------
# building the run


def _build(config: TrainConfig, ctx: DistributedContext) -> _Run:
    """Everything the run needs before its first step; nothing in ``out`` changes yet. The random numbers are
    drawn after seeding in one order (dataset, model, RadFinder's inputs, loss), so a seed makes one run."""
    recipe = get_recipe(config.recipe, loss_weights=dict(config.loss_weights or {}),
                        loss_options=dict(config.loss_options or {}))
    data = config.data or recipe.data
    size = parse_size(config.size)
    device = device_for(ctx, config.device)
    autocast_dtype = torch.bfloat16 if (config.precision == "bf16" or
                                        (config.precision == "auto" and device.type == "cuda")) else None
    out = Path(config.out)
    checkpoint, resumed_state = _resumed(config, out)
    # every rank decides (and refuses) alike; the main rank changes the folder just before the first step
    folder_plan = plan_run_folder(out, checkpoint, None if resumed_state is None else resumed_state["step"],
                                  config.overwrite, via_latest=config.resume == "latest")
    log = (config.log_fn or (lambda _msg: None)) if ctx.is_main else (lambda _msg: None)

    _seed_everything(config.seed)
    kind = _data_kind(recipe, data)
    dataset, info = _dataset(config, ctx, data, kind, size, log)
    architecture, model = _model(config, recipe, kind, size, device)
    side = _radfinder_inputs(config, recipe, data, info, dataset, model)
    group = ctx.group if ctx.enabled and recipe.loss != "medtrim" else None
    loss_fn = create_loss(recipe, embed_dim=model.visual.embed_dim, proj_dim=model.embed_dim, group=group)
    if recipe.loss == "siglip":
        loss_fn.prompts.init_from(model.visual.proj)
    loss_fn = loss_fn.to(device)

    lr = recipe.lr if config.lr is None else float(config.lr)
    weight_decay = recipe.weight_decay if config.weight_decay is None else float(config.weight_decay)
    warmup = min(recipe.warmup_steps, config.steps // 10) if config.warmup_steps is None else int(config.warmup_steps)
    optimizer = torch.optim.AdamW(_param_groups(model, loss_fn, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_lambda(warmup, config.steps))
    run_config = {"model": config.model or recipe.model, "model_config": architecture,
                  "recipe": recipe.name, "loss": recipe.loss, "loss_weights": dict(recipe.loss_weights),
                  "loss_options": dict(recipe.loss_options), "data": str(data),
                  "data_kind": kind, "size": list(size), "seed": config.seed, "batch_size": config.batch_size,
                  "world_size": ctx.world_size, "accum_steps": config.accum_steps, "steps": config.steps,
                  "lr": lr, "precision": "bf16" if autocast_dtype is not None else "fp32"}
    return _Run(config=config, ctx=ctx, recipe=recipe, data=data, kind=kind, size=size, device=device,
                autocast_dtype=autocast_dtype, out=out, log=log, checkpoint=checkpoint, resumed_state=resumed_state,
                folder_plan=folder_plan, dataset=dataset, info=info, model=model, loss_fn=loss_fn, side=side,
                optimizer=optimizer, scheduler=scheduler, run_config=run_config)


def _resumed(config: TrainConfig, out: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint ``config.resume`` names and its training state; (None, None) for a new run."""
    if not config.resume:
        return None, None
    named = read_latest(out) if config.resume == "latest" else config.resume
    checkpoint = checkpoint_dir(named, needs=(WEIGHTS_FILE, STATE_FILE))
    state = load_training_state(checkpoint)
    if state["step"] >= config.steps:
        raise ValueError(f"checkpoint {checkpoint} is at step {state['step']}, not before "
                         f"steps={config.steps}; raise --steps to train further")
    return checkpoint, state


def _data_kind(recipe, data: str) -> str:
    """The kind of a phantom source, or else the kind of the recipe's phantoms (a real source is read as such)."""
    return SYNTHETIC_SOURCES.get(data, SYNTHETIC_SOURCES[recipe.data])


def _dataset(config: TrainConfig, ctx: DistributedContext, data: str, kind: str, size: Tuple[int, int, int],
             log: Callable[[str], None]) -> Tuple[Any, Dict[str, Any]]:
    """(dataset, info) of the run's source, holding at least one global batch."""
    from medvl.data.sources import build_dataset

    # n_train sizes the phantom sets (by default a new phantom for every sample trained on); a real source is
    # used whole
    n = None
    if data in SYNTHETIC_SOURCES:
        n = config.n_train or config.steps * config.batch_size * ctx.world_size * config.accum_steps
    dataset, info = build_dataset(data, kind, n=n, seed=config.seed, size=size, cache_dir=config.cache_dir,
                                  skip_bad=config.skip_bad, split=config.split, log=log, augment=True,
                                  share=config.phantom_share)
    global_batch = config.batch_size * ctx.world_size
    if len(dataset) < global_batch:
        raise ValueError(f"the dataset holds {len(dataset)} samples, fewer than one global batch of {global_batch} "
                         f"(batch_size {config.batch_size} x {ctx.world_size} ranks)")
    return dataset, info


def _model(config: TrainConfig, recipe: Recipe, kind: str, size: Tuple[int, int, int], device: torch.device
           ) -> Tuple[Dict[str, Any], torch.nn.Module]:
    """(the model config, the CLIPModel built from it on ``device``)."""
    from medvl.models.factory import create_model, model_config

    vision = {"img_size": list(size), **(config.vision or {})}
    if kind == "mr" and "window" not in (config.vision or {}):
        vision["window"] = None  # MR volumes are already normalised; the HU window is for CT
    architecture = model_config(config.model or recipe.model, vision=vision, text=dict(config.text or {}))
    model = create_model(architecture)
    if config.grad_checkpointing:
        model.visual.set_grad_checkpointing(True)
    if recipe.loss in ("mrclip", "medtrim"):
        # these losses have their own temperature (or none): SigLIP's scale and bias stay as initialised,
        # and DDP must not wait for gradients they never get
        model.logit_scale.requires_grad_(False)
        model.logit_bias.requires_grad_(False)
    return architecture, model.to(device)


def _finding_names(info: Mapping[str, Any], dataset) -> Optional[List[str]]:
    names = info.get("findings")
    if names:
        return list(names)
    from medvl.data.entities import CT_RATE_FINDINGS
    from medvl.data.phantoms import CT_FINDINGS

    if SYNTHETIC_SOURCES.get(info.get("source")) == "ct":
        return list(CT_FINDINGS)
    findings = dataset.text_and_labels(0)[2]  # the width of the findings labels, without loading a volume
    width = None if findings is None else int(findings.shape[0])
    if width == len(CT_RATE_FINDINGS):
        return list(CT_RATE_FINDINGS)
    return None


def _radfinder_inputs(config: TrainConfig, recipe: Recipe, data: str, info: Mapping[str, Any], dataset,
                      model: torch.nn.Module) -> Optional[RadFinderInputs]:
    """The disease prompts and report snippets of the "siglip" recipe's prompt and localization terms; None
    when neither term is on."""
    weights = recipe.loss_weights
    prompts = bool(weights.get("prompts") or weights.get("report_prompts"))
    if recipe.loss != "siglip" or not (prompts or weights.get("localization")):
        return None
    findings = _finding_names(info, dataset) if prompts else []
    if findings is None:
        raise ValueError(f"the prompt terms need the names of the finding labels of {data!r}, which are unknown "
                         "(give the manifest CT-RATE's 18 findings, or switch the terms off: loss weights prompts=0 "
                         "and report_prompts=0)")
    return RadFinderInputs(findings, model.visual.patch_size[2], prompts=prompts,
                           localization=bool(weights.get("localization")), seed=config.seed)


# ----------------------------------------------------------------------------------------------------------
# restoring a checkpoint


def _restore(run: _Run) -> Tuple[int, Dict[str, int]]:
    """The step and data position the loop starts from: the resumed checkpoint's (loaded into the run's
    model, loss module, optimizer, scheduler and RNG states), or the start."""
    if run.checkpoint is None:
        return 0, {"epoch": 0, "batch": 0}
    state = run.resumed_state
    restore_checkpoint(run.checkpoint, state, run.model, run.loss_fn, run.optimizer, run.scheduler)
    step, position = int(state["step"]), {"epoch": int(state["epoch"]), "batch": int(state["batch"])}
    run.log(f"resumed from {run.checkpoint} at step {step}")
    return step, position


# ----------------------------------------------------------------------------------------------------------
# the loop


def _loop(run: _Run, step: int, position: Dict[str, int]) -> _Trained:
    """Train from ``step`` to ``config.steps``, the data from ``position`` on: each step logged, a checkpoint
    every ``checkpoint_every`` steps and at the end."""
    config, ctx, device = run.config, run.ctx, run.device
    model = run.model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if ctx.is_main:
        apply_run_folder_plan(run.folder_plan, run.log)
    ctx.barrier()
    params = [p for p in list(run.model.parameters()) + list(run.loss_fn.parameters()) if p.requires_grad]
    batches = _batches(run.dataset, config.batch_size, config.seed, position, ctx, config.num_workers)
    model.train()
    run.loss_fn.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trained = _Trained(checkpoint=run.checkpoint)
    step_log = _StepLog(run, step)
    profiler = StepProfiler(run.out / "profile", device) if config.profile else None
    trace = run.out / "profile" / "trace.json"
    steps_this_run = 0
    try:
        if profiler is not None:
            profiler.__enter__()
        while step < config.steps:
            start = time.perf_counter()
            terms, lr = _optimizer_step(run, model, batches, params, step, profiling=profiler is not None)
            step += 1
            if profiler is not None:
                profiler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = max(time.perf_counter() - start, 1e-9)
            values = {k: ctx.mean(float(v), device) for k, v in terms.items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(f"step {step}: the loss is {values['loss']}")
            trained.first_loss = values["loss"] if trained.first_loss is None else trained.first_loss
            trained.record = step_log.write(step, values, lr, elapsed)
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                trained.checkpoint = _checkpoint(run, step, position)
            steps_this_run += 1
            if profiler is not None and not profiler.done and steps_this_run >= 5:
                profiler.__exit__(None, None, None)
                run.log(f"profile of this run's steps 3-5 (trace: {trace})\n" + profiler.table())
    finally:
        if profiler is not None and not profiler.done:
            profiler.__exit__(None, None, None)
            if steps_this_run >= 3:
                run.log(f"profile (trace: {trace})\n" + profiler.table())
        step_log.close()
    return trained


def _optimizer_step(run: _Run, model, batches: Iterator[Dict[str, Any]], params: List[torch.Tensor], step: int, *,
                    profiling: bool) -> Tuple[Dict[str, torch.Tensor], float]:
    """One optimiser step over ``accum_steps`` micro-batches: (the loss terms, the learning rate it took)."""
    config, side = run.config, run.side
    with stage("medvl.data", profiling):
        micro = []
        for _ in range(config.accum_steps):
            batch = _to_device(next(batches), run.device)
            micro.append(side.prepare(batch, step) if side else batch)
    run.optimizer.zero_grad(set_to_none=True)
    terms = _step_loss(model, run.loss_fn, micro, side=side, autocast_dtype=run.autocast_dtype, profiling=profiling)
    with stage("medvl.optimizer", profiling):
        run.ctx.average_gradients(run.loss_fn.parameters())
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.scheduler.step()
    return terms, lr


def _checkpoint(run: _Run, step: int, position: Mapping[str, int]) -> Path:
    """The checkpoint of ``step``, saved by the main rank after measuring the stored standardisation
    statistics; every rank waits for it."""
    if run.ctx.is_main:
        side = run.side
        calibrate_standardizers(run.model, run.loss_fn, run.dataset, device=run.device,
                                autocast_dtype=run.autocast_dtype,
                                prompts=side.prompt_texts if side and side.prompts else None)
        path = save_checkpoint(run.out, step, run.model, run.loss_fn, run.optimizer, run.scheduler, position,
                               run.run_config)
    else:
        path = run.out / checkpoint_name(step)
    run.ctx.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------
# the log


class _StepLog:
    """Where each step's record goes: metrics.jsonl and TensorBoard (main rank), the progress bar, and a log
    line every ``log_every`` steps when there is no bar."""

    def __init__(self, run: _Run, step: int):
        config, main = run.config, run.ctx.is_main
        self.config, self.device, self.log = config, run.device, run.log
        self.samples_per_step = run.global_batch * config.accum_steps
        self.progress = Progress(config.steps, step, config.progress and main)
        self.board = tensorboard_writer(run.out / "tensorboard") if main else None
        # appended to only when resuming this folder's own run (cut back to the resumed step by the folder plan)
        self.metrics = open(run.out / METRICS_FILE, "a" if run.folder_plan.keep_metrics_to is not None else "w") \
            if main else None

    def write(self, step: int, values: Mapping[str, float], lr: float, elapsed: float) -> Dict[str, Any]:
        """Log step ``step`` (``values``: the loss terms averaged over the ranks); returns its record."""
        peak = peak_memory_mib(self.device)
        record = {"step": step, "loss": values["loss"], "lr": lr,
                  "volumes_per_s": self.samples_per_step / elapsed, "peak_memory_mib": peak}
        record.update({k: v for k, v in values.items() if k != "loss"})
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step":
                    self.board.add_scalar(f"train/{key}", value, step)
        self.progress.update(record, peak)
        if (step % self.config.log_every == 0 or step == self.config.steps) and not self.config.progress:
            self.log(f"step {step}/{self.config.steps}  loss {values['loss']:.4f}  lr {lr:.2e}  "
                     f"{record['volumes_per_s']:.1f} vol/s  peak {peak:.0f} MiB")
        return record

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.board is not None:
            self.board.close()


def _finish(run: _Run, trained: _Trained) -> Dict[str, Any]:
    """The loss curve and the collapse diagnostics (main rank), and the run's final metrics."""
    diagnostics = None
    if run.ctx.is_main:
        plot_loss(run.out / METRICS_FILE, run.out / "loss.png")
        diagnostics = run_diagnostics(run.model, run.recipe, run.dataset, data=str(run.data), kind=run.kind,
                                      size=run.size, global_batch=run.global_batch * run.config.accum_steps,
                                      out=run.out, device=run.device, log=run.log)
    share = run.config.phantom_share
    return {**trained.record, "first_loss": trained.first_loss, "out": str(run.out),
            "skipped": list(run.info.get("skipped", [])), "diagnostics": diagnostics,
            # this process's counts (DataLoader workers keep their own)
            "phantom_share": None if share is None else {"generated": share.generated, "read": share.read},
            "checkpoint": None if trained.checkpoint is None else str(trained.checkpoint)}
