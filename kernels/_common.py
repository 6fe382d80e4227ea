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
    """fp32 inputs: "tf32x3" (three TF32 MMAs, close to fp32) unless torch's own matmul precision
    allows TF32 ("high"/"medium"), matching what a plain torch matmul would do. "ieee" would be exact
    but runs on the CUDA cores at a fraction of the rate; the interpreter computes in fp32 anyway."""
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
