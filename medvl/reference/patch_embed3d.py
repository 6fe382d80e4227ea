"""Plain-PyTorch 3D patch embedding: the oracle for every medvl::patch_embed3d backend.

Window -> zero-pad -> Conv3d(kernel = stride = patch) -> flatten(2).transpose(1, 2) -> + pos_embed,
in float32 (float64 when the volume or the weight is float64), rounded once to ``out_dtype``.
The window is MONAI's ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min, b_max, clip=True)``:

    v = clip(((x - lo) / (hi - lo)) * (b_max - b_min) + b_min, b_min, b_max)

Padding (``pad=True``) adds zeros after the window, at the high end of each axis, up to the next
multiple of the patch: the value a MONAI pipeline that pads (``SpatialPad``, method="end") after
``ScaleIntensityRange`` gives the conv. This materialises the windowed copy and conv3d's
workspace: readable, not lean.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def compute_dtype(volume: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (volume.dtype, weight.dtype) else torch.float32


def window_volume(volume: torch.Tensor, window: Optional[Tuple[float, float]], out_range: Tuple[float, float],
                  dtype: torch.dtype) -> torch.Tensor:
    """The windowed (or plainly converted) volume in `dtype`; differentiable for float volumes."""
    x = volume.to(dtype)
    if window is None:
        return x
    lo, hi = (float(v) for v in window)
    out_lo, out_hi = (float(v) for v in out_range)
    x = ((x - lo) / (hi - lo)) * (out_hi - out_lo) + out_lo
    # The gradient passes strictly between the bounds, as the kernels' and patch_embed3d_backward's:
    # pinned here rather than left to torch.clamp, whose gradient on a bound was 1 until torch's
    # minimum-norm subgradient change (pytorch/pytorch#191142) and is 0 in 2.14. The GPU check ran
    # torch 2.11, whose reference then disagreed with the kernels on every voxel at a window edge.
    inside = (x > out_lo) & (x < out_hi)
    return torch.where(inside, x, torch.clamp(x, out_lo, out_hi).detach())


def patch_embed3d(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    *,
    patch_size: Sequence[int],
    window: Optional[Tuple[float, float]] = None,
    out_range: Tuple[float, float] = (0.0, 1.0),
    out_dtype: Optional[torch.dtype] = None,
    pad: bool = False,
) -> torch.Tensor:
    """(B, N, E) tokens of `volume` (B, C, S0, S1, S2); see the module docstring."""
    dtype = compute_dtype(volume, weight)
    x = window_volume(volume, window, out_range, dtype)
    patch = tuple(int(p) for p in patch_size)
    if pad:
        extra = [(-s) % p for s, p in zip(x.shape[2:], patch)]
        x = F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))
    y = F.conv3d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride=patch)
    y = y.flatten(2).transpose(1, 2)
    if pos_embed is not None:
        y = y + pos_embed.to(dtype).reshape(1, y.shape[1], y.shape[2])
    return y.to(out_dtype or weight.dtype)


def patch_embed3d_backward(
    grad_out: torch.Tensor,
    volume: torch.Tensor,
    weight: torch.Tensor,
    *,
    patch_size: Sequence[int],
    window: Optional[Tuple[float, float]] = None,
    out_range: Tuple[float, float] = (0.0, 1.0),
    need_volume: bool = True,
    need_weight: bool = True,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_volume, grad_weight) of ``patch_embed3d(..., pad=True)`` written out, without autograd
    (torch.library ops run below autograd): the conv's own backward, then the window's derivative,
    (b_max - b_min) / (hi - lo) where the unclipped value lies strictly inside (b_min, b_max): torch.clamp's
    gradient is 0 on the bounds themselves."""
    dtype = compute_dtype(volume, weight)
    patch = tuple(int(p) for p in patch_size)
    x = window_volume(volume, window, out_range, dtype)
    spatial = x.shape[2:]
    extra = [(-s) % p for s, p in zip(spatial, patch)]
    x = F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    grad = grad_out.to(dtype).transpose(1, 2).reshape(x.shape[0], weight.shape[0], *grid)
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, x, weight.to(dtype), None, list(patch), [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1,
        [need_volume, need_weight, False])
    grad_volume = None
    if need_volume:
        grad_volume = grad_x[:, :, :spatial[0], :spatial[1], :spatial[2]]
        if window is not None:
            lo, hi = (float(v) for v in window)
            out_lo, out_hi = (float(v) for v in out_range)
            unclipped = ((volume.to(dtype) - lo) / (hi - lo)) * (out_hi - out_lo) + out_lo
            passes = (unclipped > out_lo) & (unclipped < out_hi)
            grad_volume = torch.where(passes, (grad_volume * (out_hi - out_lo)) / (hi - lo), 0.0)
        grad_volume = grad_volume.to(volume.dtype)
    return grad_volume, None if grad_weight is None else grad_weight.to(weight.dtype)
