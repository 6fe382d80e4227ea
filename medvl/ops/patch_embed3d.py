"""medvl::patch_embed3d: intensity window, patchify, projection, bias and position embedding in one pass.

A 3D ViT's first layer is usually a Conv3d with kernel = stride = patch (MONAI's
``PatchEmbeddingBlock``), after a separate HU-window pass over the whole volume and before a
flatten/transpose and a position-embedding add: several passes over memory and a float copy of every
volume. The fused backends read the raw volume (int16 CT in HU, say) once per pass: patches are
gathered and windowed a tile at a time straight into the GEMM, and the backward passes gather them
again instead of keeping an im2col matrix or a windowed copy. The arithmetic is that of
``medvl.reference.patch_embed3d`` (MONAI's ``ScaleIntensityRange(clip=True)`` then Conv3d), except that
the GPU backends window with a multiply by the precomputed slope instead of PyTorch's division (within
2^-22 of the window's scale; medvl/kernels/patch_embed3d.py says how and why).
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from medvl.ops import _core, _dispatch
from medvl.ops._core import _C
from medvl.reference import patch_embed3d as reference

OP = "patch_embed3d"
# Codes shared with csrc/patch_embed3d/patch_embed3d.h (VolumeType): the float codes are DType's.
VOLUME_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int16: 3, torch.uint8: 4,
                      torch.uint16: 5}
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORWARD, GRAD_WEIGHT, GRAD_VOLUME = 0, 1, 2


def _grid(shape: Sequence[int], patch: Sequence[int]) -> Tuple[int, int, int]:
    return tuple(-(-int(s) // int(p)) for s, p in zip(shape[2:], patch))


def _window_args(window: Sequence[float]) -> Tuple[bool, List[float]]:
    """(has_window, [lo, hi, out_lo, out_hi, hi - lo, out_hi - out_lo]): the differences in double, rounded
    once to fp32 by the binding, as PyTorch evaluates the reference's Python-scalar expressions."""
    if not window:
        return False, [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    lo, hi, out_lo, out_hi = window
    return True, [lo, hi, out_lo, out_hi, hi - lo, out_hi - out_lo]


# --------------------------------------------------------------------------------------------
# Backends. Each runs one pass: forward -> (B, N, E) in out_dtype; grad weight -> (E, K) float32;
# grad volume -> volume-shaped, volume dtype.
# --------------------------------------------------------------------------------------------


def _compiled(pass_, volume, weight2d, bias, pos, patch, window, out_dtype=None, grad_out=None):
    """The C++ (cpu) or CUDA kernel. The CPU kernel computes in fp32 throughout: its weight,
    grad_out, output and volume gradient are fp32 and converted here."""
    on_cuda = volume.device.type == "cuda"
    batch, embed = volume.shape[0], weight2d.shape[0]
    grid = _grid(volume.shape, patch)
    tokens = grid[0] * grid[1] * grid[2]
    if not on_cuda:
        weight2d = weight2d.float().contiguous()
        grad_out = None if grad_out is None else grad_out.float().contiguous()
    out = grad_weight = grad_volume = None
    if pass_ == FORWARD:
        out = torch.empty(batch, tokens, embed, device=volume.device,
                          dtype=out_dtype if on_cuda else torch.float32)
    elif pass_ == GRAD_WEIGHT:
        grad_weight = torch.empty(weight2d.shape, device=volume.device, dtype=torch.float32)
    else:
        grad_volume = torch.empty(volume.shape, device=volume.device,
                                  dtype=volume.dtype if on_cuda else torch.float32)
    has_window, window4 = _window_args(window)
    code = _core.DTYPE_CODES

    arguments = dict(
        volume=volume.data_ptr(), volume_type=VOLUME_DTYPE_CODES[volume.dtype], shape=list(volume.shape),
        patch=list(patch), grid=list(grid), embed_dim=embed, weight=weight2d.data_ptr(),
        weight_type=code[weight2d.dtype], bias=_core.pointer(bias), pos_embed=_core.pointer(pos),
        has_window=has_window, window=window4, out=_core.pointer(out),
        out_type=code[out.dtype] if out is not None else 0, grad_out=_core.pointer(grad_out),
        grad_out_type=code[grad_out.dtype] if grad_out is not None else 0, grad_weight=_core.pointer(grad_weight),
        grad_volume=_core.pointer(grad_volume), workspace=0, workspace_bytes=0,
    )
    if on_cuda:
        nbytes = _C.patch_embed3d_cuda_workspace_bytes(pass_, **arguments)
        scratch = _core.workspace(nbytes, volume.device)
        arguments.update(workspace=scratch.data_ptr(), workspace_bytes=scratch.numel())
        with torch.cuda.device(volume.device):
            _C.patch_embed3d_cuda(pass_, torch.cuda.current_stream(volume.device).cuda_stream, **arguments)
    else:
        threads = _core.cpu_threads()
        nbytes = _C.patch_embed3d_cpu_workspace_bytes(pass_, threads, **arguments)
        scratch = _core.workspace(nbytes, volume.device)
        arguments.update(workspace=scratch.data_ptr(), workspace_bytes=scratch.numel())
        _C.patch_embed3d_cpu(pass_, threads, **arguments)
        del scratch
    if pass_ == FORWARD:
        return out if out.dtype == out_dtype else out.to(out_dtype)
    if pass_ == GRAD_WEIGHT:
        return grad_weight
    return grad_volume if grad_volume.dtype == volume.dtype else grad_volume.to(volume.dtype)


def _triton(pass_, volume, weight2d, bias, pos, patch, window, out_dtype=None, grad_out=None):
    from medvl.kernels import patch_embed3d as kernels

    grid = _grid(volume.shape, patch)
    window4 = tuple(window) if window else None
    if pass_ == FORWARD:
        return kernels.patch_embed3d_forward(volume, weight2d, bias, pos, tuple(patch), grid, window4, out_dtype)
    if pass_ == GRAD_WEIGHT:
        return kernels.patch_embed3d_grad_weight(volume, grad_out, tuple(patch), grid, window4)
    return kernels.patch_embed3d_grad_volume(volume, weight2d, grad_out, tuple(patch), grid, window4)


def _volume_dtype_reasons(volume: torch.Tensor) -> List[str]:
    if volume.dtype not in VOLUME_DTYPE_CODES:
        return [f"volume dtype {volume.dtype} is not one of int16, uint8, uint16, float16, bfloat16, float32"]
    return []


def _cpu_reasons(volume, weight) -> List[str]:
    return _core.cpu_backend_reasons(weight, "patch_embed3d_cpu") + _volume_dtype_reasons(volume)


def _cuda_reasons(volume, weight) -> List[str]:
    return _core.cuda_backend_reasons(weight, "patch_embed3d_cuda") + _volume_dtype_reasons(volume)


def _triton_reasons(volume, weight) -> List[str]:
    return _core.triton_backend_reasons(weight, OP) + _volume_dtype_reasons(volume)


BACKENDS = {
    "cpu": _dispatch.Backend("cpu", _cpu_reasons),
    "cuda": _dispatch.Backend("cuda", _cuda_reasons),
    "triton": _dispatch.Backend("triton", _triton_reasons),
    "reference": _dispatch.Backend("reference", lambda volume, weight: []),
}
_FUSED = {"cpu": _compiled, "cuda": _compiled, "triton": _triton}


def _reference_window(window: Sequence[float]):
    return (tuple(window[:2]), tuple(window[2:])) if window else (None, (0.0, 1.0))


def _reference_forward(volume, weight, bias, pos, patch, window, out_dtype):
    lohi, out_range = _reference_window(window)
    return reference.patch_embed3d(volume, weight, bias, pos, patch_size=patch, window=lohi, out_range=out_range,
                                   out_dtype=out_dtype, pad=True)


# --------------------------------------------------------------------------------------------
# The ops: forward, and backward as an op of its own so that it compiles too.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("medvl::patch_embed3d", mutates_args=())
def patch_embed3d_op(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    patch: List[int],
    window: List[float],
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """(B, N, E) tokens. weight: (E, C, p0, p1, p2); bias (E,) and pos_embed (N, E) float32 or None;
    window [] or [lo, hi, out_lo, out_hi]; spatial sizes not multiples of the patch are zero-padded."""
    if backend == "reference":
        return _reference_forward(volume, weight, bias, pos_embed, patch, window, out_dtype).contiguous()
    return _FUSED[backend](FORWARD, volume, weight.reshape(weight.shape[0], -1), bias, pos_embed, patch, window,
                           out_dtype=out_dtype)


@patch_embed3d_op.register_fake
def _(volume, weight, bias, pos_embed, patch, window, out_dtype, backend):
    grid = _grid(volume.shape, patch)
    return volume.new_empty((volume.shape[0], grid[0] * grid[1] * grid[2], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("medvl::patch_embed3d_backward", mutates_args=())
def patch_embed3d_backward_op(
    grad_out: torch.Tensor,
    volume: torch.Tensor,
    weight: torch.Tensor,
    patch: List[int],
    window: List[float],
    need_volume: bool,
    need_weight: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_volume, grad_weight), each empty when not needed."""
    grad_out = grad_out.contiguous()
    empty = volume.new_empty(0, dtype=weight.dtype)
    if backend == "reference":
        lohi, out_range = _reference_window(window)
        grad_volume, grad_weight = reference.patch_embed3d_backward(
            grad_out, volume, weight, patch_size=patch, window=lohi, out_range=out_range, need_volume=need_volume,
            need_weight=need_weight)
        return (grad_volume.contiguous() if need_volume else empty), (grad_weight if need_weight else empty)
    run = _FUSED[backend]
    weight2d = weight.reshape(weight.shape[0], -1)
    grad_volume = run(GRAD_VOLUME, volume, weight2d, None, None, patch, window, grad_out=grad_out) \
        if need_volume else empty
    grad_weight = run(GRAD_WEIGHT, volume, weight2d, None, None, patch, window, grad_out=grad_out) \
        .reshape(weight.shape).to(weight.dtype) if need_weight else empty
    return grad_volume, grad_weight


@patch_embed3d_backward_op.register_fake
def _(grad_out, volume, weight, patch, window, need_volume, need_weight, backend):
    empty = volume.new_empty(0, dtype=weight.dtype)
    return (torch.empty_like(volume) if need_volume else empty, torch.empty_like(weight) if need_weight else empty)


def _setup_context(ctx, inputs, output):
    volume, weight, bias, pos_embed, patch, window, out_dtype, backend = inputs
    ctx.save_for_backward(volume, weight)
    ctx.patch, ctx.window, ctx.backend = patch, window, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.pos_dtype = None if pos_embed is None else pos_embed.dtype


def _backward(ctx, grad):
    volume, weight = ctx.saved_tensors
    need_volume, need_weight, need_bias, need_pos = ctx.needs_input_grad[:4]
    grad_volume = grad_weight = grad_bias = grad_pos = None
    if need_volume or need_weight:
        gv, gw = torch.ops.medvl.patch_embed3d_backward(grad, volume, weight, ctx.patch, ctx.window, need_volume,
                                                         need_weight, ctx.backend)
        grad_volume = gv if need_volume else None
        grad_weight = gw if need_weight else None
    if need_bias:
        grad_bias = grad.sum((0, 1), dtype=torch.float32).to(ctx.bias_dtype)
    if need_pos:
        grad_pos = grad.sum(0, dtype=torch.float32).to(ctx.pos_dtype)
    return grad_volume, grad_weight, grad_bias, grad_pos, None, None, None, None


patch_embed3d_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Validation and the public function.
# --------------------------------------------------------------------------------------------


def _check_patch_size(patch_size) -> Tuple[int, int, int]:
    if isinstance(patch_size, int) and not isinstance(patch_size, bool):
        patch_size = (patch_size,) * 3
    try:
        patch = tuple(int(p) for p in patch_size)
        valid = len(patch) == 3 and all(p >= 1 and p == q for p, q in zip(patch, patch_size))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"patch_size must be a positive int or three positive ints, got {patch_size!r}")
    return patch


def _check_range(name: str, value, hint: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of numbers (lo, hi), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise ValueError(f"{name} must be finite with lo < hi, got {value!r}{hint}")
    return lo, hi


def _check_float_param(name: str, tensor, shapes: Sequence[Tuple[int, ...]], device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tuple(tensor.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the volume is on {device}")


def patch_embed3d(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    patch_size: Union[int, Sequence[int]],
    window: Optional[Tuple[float, float]] = None,
    out_range: Tuple[float, float] = (0.0, 1.0),
    out_dtype: Optional[torch.dtype] = None,
    pad: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Tokens of a 3D volume: window, patchify, project, add bias and position embedding, fused.

    Equal to ``Conv3d(kernel_size=stride=patch)(ScaleIntensityRange(window)(volume))`` flattened to
    ``(B, N, E)`` as ``.flatten(2).transpose(1, 2)``, plus ``pos_embed``, without ever storing the
    windowed volume or an im2col matrix (forward or backward).

    Args:
        volume: (B, C, S0, S1, S2) raw volume: int16 (CT in HU), uint8, uint16, float16, bfloat16 or
            float32 (float64 runs on the reference). Gradients flow to a float volume that requires grad.
        weight: (E, C, p0, p1, p2): a Conv3d (or MONAI ``PatchEmbeddingBlock``) weight as it is.
        bias: (E,) or None.
        pos_embed: (N, E) or (1, N, E) as MONAI stores it (N = tokens per volume), or None.
        patch_size: (p0, p1, p2) or one int; must match the weight's kernel.
        window: (lo, hi): clip to [lo, hi] and map linearly onto ``out_range``, as MONAI's
            ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min, b_max, clip=True)``: bit for bit on the cpu
            and reference backends; the GPU backends (cuda, triton) multiply by the slope
            (b_max - b_min) / (hi - lo) instead of dividing, within 2^-22 max(|b_min|, |b_max|, b_max - b_min)
            of it. The volume's gradient is 0 on the bounds. None: raw values as floats.
        out_range: (b_min, b_max) of the window.
        out_dtype: float32, bfloat16 or float16; default the weight's dtype. Accumulation is fp32.
            Under ``torch.autocast`` an fp32 weight is used in the autocast dtype (so is the default
            ``out_dtype``), as Conv3d would be; the volume is never cast.
        pad: spatial sizes that are not multiples of the patch raise unless ``pad=True``, which pads the
            high end of each axis with zeros *after* the window (value 0, what a pad-after-window MONAI
            pipeline gives the conv, not the window's image of 0 HU).
        backend: "cpu", "cuda", "triton", "reference" or None (automatic; MEDVL_BACKEND also forces one).

    Returns:
        (B, N, E) tokens in ``out_dtype``, in conv3d(...).flatten(2).transpose(1, 2) order.

    Example:
        >>> ct = torch.randint(-1024, 2000, (2, 1, 64, 64, 64), dtype=torch.int16)
        >>> weight = torch.randn(96, 1, 16, 16, 16) * 0.02
        >>> tokens = patch_embed3d(ct, weight, patch_size=16, window=(-1000, 400))   # (2, 64, 96)
    """
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"volume must be a torch.Tensor, got {type(volume).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if volume.dim() != 5:
        raise ValueError(f"volume must be 5-D (batch, channels, S0, S1, S2), got shape {tuple(volume.shape)}; "
                         "add the batch/channel axes with volume[None] or volume[:, None]")
    if volume.dtype not in VOLUME_DTYPE_CODES and volume.dtype != torch.float64:
        raise TypeError(f"volume dtype must be int16, uint8, uint16, float16, bfloat16, float32 (or float64), "
                        f"got {volume.dtype}")
    if volume.shape[0] == 0:
        raise ValueError("volume is an empty batch; pass at least one volume")
    patch = _check_patch_size(patch_size)
    if weight.dim() != 5:
        raise ValueError(f"weight must be 5-D (embed_dim, channels, p0, p1, p2) as a Conv3d weight, got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight has no output channels (shape {tuple(weight.shape)}); a patch embedding needs "
                         "embed_dim >= 1")
    if weight.device != volume.device:
        raise ValueError(f"weight is on {weight.device} but the volume is on {volume.device}")
    if weight.shape[1] != volume.shape[1]:
        raise ValueError(f"weight takes {weight.shape[1]} input channels but the volume has {volume.shape[1]} "
                         f"(volume shape {tuple(volume.shape)})")
    if tuple(weight.shape[2:]) != patch:
        raise ValueError(f"weight's kernel {tuple(weight.shape[2:])} differs from patch_size {patch}")
    spatial = tuple(volume.shape[2:])
    if any(s < p for s, p in zip(spatial, patch)):
        raise ValueError(f"patch {patch} is larger than the volume {spatial}")
    if not pad and any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"volume size {spatial} is not a multiple of patch {patch}; crop or resample it, or pass "
                         "pad=True to zero-pad the high end of each axis after the window")
    grid = _grid(volume.shape, patch)
    tokens, embed = grid[0] * grid[1] * grid[2], weight.shape[0]
    if bias is not None:
        _check_float_param("bias", bias, [(embed,)], volume.device)
    if pos_embed is not None:
        _check_float_param("pos_embed", pos_embed, [(tokens, embed), (1, tokens, embed)], volume.device)
    window4: List[float] = []
    if window is not None:
        lo, hi = _check_range("window", window, " (window=(lo, hi) in the volume's units, e.g. HU)")
        out_lo, out_hi = _check_range("out_range", out_range, "")
        window4 = [lo, hi, out_lo, out_hi]
    device_type = volume.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype == torch.float32:
        # The projection runs in the autocast dtype, as Conv3d or Linear would under autocast; the raw
        # volume is left as it is (bf16 would round HU values before the window).
        weight = weight.to(torch.get_autocast_dtype(device_type))
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES + (torch.float64,):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if volume.requires_grad and not volume.is_floating_point():
        raise TypeError("an integer volume can't require grad; pass a float volume for input gradients")

    volume = volume.contiguous()
    weight = weight.contiguous()
    pos = None if pos_embed is None else pos_embed.reshape(tokens, embed)
    chosen = _dispatch.choose_backend(OP, BACKENDS, backend, volume.device, volume, weight)
    if torch.float64 in (volume.dtype, weight.dtype, out_dtype):
        chosen = "reference" if backend is None else chosen
    if chosen != "reference":
        bias = None if bias is None else bias.float().contiguous() if bias.dtype != torch.float32 else bias.contiguous()
        pos = None if pos is None else pos.float().contiguous() if pos.dtype != torch.float32 else pos.contiguous()
    # Every backend computes as it does outside autocast (fp32 accumulation; the reference's own torch
    # ops not recast).
    autocast_off = (torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type)
                    else contextlib.nullcontext())
    with autocast_off:
        return torch.ops.medvl.patch_embed3d(volume, weight, bias, pos, list(patch), window4, out_dtype, chosen)
