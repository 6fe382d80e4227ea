"""Training-step throughput and memory: the CLIP model on medvl's fused ops against the plain path.

Two paths train the same model (same weights, same batch, same optimizer):

* ``fused``: the model as ``create_model`` builds it: the HU window, patchify, projection, bias and
  position embedding in one pass over the raw int16 volume (``medvl.ops.patch_embed3d``), and
  ``medvl.nn.SigLIPLoss`` (gradients in the loss pass, O(B*D) memory).
* ``plain``: what the same model is without medvl: MONAI's ``ScaleIntensityRange`` on a float32 copy of
  the whole volume, MONAI's ``PatchEmbeddingBlock(proj_type="conv", pos_embed_type="learnable")`` with
  the fused layer's weights, the same transformer, and open_clip's ``SigLipLoss`` (a B x B logits
  matrix). ``tests/train/test_throughput.py`` checks that both give the same features and loss.

A train step is forward, loss, backward and an AdamW step. Figures:

* volumes/s: batch / the median step time over the timed steps, after warm-up steps; the CLI times the
  paths in turns in one process, so that both see the same load on a shared machine.
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps (everything the process holds,
  the model included); on CPU the model's parameters and buffers plus the growth of the process's peak
  RSS (VmHWM, reset through /proc/self/clear_refs as ``medvl.bench.peak_memory`` does) over the steps:
  gradients, AdamW moments, activations, the batch and workspaces. Each CPU measurement runs in its own
  process (forked from a server that has only imported the libraries), so no path's peak hides another's.
* largest batch in a budget: the largest batch whose measured peak is within the budget (CUDA: also no
  out-of-memory error with the allocator capped at the budget), searched up to a cap from a guess (the
  measured peak's per-volume slope) by climbing along the line through the measured peaks, then bisecting
  (``search_largest``); each probe is one warm-up step and one measured step.

Precision: "fp32"; "bf16" runs the model under bf16 autocast with fp32 parameters (the trainer's bf16);
"bf16-params" holds the parameters in bf16. The loss always takes fp32 features.

    python -m medvl.bench.throughput --model vit3d-tiny --size 64,64,32 --device cpu --budget-mib 2048 --json OUT
    python -m medvl.bench.throughput --model vit3d-base --size 224,224,160 --device cuda --budget-mib 40960,full
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from medvl.bench.harness import append_record, peak_memory, sync
from medvl.models.volume_encoder import VolumeEncoder
from medvl.options import look_up_option

__all__ = ["PATHS", "PRECISIONS", "MonaiPatchEmbedding", "PlainVolumeEncoder", "plain_volume_path", "plain_loss",
           "build_path", "make_batch", "TrainStep", "measure_step", "search_largest", "largest_batch", "run_isolated",
           "compare", "format_table", "main"]

PATHS = ("fused", "plain")
# fp32; bf16: fp32 parameters, the model under bf16 autocast (as medvl.train's trainer runs it); bf16-params:
# the parameters themselves in bf16 (so the fused patch embedding also computes and writes bf16). The loss
# always takes float32 features, outside autocast, as in the trainer.
PRECISIONS = ("fp32", "bf16", "bf16-params")
HU_RANGE = (-1024, 2000)
# Short fixed reports: tokenised once, the same for both paths.
REPORTS = ("No pleural effusion. Lungs are clear.", "Small left pleural effusion.",
           "A 6 mm nodule in the right upper lobe.", "Cardiomegaly without effusion.")
# What the library-loading server imports once for the measurement processes.
_PRELOAD = ("medvl.bench.throughput", "medvl.models", "medvl.nn", "monai.networks.blocks", "monai.transforms",
            "open_clip.loss", "transformers")


# ---------------------------------------------------------------------------------------------
# The plain path
# ---------------------------------------------------------------------------------------------


class MonaiPatchEmbedding(torch.nn.Module):
    """The plain first layer: MONAI ``ScaleIntensityRange`` on a float32 copy of the whole volume, then
    MONAI ``PatchEmbeddingBlock(proj_type="conv", pos_embed_type="learnable")``, holding copies of the
    weight, bias and position table of a ``medvl.nn.PatchEmbed3d``."""

    def __init__(self, fused):
        super().__init__()
        from monai.networks.blocks import PatchEmbeddingBlock
        from monai.transforms import ScaleIntensityRange

        if fused.pad:
            raise ValueError("the plain path has no pad-after-window; use volume sizes that are multiples of the patch")
        embed, channels = fused.weight.shape[0], fused.weight.shape[1]
        self.block = PatchEmbeddingBlock(in_channels=channels, img_size=fused.img_size, patch_size=fused.patch_size,
                                         hidden_size=embed, num_heads=1, proj_type="conv", pos_embed_type="learnable",
                                         dropout_rate=0.0, spatial_dims=3)
        conv = self.block.patch_embeddings
        with torch.no_grad():
            conv.weight.copy_(fused.weight)
            if fused.bias is None:
                conv.bias = None
            else:
                conv.bias.copy_(fused.bias)
            if fused.pos_embed is None:
                self.block.position_embeddings.zero_()
            else:
                self.block.position_embeddings.copy_(fused.pos_embed.reshape(self.block.position_embeddings.shape))
        # A fixed (sin-cos) table stays fixed.
        self.block.position_embeddings.requires_grad_(isinstance(fused.pos_embed, torch.nn.Parameter))
        self.block.to(fused.weight.device, fused.weight.dtype)
        self.window = fused.window
        self.scale = None
        if fused.window is not None:
            (lo, hi), (out_lo, out_hi) = fused.window, fused.out_range
            self.scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=out_lo, b_max=out_hi, clip=True)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = volume.float()
        if self.scale is not None:
            x = self.scale(x)
            x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI may hand back a MetaTensor
        weight = self.block.patch_embeddings.weight
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the conv casts for itself
            x = x.to(weight.dtype)
        return self.block(x)


class PlainVolumeEncoder(VolumeEncoder):
    """A ``VolumeEncoder`` whose ``patch_embed`` is a :class:`MonaiPatchEmbedding`; the rest (CLS token,
    blocks, norm, pooling, projection) is the encoder's own. Volumes must have the configured size."""

    def forward_tokens(self, volume: torch.Tensor):
        grid = self.patch_grid(volume.shape[2:])
        if grid != tuple(self.grid):
            raise ValueError(f"the plain path needs volumes of the configured size {self.img_size} "
                             f"(grid {self.grid}), got {tuple(volume.shape[2:])}")
        return self.transform_patch_tokens(self.patch_embed(volume)), grid

    def no_weight_decay(self):
        names = {name for name, param in self.named_parameters() if param.ndim <= 1}
        return names | {name for name, _ in self.named_parameters()
                        if name in ("patch_embed.block.position_embeddings", "cls_token", "cls_pos_embed")}


