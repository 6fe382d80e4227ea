"""Triton kernels for medvl::patch_embed3d: intensity window, patchify, projection, bias and position
embedding fused, with the two backward GEMMs.

The math is that of csrc/patch_embed3d/patch_embed3d.h and of medvl.reference.patch_embed3d:

    volume (B, C, S0, S1, S2), patch (p0, p1, p2), grid n_i = ceil(S_i / p_i), N = n0 n1 n2, K = C p0 p1 p2
    token  t = (b, g0, g1, g2) row-major:  t = b N + (g0 n1 + g1) n2 + g2
    column k = (c, q0, q1, q2) row-major:  the Conv3d weight (E, C, p0, p1, p2) flattened to (E, K)
    voxel(t, k) = (b, c, g0 p0 + q0, g1 p1 + q1, g2 p2 + q2); outside the volume v = 0 (after the window)

    window (lo, hi, out_lo, out_hi):  u = (x - lo) * r + out_lo,  r = (out_hi - out_lo) / (hi - lo)
                                      v = clamp(u, out_lo, out_hi)       (fp32, each operation rounded)
    no window:                        v = float32(x)

    out[t, e]          = sum_k v[t, k] W[e, k] + bias[e] + pos_embed[t mod N, e]   (fp32 sum, one rounding)
    grad_weight[e, k]  = sum_t grad_out[t, e] v[t, k]                              (fp32)
    grad_volume[voxel] = d * sum_e grad_out[t, e] W[e, k],  d = r where lo < x < hi, else 0; d = 1
                         without a window. Each voxel inside the volume is one (t, k): plain stores.

The window is one multiply and one add per gathered element with the precomputed r (rounded once to
fp32 from the caller's doubles), not PyTorch's IEEE division: the kernels gather a voxel once per
column tile of the output, so a division there was paid E / BLOCK_N times per voxel. The kernels
are compiled with enable_fp_fusion=False, so the multiply and the add round separately, on the GPU
and in the interpreter alike: the values are bit for bit torch's `(x.float() - lo) * r + out_lo`
clamped (lo, r, out_lo rounded to fp32), as the CUDA backend computes them too. Against PyTorch's
window (the reference) they differ by at most 2^-22 max(|out_lo|, |out_hi|, out_hi - out_lo) (2.4e-7
for (0, 1); checked over every int16 value and 200 random windows), and they are equal where the two
forms round alike, e.g. whenever hi - lo and out_hi - out_lo are powers of two ((-1, 1) -> (0, 1)).
The derivative passes strictly inside the window, lo < x < hi (fp32 comparisons, the bounds rounded
to fp32): PyTorch's rule (u strictly inside (out_lo, out_hi)) at x == lo and x == hi for bounds fp32
holds; PyTorch decides on its own rounded u, so for bounds fp32 cannot hold the two may differ within
an ulp of a bound. It matters: x == lo or x == hi happens (a zero background under a (0, ...) window).

Design: no im2col buffer and no windowed copy of the volume. Every kernel works on tiles of the
virtual [B N, K] patch matrix V whose element addresses come from index arithmetic: a tile's token
vector is split into (b, g0, g1, g2) and its column vector into (c, q0, q1, q2) with integer
div/mod (BLOCK_M + BLOCK_K divisions per tile step, against BLOCK_M * BLOCK_K loads). Each side gives
an offset vector, and the tile's addresses are their outer sum; the offsets are int32 unless some
lane could reach 2^31 (OFFS64, decided on the host from the shapes). The in-volume mask is one
packed subtraction per element (_voxel_tile): a token carries the extents of its patch that lie
inside the volume, a column its position in the patch, three bit fields in one word each. The raw
values are loaded (other=0), windowed in registers, forced to 0 where the voxel is padding (the
window maps 0 to out_lo, not 0), and fed to tl.dot. Vector gathers: where VEC (a power of two, at
most 16 bytes of voxels) divides both p2 and S2, a column tile's voxels come in aligned runs of VEC
contiguous voxels that lie all inside or all outside the volume; the kernels tell Triton so
(max_contiguous, multiple_of, max_constancy), and it loads (and grad_volume stores) each run with one
vector instruction instead of VEC scalar ones.

  forward      one program per [BLOCK_M tokens, BLOCK_N embed columns]; loop over K in BLOCK_K steps:
               acc += V tile @ W^T tile; epilogue adds bias and pos_embed in fp32, rounds once, stores.
  grad_weight  one program per [BLOCK_M embed rows, BLOCK_N columns k] (and token split s); loop over
               its tokens in BLOCK_T steps: acc += grad_out tile^T @ V tile. With few output tiles
               (small E or K, a GPU with many SMs) the tokens are split SPLIT_T ways: each split
               writes its own fp32 partial into a workspace, summed afterwards over the split axis
               by one torch reduction (a fixed order: deterministic, no atomics).
  grad_volume  one program per [BLOCK_M tokens, BLOCK_N columns k]; loop over E in BLOCK_E steps:
               acc += grad_out tile @ W tile (read straight from the (E, K) layout); the raw voxels
               are re-read for the window derivative, and the tile is stored at the voxel addresses
               of the in-volume elements (the padding columns of a token have no voxel to write).
               The (t, k) -> voxel map is a bijection onto the volume, so every voxel is written
               exactly once and the output needs no zeroing.

Operand precision of tl.dot, always with fp32 accumulation:
  * fp16/bf16 weight: V (forward) and grad_out (grad_volume) are rounded to the weight's dtype, the
    tensor-core path. grad_weight has no weight: its operand dtype is grad_out's, V rounded to it.
  * fp32 weight (fp32 grad_out for grad_weight): fp32 operands, input_precision from
    fp32_dot_precision(device) (IEEE unless torch's float32 matmul precision allows TF32).
  * One exception: a uint16 volume without a window holds values up to 65535 > 65504, fp16's
    largest finite value, so with fp16 operands V would overflow to inf. V and the other operand
    stay fp32 in that case (the weight or grad_out is widened in registers).

Floating-point arithmetic: the kernels are compiled with enable_fp_fusion=False so that the window's
"* (out_hi - out_lo) + out_lo" is not contracted into an FMA, and the division is tl.math.div_rn
(IEEE, correctly rounded), as torch computes on the CPU: the windowed values, the clip decisions at
the window's edges and hence the derivative mask are bit for bit those of the reference. The scalar
constants are rounded to fp32 on the host the way torch rounds Python scalars against a float32
tensor: lo, out_lo, out_hi themselves, and hi - lo, out_hi - out_lo computed in double first.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision

__all__ = [
    "SUPPORTED_VOLUME_DTYPES",
    "window_slope",
    "window_values",
    "patch_embed3d_forward",
    "patch_embed3d_grad_weight",
    "patch_embed3d_grad_volume",
    "block_sizes",
]

SUPPORTED_VOLUME_DTYPES = (torch.int16, torch.uint8, torch.uint16, torch.float16, torch.bfloat16, torch.float32)
_FLOAT_VOLUME_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OPERAND_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def _pack3(v0, v1, v2, FIELD: tl.constexpr):
    """Three non-negative values below 2^FIELD in one word: v0 in the high field, v2 in the low."""
    if FIELD > 10:
        packed = (v0.to(tl.int64) << (2 * FIELD)) | (v1.to(tl.int64) << FIELD) | v2.to(tl.int64)
    else:
        packed = (v0 << (2 * FIELD)) | (v1 << FIELD) | v2
    return packed


@triton.jit
def _token_part(t, t_ok, N, n1, n2, p0, p1, p2, S0, S1, S2, stride_b, stride_0,
                OFFS64: tl.constexpr, FIELD: tl.constexpr, VEC: tl.constexpr):
    """Per token: the offset of its patch corner, and `room`, the packed extents r_i = min(S_i - z_i, p_i)
    of its patch inside the volume, each field with its guard bit set (all r_i = 0 for t >= n_tokens)."""
    b = t // N
    r = t - b * N
    g0 = r // (n1 * n2)
    r = r - g0 * (n1 * n2)
    g1 = r // n2
    g2 = r - g1 * n2
    z0 = g0 * p0
    z1 = g1 * p1
    z2 = g2 * p2
    if OFFS64:
        off = b.to(tl.int64) * stride_b + z0.to(tl.int64) * stride_0 + z1.to(tl.int64) * S2 + z2
    else:
        off = b * stride_b + z0 * stride_0 + z1 * S2 + z2
    if VEC > 1:
        # A patch corner is a multiple of VEC (VEC divides p2 and S2); see _voxel_tile. The hints must
        # sit on the op that makes the value: on a function argument they are dropped.
        off = tl.multiple_of(off, VEC)
    guard: tl.constexpr = 1 << (FIELD - 1)
    guards: tl.constexpr = (guard << (2 * FIELD)) | (guard << FIELD) | guard
    room = _pack3(tl.minimum(S0 - z0, p0) | guard, tl.minimum(S1 - z1, p1) | guard,
                  tl.minimum(S2 - z2, p2) | guard, FIELD)
    room = tl.where(t_ok, room, guards)  # r_i = 0: no column fits
    return off, room


@triton.jit
def _column_part(k, k_ok, P, p1, p2, S2, stride_c, stride_0, OFFS64: tl.constexpr, FIELD: tl.constexpr,
                 VEC: tl.constexpr):
    """Per column: the offset of its voxel from the patch corner, and `need`, the packed q_i + 1
    (q0's field all ones, more than any room, for k >= K)."""
    c = k // P
    r = k - c * P
    q0 = r // (p1 * p2)
    r = r - q0 * (p1 * p2)
    q1 = r // p2
    q2 = r - q1 * p2
    if OFFS64:
        off = c.to(tl.int64) * stride_c + q0.to(tl.int64) * stride_0 + q1.to(tl.int64) * S2 + q2
    else:
        off = c * stride_c + q0 * stride_0 + q1 * S2 + q2
    if VEC > 1:
        # Aligned runs of VEC columns (k starts at a multiple of VEC) are VEC contiguous voxels.
        off = tl.max_contiguous(tl.multiple_of(off, VEC), VEC)
    need = _pack3(tl.where(k_ok, q0 + 1, (1 << (FIELD - 1)) - 1), q1 + 1, q2 + 1, FIELD)
    return off, need


@triton.jit
def _voxel_tile(tok_off, room, col_off, need, FIELD: tl.constexpr, VEC: tl.constexpr):
    """[tokens, columns] voxel offsets, and the mask of the elements that are voxels of the volume.

    The voxel is inside iff q_i < r_i on all three axes (and t, k are in range). One subtraction of
    the packed words tests all three: each field of room is guard + r_i, each of need is q_i + 1,
    with r_i, q_i + 1 <= p_i <= 2^(FIELD-1) - 2 (_field_bits), so every field's
    difference stays in [1, 2^FIELD) - no borrow crosses into the next field - and keeps its guard
    bit iff r_i - (q_i + 1) >= 0. A token carries two words through the K loop instead of five
    vectors (offset, corner, validity): for the 16-bit forward tile, ptxas (sm_90a) counts 214
    registers instead of 248 at BLOCK_K = 32, and 130 bytes of spills instead of 600 at 64."""
    offs = tok_off[:, None] + col_off[None, :]
    guard: tl.constexpr = 1 << (FIELD - 1)
    guards: tl.constexpr = (guard << (2 * FIELD)) | (guard << FIELD) | guard
    inside = ((room[:, None] - need[None, :]) & guards) == guards
    if VEC > 1:
        # Runs of VEC columns (contiguous, aligned voxels: _token_part, _column_part) lie inside or
        # outside the volume as a whole, since VEC divides every extent r2 = min(S2 - z2, p2).
        inside = tl.max_constancy(inside, [1, VEC])
    return offs, inside


@triton.jit
def _patch_values(vol_ptr, offs, inside, lo, scale, out_lo, out_hi, WINDOW: tl.constexpr):
    """Windowed fp32 values of a tile; exactly 0 at the padding."""
    x = tl.load(vol_ptr + offs, mask=inside, other=0).to(tl.float32)
    if WINDOW:
        # A multiply and an add, each rounded (enable_fp_fusion=False): see the module docstring.
        u = (x - lo) * scale + out_lo
        # torch.clamp(u, out_lo, out_hi) = min(max(u, out_lo), out_hi), NaN propagated.
        v = tl.minimum(tl.maximum(u, out_lo, propagate_nan=tl.PropagateNan.ALL), out_hi,
                       propagate_nan=tl.PropagateNan.ALL)
        # Padding is zero after the window, where the window would have given clamp(out_lo).
        v = tl.where(inside, v, 0.0)
    else:
        v = x
    return v


@triton.jit
def _patch_embed3d_fwd(
    vol_ptr,  # [B, C, S0, S1, S2] raw volume
    w_ptr,  # [E, K] fp32/fp16/bf16
    bias_ptr,  # [E] fp32 (HAS_BIAS)
    pos_ptr,  # [N, E] fp32 (HAS_POS)
    out_ptr,  # [B N, E] out dtype
    n_tokens, N, E, K, P,
    S0, S1, S2, p0, p1, p2, n1, n2,
    stride_b, stride_c, stride_0,
    lo, hi, scale, out_lo, out_hi,
    WINDOW: tl.constexpr,
    OFFS64: tl.constexpr,  # int64 voxel offsets (a volume near or past 2^31 elements)
    FIELD: tl.constexpr,  # bits per axis in the packed in-volume test (10: int32 words, 21: int64)
    VEC: tl.constexpr,  # voxels per vector gather (1: scalar)
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    OP_FP32: tl.constexpr,  # fp32 operands even for a 16-bit weight (see the module docstring)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Embed tiles vary fastest: the programs that share a token tile run together, so its voxels
    # come from DRAM once and from L2 for the other E / BLOCK_N tiles (the weight stays in L2).
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(E, BLOCK_N)
    pid_n = pid % n_tiles_n
    pid_m = pid // n_tiles_n

    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < n_tokens
    tok_off, room = _token_part(t, t_ok, N, n1, n2, p0, p1, p2, S0, S1, S2, stride_b, stride_0, OFFS64, FIELD, VEC)
    e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e_ok = e < E
    e64 = e.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    w_dtype = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        col_off, need = _column_part(k, k_ok, P, p1, p2, S2, stride_c, stride_0, OFFS64, FIELD, VEC)
        offs, inside = _voxel_tile(tok_off, room, col_off, need, FIELD, VEC)
        v = _patch_values(vol_ptr, offs, inside, lo, scale, out_lo, out_hi, WINDOW)
        w_t = tl.load(w_ptr + e64[None, :] * K + k[:, None], mask=e_ok[None, :] & k_ok[:, None], other=0.0)
        if OP_FP32:
            acc = tl.dot(v, w_t.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(v.to(w_dtype), w_t, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + e64, mask=e_ok, other=0.0)[None, :]
    if HAS_POS:
        n = (t % N).to(tl.int64)
        acc += tl.load(pos_ptr + n[:, None] * E + e64[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
    t64 = t.to(tl.int64)
    tl.store(out_ptr + t64[:, None] * E + e64[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def _patch_embed3d_grad_weight(
    vol_ptr,  # [B, C, S0, S1, S2] raw volume
    go_ptr,  # [B N, E] grad_out
    gw_ptr,  # [splits, E, K] fp32 (the output itself with one split)
    n_tokens, tokens_per_split, N, E, K, P,
    S0, S1, S2, p0, p1, p2, n1, n2,
    stride_b, stride_c, stride_0,
    lo, hi, scale, out_lo, out_hi,
    WINDOW: tl.constexpr,
    OFFS64: tl.constexpr,  # int64 voxel offsets (a volume near or past 2^31 elements)
    FIELD: tl.constexpr,  # bits per axis in the packed in-volume test (10: int32 words, 21: int64)
    VEC: tl.constexpr,  # voxels per vector gather (1: scalar)
    OP_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Embed tiles vary fastest: the programs that gather the same columns of V run together.
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(E, BLOCK_M)
    n_tiles_n = tl.cdiv(K, BLOCK_N)
    pid_m = pid % n_tiles_m
    pid_n = (pid // n_tiles_m) % n_tiles_n
    pid_s = pid // (n_tiles_m * n_tiles_n)

    e = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e_ok = e < E
    e64 = e.to(tl.int64)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K
    col_off, need = _column_part(k, k_ok, P, p1, p2, S2, stride_c, stride_0, OFFS64, FIELD, VEC)
    offs_t = tl.arange(0, BLOCK_T)
    go_dtype = go_ptr.dtype.element_ty

    t_begin = pid_s * tokens_per_split  # a multiple of BLOCK_T
    t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < t_end
        tok_off, room = _token_part(t, t_ok, N, n1, n2, p0, p1, p2, S0, S1, S2, stride_b, stride_0, OFFS64, FIELD, VEC)
        offs, inside = _voxel_tile(tok_off, room, col_off, need, FIELD, VEC)
        v = _patch_values(vol_ptr, offs, inside, lo, scale, out_lo, out_hi, WINDOW)
        g = tl.load(go_ptr + t.to(tl.int64)[:, None] * E + e64[None, :],
                    mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        if OP_FP32:
            acc = tl.dot(tl.trans(g.to(tl.float32)), v, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(tl.trans(g), v.to(go_dtype), acc, input_precision=DOT_PRECISION)

    k64 = k.to(tl.int64)
    out = gw_ptr + pid_s.to(tl.int64) * E * K + e64[:, None] * K + k64[None, :]
    tl.store(out, acc, mask=e_ok[:, None] & k_ok[None, :])


@triton.jit
def _patch_embed3d_grad_volume(
    vol_ptr,  # [B, C, S0, S1, S2] raw volume (float); read only WINDOW
    w_ptr,  # [E, K]
    go_ptr,  # [B N, E] grad_out
    gv_ptr,  # [B, C, S0, S1, S2] like the volume
    n_tokens, N, E, K, P,
    S0, S1, S2, p0, p1, p2, n1, n2,
    stride_b, stride_c, stride_0,
    lo, hi, scale, out_lo, out_hi,
    WINDOW: tl.constexpr,
    OFFS64: tl.constexpr,  # int64 voxel offsets (a volume near or past 2^31 elements)
    FIELD: tl.constexpr,  # bits per axis in the packed in-volume test (10: int32 words, 21: int64)
    VEC: tl.constexpr,  # voxels per vector gather (1: scalar)
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # Column tiles vary fastest: the programs that read the same grad_out rows run together.
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(K, BLOCK_N)
    pid_n = pid % n_tiles_n
    pid_m = pid // n_tiles_n

    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < n_tokens
    t64 = t.to(tl.int64)
    k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < K
    offs_e = tl.arange(0, BLOCK_E)
    w_dtype = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + offs_e
        e_ok = e < E
        g = tl.load(go_ptr + t64[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        w = tl.load(w_ptr + e.to(tl.int64)[:, None] * K + k[None, :], mask=e_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(g.to(w_dtype), w, acc, input_precision=DOT_PRECISION)

    tok_off, room = _token_part(t, t_ok, N, n1, n2, p0, p1, p2, S0, S1, S2, stride_b, stride_0, OFFS64, FIELD, VEC)
    col_off, need = _column_part(k, k_ok, P, p1, p2, S2, stride_c, stride_0, OFFS64, FIELD, VEC)
    offs, inside = _voxel_tile(tok_off, room, col_off, need, FIELD, VEC)
    if WINDOW:
        # The clamp passes the gradient strictly inside the window, times the window's slope r.
        x = tl.load(vol_ptr + offs, mask=inside, other=0).to(tl.float32)
        acc = tl.where((x > lo) & (x < hi), acc * scale, 0.0)
    tl.store(gv_ptr + offs, acc.to(gv_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


# --------------------------------------------------------------------------------------------
# GPU tuning table. NOT MEASURED: starting points that compile for sm_90a (Triton 3.8, ptxas, without
# a GPU) into wgmma with no (or, where noted, small) spills and fit the shared memory; settle them on
# the GPU with bench/bench_patch_embed3d.py's tile sweep (test_tile_sweep, GPU only) and replace
# these rows with its winners. Key: (kernel, operand kind "16bit" | "fp32", vector gathers); value:
# (BLOCK_M, BLOCK_N, reduction block, num_warps, num_stages). Comments: registers per thread and
# dynamic shared memory for bf16 operands and an int16 volume. A side is never wider than the next
# power of two of its extent (min 16, tl.dot's smallest).
# --------------------------------------------------------------------------------------------
GPU_TILES = {
    # BLOCK_N = 256: each voxel is gathered and windowed ceil(E / 256) times (3 at E = 768); 198 / 222
    # registers, 128 / 104 KiB. 128 x 256 spills (~450 bytes at 8 warps, ~220 at 16); 128 x 128 x 64
    # (202 registers) windows twice as often.
    ("forward", "16bit", True): (64, 256, 64, 8, 3),
    ("forward", "16bit", False): (64, 256, 64, 8, 3),
    ("grad_weight", "16bit", True): (128, 128, 64, 8, 3),  # 140 registers, 96 KiB
    ("grad_weight", "16bit", False): (128, 128, 64, 8, 3),  # 153
    ("grad_volume", "16bit", True): (128, 128, 64, 8, 3),  # 142; vector stores too
    ("grad_volume", "16bit", False): (128, 64, 64, 8, 3),  # 255 with 48 bytes of spills; 128 x 128 spills 1 KiB
    # fp32 operands (IEEE, or TF32x3 splitting each into two) spill at 128 x 128.
    ("forward", "fp32", True): (128, 64, 32, 8, 3),
    ("forward", "fp32", False): (128, 64, 32, 8, 3),
    ("grad_weight", "fp32", True): (128, 64, 32, 8, 3),
    ("grad_weight", "fp32", False): (128, 64, 32, 8, 3),
    ("grad_volume", "fp32", True): (128, 64, 32, 8, 3),
    ("grad_volume", "fp32", False): (128, 64, 32, 8, 3),
}


def block_sizes(kind: str, rows: int, cols: int, reduce: int, operand_dtype: torch.dtype,
                interpreted: bool, vector_gathers: bool = False) -> dict:
    """Tile sizes of one kernel: GPU_TILES on a GPU, small tiles under the interpreter.

    kind "forward":     rows = tokens, cols = E, reduce = K      -> BLOCK_M, BLOCK_N, BLOCK_K
    kind "grad_weight": rows = E, cols = K, reduce = tokens      -> BLOCK_M, BLOCK_N, BLOCK_T
    kind "grad_volume": rows = tokens, cols = K, reduce = E      -> BLOCK_M, BLOCK_N, BLOCK_E

    Not @triton.autotune: it does not run under the interpreter. Interpreter: every tile step costs
    numpy calls on [BLOCK, BLOCK] arrays, so tiles stay at 32 or below, which also makes small test
    shapes exercise several tiles and the masked edges.
    """
    if kind not in ("forward", "grad_weight", "grad_volume"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    red_name = {"forward": "BLOCK_K", "grad_weight": "BLOCK_T", "grad_volume": "BLOCK_E"}[kind]
    if interpreted:
        return {"BLOCK_M": min(_pow2(rows), 32), "BLOCK_N": min(_pow2(cols), 32),
                red_name: min(_pow2(reduce), 32), "num_warps": 4, "num_stages": 1}
    operands = "fp32" if operand_dtype == torch.float32 else "16bit"
    block_m, block_n, block_r, warps, stages = GPU_TILES[(kind, operands, bool(vector_gathers))]
    return {"BLOCK_M": min(block_m, _pow2(rows)), "BLOCK_N": min(block_n, _pow2(cols)),
            red_name: min(block_r, _pow2(reduce)), "num_warps": warps, "num_stages": stages}


def _split_tokens(n_tiles: int, n_tokens: int, block_t: int, device: torch.device) -> int:
    """How many ways grad_weight splits the tokens: enough programs for two waves on the GPU, each
    split keeping at least 8 token blocks (a guess, not timed: shorter splits mostly move partials)."""
    if device.type != "cuda" or n_tiles <= 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if n_tiles >= sms:
        return 1
    by_occupancy = triton.cdiv(2 * sms, n_tiles)
    by_length = max(1, n_tokens // (8 * block_t))
    return max(1, min(by_occupancy, by_length))


def _f32(x: float) -> float:
    """x rounded to fp32, as torch rounds a Python scalar operand of a float32 tensor."""
    return float(torch.tensor(float(x), dtype=torch.float64).to(torch.float32))


def window_slope(window: Sequence[float]) -> float:
    """r of the window (lo, hi, out_lo, out_hi): the spans hi - lo and out_hi - out_lo rounded to fp32 as
    torch rounds them (computed in double), their quotient in double, rounded once to fp32. The CUDA
    backend computes the same r from the same two spans (patch_embed3d_cuda.cu, make_window)."""
    lo, hi, out_lo, out_hi = (float(v) for v in window)
    return _f32(_f32(out_hi - out_lo) / _f32(hi - lo))


def window_values(volume: torch.Tensor, window: Sequence[float]) -> torch.Tensor:
    """The GPU backends' windowed values, written in torch: fp32, bit for bit what the kernels compute."""
    _, lo, _, r, out_lo, out_hi = _window_args(window)
    return torch.clamp((volume.float() - lo) * r + out_lo, out_lo, out_hi)


def _window_args(window: Optional[Sequence[float]]) -> Tuple[bool, float, float, float, float, float]:
    """(has_window, lo, hi, r, out_lo, out_hi), each rounded to fp32 (r: window_slope)."""
    if window is None:
        return False, 0.0, 1.0, 1.0, 0.0, 1.0
    if len(window) != 4:
        raise ValueError(f"window must be (lo, hi, out_lo, out_hi), got {window!r}")
    lo, hi, out_lo, out_hi = (float(v) for v in window)
    if hi == lo:
        raise ValueError(f"window needs hi != lo, got lo = hi = {lo}")
    return True, _f32(lo), _f32(hi), window_slope(window), _f32(out_lo), _f32(out_hi)


def _vector_width(volume: torch.Tensor, g: dict, column_block: int = 1 << 20) -> int:
    """Voxels per vector gather: the largest power of two up to 16 bytes of voxels that divides p2, S2
    and the column block (runs of that many columns are then aligned, contiguous voxels, all inside or
    all outside the volume: see _voxel_tile), on a 16-byte aligned volume; 1 (scalar) otherwise."""
    if volume.data_ptr() % 16:
        return 1
    vec = 16 // volume.element_size()
    while vec > 1 and (g["p2"] % vec or g["S2"] % vec or column_block % vec):
        vec //= 2
    return vec


def _geometry(volume: torch.Tensor, patch: Sequence[int], grid: Sequence[int]) -> dict:
    if volume.dim() != 5:
        raise ValueError(f"volume must be (B, C, S0, S1, S2), got shape {tuple(volume.shape)}")
    if volume.dtype not in SUPPORTED_VOLUME_DTYPES:
        raise ValueError(f"volume dtype {volume.dtype} not supported; expected one of {SUPPORTED_VOLUME_DTYPES}")
    B, C, S0, S1, S2 = (int(s) for s in volume.shape)
    p0, p1, p2 = (int(p) for p in patch)
    n0, n1, n2 = (int(g) for g in grid)
    if min(p0, p1, p2) < 1:
        raise ValueError(f"patch sizes must be positive, got {tuple(patch)}")
    expected = (-(-S0 // p0), -(-S1 // p1), -(-S2 // p2))
    if (n0, n1, n2) != expected:
        raise ValueError(f"grid {tuple(grid)} does not match ceil(size / patch) = {expected}")
    N = n0 * n1 * n2
    return dict(B=B, C=C, S0=S0, S1=S1, S2=S2, p0=p0, p1=p1, p2=p2, n1=n1, n2=n2, N=N,
                P=p0 * p1 * p2, K=C * p0 * p1 * p2, n_tokens=B * N,
                stride_b=C * S0 * S1 * S2, stride_c=S0 * S1 * S2, stride_0=S1 * S2)


def _offsets_need_int64(g: dict, token_block: int, column_block: int) -> bool:
    """Whether some lane's voxel offset can reach 2^31, masked lanes included: those of the last
    tiles run up to one block past the last token and the last column."""
    b_max = (g["n_tokens"] + token_block - 1) // g["N"]
    c_max = (g["K"] + column_block - 1) // g["P"]
    corner = (g["S0"] - 1) * g["stride_0"] + (g["S1"] - 1) * g["S2"] + g["S2"] - 1
    in_patch = (g["p0"] - 1) * g["stride_0"] + (g["p1"] - 1) * g["S2"] + g["p2"] - 1
    return b_max * g["stride_b"] + c_max * g["stride_c"] + corner + in_patch >= 2**31


def _field_bits(g: dict) -> int:
    """Bits per axis of the packed in-volume test (see _voxel_tile): values up to 2^(FIELD-1) - 2."""
    largest = max(g["p0"], g["p1"], g["p2"])
    if largest <= 2**9 - 2:
        return 10  # three fields in an int32
    if largest <= 2**20 - 2:
        return 21  # three fields in an int64
    raise ValueError(f"patch sides up to {2**20 - 2} are supported, got {largest}")


def _kernel_geometry(g: dict) -> tuple:
    return (g["S0"], g["S1"], g["S2"], g["p0"], g["p1"], g["p2"], g["n1"], g["n2"],
            g["stride_b"], g["stride_c"], g["stride_0"])


def _fp32_operands(volume_dtype: torch.dtype, has_window: bool, operand_dtype: torch.dtype) -> bool:
    """Whether V must stay fp32 (see the module docstring): fp32 operands anyway, or raw uint16 into fp16."""
    return operand_dtype == torch.float32 or (
        operand_dtype == torch.float16 and volume_dtype == torch.uint16 and not has_window)


def _precision(device: torch.device, fp32_operands: bool) -> str:
    return fp32_dot_precision(device) if fp32_operands else "tf32"  # ignored by tl.dot for 16-bit inputs


def _device_ctx(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def patch_embed3d_forward(
    volume: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    patch: Sequence[int],
    grid: Sequence[int],
    window: Optional[Sequence[float]],
    out_dtype: torch.dtype,
    *,
    block_overrides: Optional[dict] = None,
) -> torch.Tensor:
    """(B, N, E) tokens in out_dtype.

    volume (B, C, S0, S1, S2) of a SUPPORTED_VOLUME_DTYPES dtype; weight (E, K) fp32/fp16/bf16 with
    K = C p0 p1 p2; bias (E,) fp32 or None; pos_embed (N, E) fp32 or None; patch and grid 3 ints with
    grid = ceil(size / patch); window None or (lo, hi, out_lo, out_hi). `block_overrides` replaces
    entries of block_sizes() (tests use it to force edge tiles).
    """
    g = _geometry(volume, patch, grid)
    volume = volume.contiguous()
    weight = weight.contiguous()
    if weight.dim() != 2 or weight.shape[1] != g["K"] or weight.dtype not in _OPERAND_DTYPES:
        raise ValueError(f"weight must be (E, {g['K']}) fp32/fp16/bf16, got {tuple(weight.shape)} {weight.dtype}")
    E = int(weight.shape[0])
    device = volume.device
    has_window, lo, hi, scale, out_lo, out_hi = _window_args(window)
    out = torch.empty(g["B"], g["N"], E, dtype=out_dtype, device=device)
    if out.numel() == 0:
        return out
    if bias is not None:
        bias = bias.to(device=device, dtype=torch.float32).contiguous()
        if bias.shape != (E,):
            raise ValueError(f"bias must be ({E},), got {tuple(bias.shape)}")
    if pos_embed is not None:
        pos_embed = pos_embed.to(device=device, dtype=torch.float32).contiguous()
        if pos_embed.numel() != g["N"] * E:
            raise ValueError(f"pos_embed must be ({g['N']}, {E}), got {tuple(pos_embed.shape)}")

    op_fp32 = _fp32_operands(volume.dtype, has_window, weight.dtype)
    cfg = block_sizes("forward", g["n_tokens"], E, g["K"], torch.float32 if op_fp32 else weight.dtype,
                      device.type != "cuda", _vector_width(volume, g) > 1)
    if block_overrides:
        cfg.update(block_overrides)
    n_programs = triton.cdiv(g["n_tokens"], cfg["BLOCK_M"]) * triton.cdiv(E, cfg["BLOCK_N"])
    with _device_ctx(device):
        _patch_embed3d_fwd[(n_programs,)](
            volume, weight, out if bias is None else bias, out if pos_embed is None else pos_embed, out,
            g["n_tokens"], g["N"], E, g["K"], g["P"], *_kernel_geometry(g),
            lo, hi, scale, out_lo, out_hi,
            WINDOW=has_window, FIELD=cfg.get("FIELD", _field_bits(g)),
            VEC=cfg.get("VEC", _vector_width(volume, g, cfg["BLOCK_K"])),
            OFFS64=bool(cfg.get("OFFS64")) or _offsets_need_int64(g, cfg["BLOCK_M"], cfg["BLOCK_K"]),
            HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            OP_FP32=op_fp32, DOT_PRECISION=_precision(device, op_fp32),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
        )
    return out


def _check_grad_out(grad_out: torch.Tensor, g: dict) -> torch.Tensor:
    if grad_out.dtype not in _OPERAND_DTYPES:
        raise ValueError(f"grad_out must be fp32/fp16/bf16, got {grad_out.dtype}")
    if grad_out.dim() not in (2, 3) or grad_out.numel() // max(1, grad_out.shape[-1]) != g["n_tokens"]:
        raise ValueError(f"grad_out must be ({g['B']}, {g['N']}, E), got {tuple(grad_out.shape)}")
    return grad_out.contiguous()


def patch_embed3d_grad_weight(
    volume: torch.Tensor,
    grad_out: torch.Tensor,
    patch: Sequence[int],
    grid: Sequence[int],
    window: Optional[Sequence[float]],
    *,
    block_overrides: Optional[dict] = None,
) -> torch.Tensor:
    """(E, K) float32 gradient of the flattened weight. tl.dot operands are in grad_out's dtype
    (V rounded to it) for fp16/bf16 grad_out, fp32 otherwise. `block_overrides` may also set
    SPLIT_T (the token split, deterministic)."""
    g = _geometry(volume, patch, grid)
    volume = volume.contiguous()
    grad_out = _check_grad_out(grad_out, g)
    E = int(grad_out.shape[-1])
    K = g["K"]
    device = volume.device
    has_window, lo, hi, scale, out_lo, out_hi = _window_args(window)
    grad_weight = torch.empty(E, K, dtype=torch.float32, device=device)
    if grad_weight.numel() == 0:
        return grad_weight
    if g["n_tokens"] == 0:
        return grad_weight.zero_()

    op_fp32 = _fp32_operands(volume.dtype, has_window, grad_out.dtype)
    cfg = block_sizes("grad_weight", E, K, g["n_tokens"], torch.float32 if op_fp32 else grad_out.dtype,
                      device.type != "cuda", _vector_width(volume, g) > 1)
    if block_overrides:
        cfg.update(block_overrides)
    n_tiles = triton.cdiv(E, cfg["BLOCK_M"]) * triton.cdiv(K, cfg["BLOCK_N"])
    if "SPLIT_T" not in cfg:
        cfg["SPLIT_T"] = _split_tokens(n_tiles, g["n_tokens"], cfg["BLOCK_T"], device)
    block_t = cfg["BLOCK_T"]
    # Whole token blocks per split, so that only the last block of the last split is ragged.
    tokens_per_split = triton.cdiv(triton.cdiv(g["n_tokens"], cfg["SPLIT_T"]), block_t) * block_t
    split = triton.cdiv(g["n_tokens"], tokens_per_split)
    target = grad_weight if split == 1 else torch.empty(split, E, K, dtype=torch.float32, device=device)
    with _device_ctx(device):
        _patch_embed3d_grad_weight[(n_tiles * split,)](
            volume, grad_out, target,
            g["n_tokens"], tokens_per_split, g["N"], E, K, g["P"], *_kernel_geometry(g),
            lo, hi, scale, out_lo, out_hi,
            WINDOW=has_window, FIELD=cfg.get("FIELD", _field_bits(g)),
            VEC=cfg.get("VEC", _vector_width(volume, g, cfg["BLOCK_N"])),
            OFFS64=bool(cfg.get("OFFS64")) or _offsets_need_int64(g, block_t, cfg["BLOCK_N"]),
            OP_FP32=op_fp32, DOT_PRECISION=_precision(device, op_fp32),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=block_t,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
        )
        if split > 1:
            torch.sum(target, dim=0, out=grad_weight)  # no atomics: the same order on every run
    return grad_weight


def patch_embed3d_grad_volume(
    volume: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    patch: Sequence[int],
    grid: Sequence[int],
    window: Optional[Sequence[float]],
    *,
    block_overrides: Optional[dict] = None,
) -> torch.Tensor:
    """Gradient of the volume, with its shape and dtype (float volumes only). tl.dot operands are in
    the weight's dtype (grad_out rounded to it)."""
    g = _geometry(volume, patch, grid)
    if volume.dtype not in _FLOAT_VOLUME_DTYPES:
        raise ValueError(f"grad_volume needs a float volume (float32/float16/bfloat16), got {volume.dtype}")
    volume = volume.contiguous()
    weight = weight.contiguous()
    if weight.dim() != 2 or weight.shape[1] != g["K"] or weight.dtype not in _OPERAND_DTYPES:
        raise ValueError(f"weight must be (E, {g['K']}) fp32/fp16/bf16, got {tuple(weight.shape)} {weight.dtype}")
    grad_out = _check_grad_out(grad_out, g)
    E = int(weight.shape[0])
    if grad_out.shape[-1] != E:
        raise ValueError(f"grad_out has {grad_out.shape[-1]} columns, the weight {E} rows")
    device = volume.device
    has_window, lo, hi, scale, out_lo, out_hi = _window_args(window)
    grad_volume = torch.empty_like(volume)
    if grad_volume.numel() == 0:
        return grad_volume
    if E == 0:
        return grad_volume.zero_()

    op_fp32 = weight.dtype == torch.float32
    cfg = block_sizes("grad_volume", g["n_tokens"], g["K"], E, weight.dtype, device.type != "cuda",
                      _vector_width(volume, g) > 1)
    if block_overrides:
        cfg.update(block_overrides)
    n_programs = triton.cdiv(g["n_tokens"], cfg["BLOCK_M"]) * triton.cdiv(g["K"], cfg["BLOCK_N"])
    with _device_ctx(device):
        _patch_embed3d_grad_volume[(n_programs,)](
            volume, weight, grad_out, grad_volume,
            g["n_tokens"], g["N"], E, g["K"], g["P"], *_kernel_geometry(g),
            lo, hi, scale, out_lo, out_hi,
            WINDOW=has_window, FIELD=cfg.get("FIELD", _field_bits(g)),
            VEC=cfg.get("VEC", _vector_width(volume, g, cfg["BLOCK_N"])),
            OFFS64=bool(cfg.get("OFFS64")) or _offsets_need_int64(g, cfg["BLOCK_M"], cfg["BLOCK_N"]),
            DOT_PRECISION=_precision(device, op_fp32),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_E=cfg["BLOCK_E"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False,
        )
    return grad_volume
