"""Pieces every Triton kernel of medvl shares."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def popcount32(x):
    """Set bits of each int32 word (SWAR). Arithmetic shifts are safe: every shifted value is
    masked before it is used, so copies of the sign bit never reach the count."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F  # non-negative from here on
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def fp32_dot_precision(device: torch.device) -> str:
    """tl.dot's input_precision for fp32 operands, as torch's own float32 matmul precision allows:
    "highest" (torch's default) keeps IEEE fp32 products, as a plain torch matmul does, so results
    such as a 1x1x1 patch embedding of the windowed voxels stay bit-exact; "high" (TF32 or two
    bf16 terms allowed) takes "tf32x3" (three TF32 MMAs, about 21 bits); "medium" takes "tf32".
    The interpreter computes in fp32 anyway."""
    if device.type != "cuda":
        return "ieee"
    return {"highest": "ieee", "high": "tf32x3"}.get(torch.get_float32_matmul_precision(), "tf32")