def plain_volume_path(model):
    """A copy of the CLIPModel ``model`` whose vision tower embeds patches the plain way (MONAI window and
    ``PatchEmbeddingBlock``) with the same weights; everything else is a copy of ``model``'s own."""
    if model.visual.stem is not None:
        raise ValueError("plain_volume_path compares the fused patch embedding with MONAI's on the raw volume; "
                         "this model's vision tower has a convolutional stem first (vision stem=...): benchmark "
                         "a model without one")
    plain = copy.deepcopy(model)
    visual = plain.visual
    visual.__class__ = PlainVolumeEncoder
    visual.patch_embed = MonaiPatchEmbedding(model.visual.patch_embed)
    return plain


def plain_loss():
    """open_clip's ``SigLipLoss`` (single process): it builds the B x B logits matrix."""
    from open_clip.loss import SigLipLoss

    return SigLipLoss()


def build_path(path: str, model_name: str = "vit3d-tiny", volume_size: Optional[Sequence[int]] = None,
               seed: int = 0, vision: Optional[Dict[str, Any]] = None):
    """(model, loss_fn) of ``path`` ("fused" or "plain"); ``volume_size`` (X, Y, Z) becomes the model's
    ``img_size``. The weights depend only on ``seed``: both paths start from the same model."""
    from medvl.models import create_model
    from medvl.nn import SigLIPLoss

    look_up_option(path, PATHS, name="path")
    overrides = dict(vision or {})
    if volume_size is not None:
        overrides["img_size"] = [int(s) for s in volume_size]
    torch.manual_seed(seed)
    model = create_model(model_name, vision=overrides)
    if path == "fused":
        return model, SigLIPLoss()
    plain = plain_volume_path(model)
    del model
    return plain, plain_loss()


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------


def indexed(device) -> torch.device:
    """"cuda" as "cuda:<current device>": torch's property and memory-cap calls want the index
    (torch 2.11's get_device_properties refused a bare "cuda" on the H200)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _state_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def make_batch(model, batch_size: int, volume_shape: Sequence[int], device, seed: int = 0):
    """(volume, tokens): random int16 HU volumes (batch_size, *volume_shape) in ``HU_RANGE`` and the
    tokenised fixed reports, both on ``device``. ``volume_shape`` is (C, X, Y, Z) or (X, Y, Z)."""
    device = torch.device(device)
    shape = tuple(int(s) for s in volume_shape)
    shape = (1,) + shape if len(shape) == 3 else shape
    generator = torch.Generator(device=device).manual_seed(seed)
    volume = torch.randint(HU_RANGE[0], HU_RANGE[1] + 1, (int(batch_size),) + shape, dtype=torch.int16,
                           device=device, generator=generator)
    texts = [REPORTS[i % len(REPORTS)] for i in range(int(batch_size))]
    tokens = {k: v.to(device) for k, v in model.text.tokenize(texts).items()}
    return volume, tokens


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class TrainStep:
    """A train step of ``model`` and ``loss_fn`` on one fixed batch (``make_batch``): each call runs forward,
    loss, backward and an AdamW step (and waits for the device). The model is moved to ``device``, to bf16
    for ``precision="bf16-params"``, and put in training mode; ``close()`` drops the gradients, the optimizer and
    the batch."""

    def __init__(self, model, loss_fn, batch_size: int, volume_shape: Sequence[int], device="cpu",
                 precision: str = "fp32", lr: float = 1e-4, seed: int = 0):
        look_up_option(precision, PRECISIONS, name="precision")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device, self.precision, self.batch_size = torch.device(device), precision, int(batch_size)
        model.to(self.device)
        if precision == "bf16-params":
            model.to(torch.bfloat16)
        model.train()
        self.model, self.loss_fn = model, loss_fn
        self.volume, self.tokens = make_batch(model, batch_size, volume_shape, self.device, seed)
        params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.precision):
            out = self.model(self.volume, self.tokens)
        # The loss in fp32, outside autocast, as the trainer runs it.
        out = {k: v.float() if torch.is_tensor(v) else v for k, v in out.items()}
        loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        loss.backward()
        self.optimizer.step()
        del out, loss
        sync(self.device)

    def close(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = self.volume = self.tokens = None


def measure_step(model, loss_fn, batch_size: int, volume_shape: Sequence[int], steps: int = 3,
                 device="cpu", precision: str = "fp32", warmup: int = 1, lr: float = 1e-4,
                 seed: int = 0) -> Dict[str, Any]:
    """Time ``steps`` train steps (``TrainStep``: forward, loss, backward, AdamW step) after ``warmup`` more.

    Returns batch, volumes_per_s (batch / median step time), median_s, p20_s, p80_s, step_s (every timed
    step), peak_mib (see the module docstring: CUDA max_memory_allocated; CPU parameters and buffers + peak
    RSS growth, in this process), state_mib (parameters and buffers) and threads (CPU). The batch and the
    optimizer are made inside the measured window; the gradients are dropped at the end.
    """

    if int(steps) < 1 or int(warmup) < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    device = indexed(device)
    model.to(device)  # the model state is counted exactly, not in the measured growth
    if precision == "bf16-params":
        model.to(torch.bfloat16)
    state = _state_bytes(model) + _state_bytes(loss_fn)
    times: List[float] = []
    with peak_memory(device) as peak:
        step = TrainStep(model, loss_fn, batch_size, volume_shape, device, precision, lr, seed)
        try:
            for i in range(int(warmup) + int(steps)):
                sync(device)
                start = time.perf_counter()
                step()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        finally:
            step.close()
            del step
    if device.type == "cuda":
        peak_bytes = float(torch.cuda.max_memory_allocated(device))
    else:
        peak_bytes = None if peak["mib"] is None else state + peak["mib"] * 2**20
    median = statistics.median(times)
    return {"batch": int(batch_size), "volumes_per_s": batch_size / median, "median_s": median,
            "p20_s": _quantile(times, 0.2), "p80_s": _quantile(times, 0.8), "step_s": times,
            "peak_mib": None if peak_bytes is None else peak_bytes / 2**20, "state_mib": state / 2**20,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


# ---------------------------------------------------------------------------------------------
# Isolated CPU measurements
# ---------------------------------------------------------------------------------------------

class _Zygote:
    """A Python process that imports the libraries once, then forks one child per measurement: each
    measurement is a fresh process (its own heap and peak RSS) without paying the imports (several seconds)
    again. Requests and replies are JSON lines on the zygote's stdin and on a dup of its stdout (its own
    fd 1 goes to stderr, so nothing a library prints can corrupt a reply). Unlike multiprocessing's
    forkserver, it never re-imports the caller's __main__."""

    def __init__(self):
        import subprocess

        # The folder that holds the medvl package (this file is medvl/bench/throughput.py).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        code = "from medvl.bench.throughput import _serve; _serve()"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True, bufsize=1)

    def run(self, target: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        self.process.stdin.write(json.dumps({"target": target, "kwargs": kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the measurement server exited (code {self.process.wait()}); see its stderr")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait()


_ZYGOTE: Optional[_Zygote] = None


def _serve() -> None:
    """The zygote's loop (see ``_Zygote``): import, then fork a child per request line until stdin closes."""
    import importlib
    import signal
    import traceback

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for name in _PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the target, write its JSON result or error, leave without cleanup
            os.close(read_end)
            try:
                module, _, name = request["target"].partition(":")
                result = {"result": getattr(importlib.import_module(module), name)(**request["kwargs"])}
            except BaseException as e:  # noqa: BLE001 - everything goes back to the caller
                result = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                          "traceback": traceback.format_exc()}
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(result))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as inp:
            payload = inp.read()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            reply = {"killed": signal.Signals(os.WTERMSIG(status)).name}
        else:
            reply = json.loads(payload) if payload else {"error": f"exit status {os.WEXITSTATUS(status)}"}
        replies.write(json.dumps(reply) + "\n")


def run_isolated(fn: Callable[..., Any], **kwargs) -> Any:
    """``fn(**kwargs)`` in a fresh process forked from a server that has imported the libraries; ``fn`` a
    module-level function, its arguments and result JSON-serialisable. A child killed by a signal (the
    kernel's out-of-memory killer) or failing with ``MemoryError`` raises ``MemoryError``; any other
    exception in it, ``RuntimeError`` with its traceback."""
    global _ZYGOTE
    if _ZYGOTE is None or _ZYGOTE.process.poll() is not None:
        import atexit

        _ZYGOTE = _Zygote()
        atexit.register(_ZYGOTE.close)
    reply = _ZYGOTE.run(f"{fn.__module__}:{fn.__qualname__}", kwargs)
    if "killed" in reply:
        raise MemoryError(f"the measurement process was killed by {reply['killed']} (out of memory?)")
    if reply.get("type") == "MemoryError":
        raise MemoryError(f"the measurement process ran out of memory: {reply['error']}")
    if "error" in reply:
        raise RuntimeError(f"the measurement process failed: {reply['error']}\n{reply.get('traceback', '')}")
    return reply["result"]


def _measure_path(path: str, model_name: str, volume_size: Sequence[int], batch_size: int, steps: int,
                  warmup: int, device: str, precision: str, seed: int = 0, threads: Optional[int] = None):
    """Build ``path`` and measure it: the body of an isolated measurement."""
    if threads:
        torch.set_num_threads(int(threads))
    model, loss_fn = build_path(path, model_name, volume_size, seed)
    gc.collect()
    return measure_step(model, loss_fn, batch_size, tuple(volume_size), steps=steps, device=device,
                        precision=precision, warmup=warmup, seed=seed)


def _time_interleaved(paths: Sequence[str], model_name: str, volume_size: Sequence[int], batch_size: int, steps: int,
                      warmup: int, device: str, precision: str, seed: int = 0,
                      threads: Optional[int] = None) -> Dict[str, List[float]]:
    """Step times of each path, the paths taking their steps in turns in one process: on a shared machine
    the load changes from second to second, and turns give every path the same share of it."""
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(device)
    steps_by_path = {}
    for path in paths:
        model, loss_fn = build_path(path, model_name, volume_size, seed)
        steps_by_path[path] = TrainStep(model, loss_fn, batch_size, tuple(volume_size), device, precision, seed=seed)
    times: Dict[str, List[float]] = {path: [] for path in paths}
    try:
        for i in range(int(warmup) + int(steps)):
            for path, step in steps_by_path.items():
                sync(device)
                start = time.perf_counter()
                step()
                if i >= warmup:
                    times[path].append(time.perf_counter() - start)
    finally:
        for step in steps_by_path.values():
            step.close()
    return times


# ---------------------------------------------------------------------------------------------
# The largest batch in a budget
# ---------------------------------------------------------------------------------------------


def search_largest(peak: Callable[[int], float], budget: float, cap: int, start: int = 1,
                   known: Optional[Dict[int, float]] = None, resolution: float = 0.0) -> Tuple[int, List[int]]:
    """The largest batch b in [1, cap] with ``peak(b) <= budget`` for a non-decreasing ``peak`` (0 when
    even 1 does not fit), and the batches probed, in order. ``peak`` may return ``math.inf`` (out of memory).

    The first probe is ``start``. While nothing above it fits yet, the search climbs: with no slope to
    predict from, doubling the largest fitting batch lo; else to the linear prediction (the least-squares
    line through the measured peaks, ``known`` ones included, solved for the budget) when it is above lo,
    and otherwise, or right after a predicted climb that fit, to lo + step, step = 1, 2, 4, ... doubling
    after each such climb that fits. Once bracketed: the prediction clamped into the bracket, or the
    bisection when the last probe did not halve it. Memory grows about linearly with the batch, so a search
    usually takes 3 to 5 probes; it never takes more than about 4 log2(cap) + 3, and never probes a batch
    twice (nor one in ``known``). ``resolution`` > 0 stops once the bracket is within that fraction of lo
    (for noisy measurements, where the last batch is noise anyway); the answer is then a batch that fit.
    """
    cap = int(cap)
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    points: Dict[int, float] = {int(b): float(p) for b, p in (known or {}).items()}
    order: List[int] = []
    lo, hi = 0, cap + 1  # lo fits (0: nothing yet), hi does not (cap + 1: nothing yet)
    step, forced_next, widths = 1, False, []

    def predict() -> Optional[int]:
        finite = [(b, p) for b, p in points.items() if math.isfinite(p)]
        if len({b for b, _ in finite}) < 2:
            return None
        mean_b = sum(b for b, _ in finite) / len(finite)
        mean_p = sum(p for _, p in finite) / len(finite)
        slope = sum((b - mean_b) * (p - mean_p) for b, p in finite) / sum((b - mean_b) ** 2 for b, _ in finite)
        if not slope > 0:
            return None
        return math.floor(mean_b + (budget - mean_p) / slope)

    while hi - lo > max(1, math.floor(resolution * lo)):
        guess = predict()
        forced = False
        if not order:
            candidate = start
        elif hi > cap:  # nothing above fits yet: climb
            if guess is None:
                candidate = 2 * lo
            elif guess > lo and not forced_next:
                candidate = guess
            else:  # the prediction says lo, or the last predicted climb fit: lo + 1, 2, 4, ...
                candidate, forced = lo + step, True
        elif guess is None or (len(widths) >= 2 and widths[-1] > widths[-2] / 2):
            candidate = (lo + hi) // 2
        else:
            candidate = guess
        candidate = min(max(int(candidate), lo + 1), hi - 1)
        if candidate not in points:
            points[candidate] = float(peak(candidate))
            order.append(candidate)
        if points[candidate] <= budget:
            if hi > cap and lo > 0 and guess is not None:
                if forced:
                    step, forced_next = step * 2, False
                else:
                    forced_next = True
            lo = candidate
        else:
            hi = candidate
        widths.append(hi - lo)
    return lo, order


def _guess(measured: Optional[Dict[str, Any]], budget_bytes: float, cap: int) -> int:
    """A first probe from one measurement: its peak as a fixed part (the model state, its gradient and two
    AdamW moments: 4 x the state) plus a per-volume slope, solved for the budget. It overestimates the
    slope (the fixed workspaces count as per-volume), so the guess is low; the search climbs from it."""
    if not measured or not measured.get("peak_mib"):
        return 1
    fixed = 4 * measured["state_mib"] * 2**20
    per_volume = max(1.0, (measured["peak_mib"] * 2**20 - fixed) / measured["batch"])
    return int(min(cap, max(1, (budget_bytes - fixed) / per_volume)))


def _cuda_peak(model, loss_fn, batch: int, volume_shape, device, precision, steps) -> Dict[str, Any]:
    try:
        result = measure_step(model, loss_fn, batch, volume_shape, steps=steps, device=device, precision=precision,
                              warmup=1)
    except torch.cuda.OutOfMemoryError:
        result = {"batch": batch, "peak_mib": None, "oom": True}
    for p in list(model.parameters()) + list(loss_fn.parameters()):
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return result


def largest_batch(path: str, budget_bytes: float, *, model_name: str = "vit3d-tiny",
                  volume_size: Sequence[int] = (64, 64, 32), device="cpu", precision: str = "fp32", cap: int = 512,
                  start: int = 1, known: Optional[Dict[int, float]] = None, steps: int = 1, seed: int = 0,
                  threads: Optional[int] = None, resolution: Optional[float] = None) -> Dict[str, Any]:
    """The largest batch (<= cap) whose train step of ``path`` fits ``budget_bytes`` (see ``search_largest``;
    ``known``: batch -> peak bytes already measured, used for the predictions and not probed again).

    Each probe runs one warm-up step (it allocates the AdamW moments) and ``steps`` more, and compares the
    peak (as ``measure_step`` measures it) with the budget. CPU: each probe in a fresh process. CUDA: in this
    process with the caching allocator capped at the budget (``set_per_process_memory_fraction``), so an
    out-of-memory error also reads as "does not fit". ``resolution``: see ``search_largest``; default 0.02
    on CPU, where the peak RSS of one batch varies by a few percent from run to run (the allocator's
    heap), 0 on CUDA. Returns batch (0: not even 1 fits), budget_mib, cap, capped (the answer is the cap:
    more may fit), resolution and the probes (batch, peak_mib, fits) in order.
    """
    device = indexed(device)
    if resolution is None:
        resolution = 0.0 if device.type == "cuda" else 0.02
    probes: List[Dict[str, Any]] = []

    def record(result: Dict[str, Any]) -> float:
        peak = math.inf if result.get("peak_mib") is None else result["peak_mib"] * 2**20
        result["fits"] = peak <= budget_bytes
        probes.append(result)
        return peak

    if device.type == "cuda":
        model, loss_fn = build_path(path, model_name, volume_size, seed)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        try:
            best, _ = search_largest(lambda batch: record(_cuda_peak(model, loss_fn, batch, tuple(volume_size), device,
                                                                     precision, steps)),
                                     budget_bytes, cap, start, known, resolution)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            del model, loss_fn
            gc.collect()
            torch.cuda.empty_cache()
    else:
        def probe(batch: int) -> float:
            try:
                result = run_isolated(_measure_path, path=path, model_name=model_name, volume_size=tuple(volume_size),
                                      batch_size=batch, steps=steps, warmup=1, device=str(device),
                                      precision=precision, seed=seed, threads=threads)
            except MemoryError:
                result = {"batch": batch, "peak_mib": None, "oom": True}
            return record(result)

        best, _ = search_largest(probe, budget_bytes, cap, start, known, resolution)
    keep = ("batch", "peak_mib", "fits", "oom", "volumes_per_s")
    return {"path": path, "batch": best, "budget_mib": budget_bytes / 2**20, "cap": cap, "capped": best == cap,
            "resolution": resolution, "probes": [{k: p[k] for k in keep if k in p} for p in probes]}


# ---------------------------------------------------------------------------------------------
# Both paths, the table, the command line
# ---------------------------------------------------------------------------------------------


def _budget_bytes(spec: str, device: torch.device) -> float:
    if spec == "full":
        if device.type == "cuda":
            return float(torch.cuda.get_device_properties(indexed(device)).total_memory)
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return float(spec) * 2**20


def compare(model_name: str = "vit3d-tiny", volume_size: Sequence[int] = (64, 64, 32), batch_size: int = 4,
            device="cpu", precision: str = "fp32", budgets: Sequence[str] = (), steps: int = 3, warmup: int = 1,
            cap: int = 512, paths: Sequence[str] = PATHS, threads: Optional[int] = None,
            log: Callable[[str], None] = lambda line: None) -> Dict[str, Any]:
    """Time the paths at ``batch_size`` (``steps`` steps each after ``warmup``, in turns in one process),
    measure each one's peak memory (one warm-up and one measured step, a process of its own) and search its
    largest batch in each budget ("<MiB>" or "full"). CPU measurements run in fresh processes; CUDA ones
    in this process. Returns a record: config, one result per path (with largest_batch per budget) and
    the fused/plain ratios.
    """
    device = torch.device(device)
    kwargs = dict(model_name=model_name, volume_size=tuple(volume_size), batch_size=batch_size, warmup=warmup,
                  device=str(device), precision=precision, threads=threads)
    log(f"timing {', '.join(paths)} in turns at batch {batch_size} ...")
    if device.type == "cuda":
        times = _time_interleaved(paths, steps=steps, **kwargs)
        gc.collect()
        torch.cuda.empty_cache()
    else:
        times = run_isolated(_time_interleaved, paths=list(paths), steps=steps, **kwargs)
    results = []
    for path in paths:
        log(f"measuring {path}'s peak memory at batch {batch_size} ...")
        if device.type == "cuda":
            measured = _measure_path(path=path, steps=1, **kwargs)
            gc.collect()
            torch.cuda.empty_cache()
        else:
            measured = run_isolated(_measure_path, path=path, steps=1, **kwargs)
        median = statistics.median(times[path])
        measured.update(path=path, volumes_per_s=batch_size / median, median_s=median,
                        p20_s=_quantile(times[path], 0.2), p80_s=_quantile(times[path], 0.8), step_s=times[path],
                        largest_batch={})
        for spec in budgets:
            budget = _budget_bytes(spec, device)
            start = _guess(measured, budget, cap)
            log(f"  largest {path} batch in {budget / 2**20:.0f} MiB (search from {start}) ...")
            known = {measured["batch"]: measured["peak_mib"] * 2**20} if measured["peak_mib"] else None
            found = largest_batch(path, budget, model_name=model_name, volume_size=volume_size, device=device,
                                  precision=precision, cap=cap, start=start, threads=threads, known=known)
            measured["largest_batch"][spec] = found
        results.append(measured)
        log(f"  {path}: {measured['volumes_per_s']:.2f} volumes/s, peak {measured['peak_mib']:.0f} MiB")
    from medvl.bench.harness import environment

    record = {"environment": environment(device),
              "config": {"model": model_name, "volume": [1, *[int(s) for s in volume_size]], "volume_dtype": "int16",
                         "batch_size": batch_size, "precision": precision, "steps": steps, "warmup": warmup,
                         "cap": cap, "budgets": list(budgets), "optimizer": "AdamW",
                         "loss": {"fused": "medvl.nn.SigLIPLoss", "plain": "open_clip.loss.SigLipLoss"}},
              "results": results, "ratios": {}}
    by_path = {r["path"]: r for r in results}
    if {"fused", "plain"} <= set(by_path):
        fused, plain = by_path["fused"], by_path["plain"]
        ratios = {"volumes_per_s": fused["volumes_per_s"] / plain["volumes_per_s"]}
        if fused["peak_mib"] and plain["peak_mib"]:
            ratios["peak_mib"] = fused["peak_mib"] / plain["peak_mib"]
        for spec in budgets:
            a, b = fused["largest_batch"][spec]["batch"], plain["largest_batch"][spec]["batch"]
            ratios[f"largest_batch[{spec}]"] = a / b if b else math.inf
        record["ratios"] = ratios
    return record


def format_table(record: Dict[str, Any]) -> str:
    config = record["config"]
    budgets = config["budgets"]
    header = ["path", "volumes/s", "step s (p20-p80)", "peak MiB"] + [
        f"largest batch in {'device memory' if s == 'full' else f'{float(s):.0f} MiB'}" for s in budgets]
    rows = [header]
    for r in record["results"]:
        row = [r["path"], f"{r['volumes_per_s']:.2f}", f"{r['median_s']:.3f} ({r['p20_s']:.3f}-{r['p80_s']:.3f})",
               "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"]
        for spec in budgets:
            found = r["largest_batch"][spec]
            row.append(f"{found['batch']}{'+ (cap)' if found['capped'] else ''}")
        rows.append(row)
    ratios = record.get("ratios") or {}
    if ratios:
        row = ["fused/plain", f"{ratios['volumes_per_s']:.2f}x", "",
               f"{ratios['peak_mib']:.2f}x" if "peak_mib" in ratios else "-"]
        row += [f"{ratios[f'largest_batch[{s}]']:.2f}x" for s in budgets]
        rows.append(row)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    volume = "x".join(str(s) for s in config["volume"])
    title = (f"# train step (fwd + loss + bwd + AdamW) of {config['model']}, batch {config['batch_size']} of "
             f"{volume} int16, {config['precision']}, on {record['environment']['device']}; "
             f"torch {record['environment']['torch']}, git {record['environment']['git_sha']}")
    return "\n".join([title, *lines])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medvl.bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit3d-tiny")
    parser.add_argument("--size", default=None, help="volume X,Y,Z (default: the model's img_size)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of the throughput run (default 4 on "
                        "CPU, 8 on CUDA)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="default fp32 on CPU, bf16 (autocast) on CUDA")
    parser.add_argument("--budget-mib", default="", help="memory budgets, comma separated MiB or 'full' (the "
                        "device's memory); the largest batch in each is searched")
    parser.add_argument("--cap", type=int, default=512, help="largest batch the search probes")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the CPU measurement processes")
    parser.add_argument("--json", default=None, help="append the record to this JSON file (a list)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from medvl.models.factory import model_config
    from medvl.options import parse_size

    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    size = parse_size(args.size) if args.size else tuple(model_config(args.model)["vision"]["img_size"])
    budgets = [b.strip() for b in args.budget_mib.split(",") if b.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            print(f"error: unknown path {p!r}; choose from {', '.join(PATHS)}", file=sys.stderr)
            return 2
    record = compare(args.model, size, args.batch_size or (8 if device.type == "cuda" else 4), device,
                     args.precision or ("bf16" if device.type == "cuda" else "fp32"), budgets, args.steps,
                     args.warmup, args.cap, paths, args.threads, log=lambda line: print(line, file=sys.stderr,
                                                                                          flush=True))
    print(format_table(record), flush=True)
    if args.json:
        append_record(record, args.json)
        print(f"saved to {args.json}")
    return 0


if __name__ == "__main__":
    from medvl.bench.throughput import main as _main  # the importable module, so the workers unpickle it

    sys.exit(_main())
