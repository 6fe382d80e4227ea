"""Triton kernels for medvl::sigmoid_loss: the sigmoid (SigLIP) loss with its gradients fused.

The math and the outputs are those of csrc/sigmoid_loss/sigmoid_loss.h and of
medvl.reference.sigmoid_loss.sigmoid_loss_parts:

    z_ij = logit_scale * <x_i, t_j> + logit_bias
    loss_ij = max(z, 0) + log1p(exp(-|z|)) - y_ij * z       g_ij = sigmoid(z) - y_ij
    row_loss[i] = sum_j loss_ij       row_gsum[i] = sum_j g_ij
    grad_image[i] = sum_j g_ij t_j    grad_text[j] = sum_i g_ij x_i   (not scaled by logit_scale)

Two strategies, both deterministic (fixed summation orders, no atomics):

  chunked  (the GPU default) rows of images in chunks of c: S = X_c T^T by the vendor GEMM
           (cuBLAS: the GPU's own GEMM rate), then one Triton epilogue pass over S that adds the
           logit affine and the targets (pair / label / Jaccard, the diagonal at the chunk's global
           offset), sums each row's loss and g in a fixed order, and writes G over S in place; then
           grad_image[c] = G T and grad_text += G^T X_c, two more vendor GEMMs with fp32 output.
           6 B_i B_t D FLOPs, all in the GEMMs; extra memory: one c x B_t chunk of S/G, c chosen to
           fit `chunk_bytes` (512 MiB by default), plus the fp32 gradients. S is kept in bf16 for
           bf16 inputs (the GEMM accumulates in fp32 and rounds once, as plain PyTorch would) and in
           fp32 otherwise.
  fused    one tile kernel, `_sigmoid_loss_pass`, launched twice with the sides swapped, nothing
           B_i x B_t in memory:
             pass 1 (rows):    each program owns BLOCK_M images, streams every text block, and
                               writes row_loss, row_gsum and grad_image for its rows.
             pass 2 (columns): only with compute_grad; each program owns BLOCK_M texts, streams
                               every image block, recomputes S^T and G^T and writes grad_text.
           With D <= BLOCK_D the two passes cost 8 B_i B_t D FLOPs; past BLOCK_D the S tile is
           recomputed per D block. The H200 measured it 5x slower than a cuBLAS-based loss at
           B = 16384 (../shared/gpu/h200-2026-12-04), so it is chosen only where asked for
           (`strategy="fused"`), and under the interpreter, where it needs no B_i x B_t chunk.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, popcount32

__all__ = ["sigmoid_loss_forward", "block_sizes", "chunk_rows", "default_strategy", "STRATEGIES"]

# The targets by name, as medvl.ops passes them; their index is the kernels' TARGET code.
TARGET_NAMES = ("pair", "label", "jaccard")
TARGET_PAIR, TARGET_LABEL, TARGET_JACCARD = range(len(TARGET_NAMES))

# fp16 gradients: G = sigmoid(z) - y lies in [-1, 1], and SigLIP's negatives sit near
# sigmoid(-10) ~ 4.5e-5, below fp16's smallest normal (6.1e-5): cast as is, they would land in
# the subnormals with a few bits of precision (sigmoid(-15) ~ 3e-7 would be rounded by 20%, the same
# way for every negative, so the error adds up instead of averaging out). G is therefore scaled by
# 2^14 before the cast (|G| * 2^14 <= 16384 < 65504, no overflow) and the fp32 accumulator is
# scaled back by 2^-14 (exact: powers of two). bf16 has fp32's exponent range and needs no scale.
_FP16_G_SCALE = 16384.0


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def _own_keys(own_lab_ptr, rows64, row_ok, TARGET: tl.constexpr, LABEL_WORDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """What the targets need of the owned rows: class ids (label) or set sizes (Jaccard)."""
    if TARGET == 1:
        keys = tl.load(own_lab_ptr + rows64, mask=row_ok, other=0)
    elif TARGET == 2:
        keys = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for w in tl.static_range(LABEL_WORDS):
            keys += popcount32(tl.load(own_lab_ptr + rows64 * LABEL_WORDS + w, mask=row_ok, other=0))
    else:
        keys = tl.zeros((BLOCK_M,), dtype=tl.int32)
    return keys


@triton.jit
def _target_tile(own_lab_ptr, other_lab_ptr, own_keys, rows64, row_ok, cols64, col_ok, diagonal,
                 TARGET: tl.constexpr, DIAG: tl.constexpr, LABEL_WORDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 targets y. The label words are a compile-time count, so the popcount
    loop unrolls into straight-line code: no loop nested in the kernels' streaming loop (a nested
    dynamic loop is the one construct the GPU compiled differently from the interpreter when the
    Jaccard gradient came out wrong on the H200)."""
    if TARGET == 0:
        if DIAG:
            y = tl.where(diagonal, 1.0, 0.0)
        else:
            y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif TARGET == 1:
        other_label = tl.load(other_lab_ptr + cols64, mask=col_ok, other=0)
        y = tl.where(own_keys[:, None] == other_label[None, :], 1.0, 0.0)
    else:
        both = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        other_bits = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for w in tl.static_range(LABEL_WORDS):
            word_a = tl.load(own_lab_ptr + rows64 * LABEL_WORDS + w, mask=row_ok, other=0)
            word_b = tl.load(other_lab_ptr + cols64 * LABEL_WORDS + w, mask=col_ok, other=0)
            both += popcount32(word_a[:, None] & word_b[None, :])
            other_bits += popcount32(word_b)
        either = own_keys[:, None] + other_bits[None, :] - both  # |a | b| = |a| + |b| - |a & b|
        y = tl.where(either > 0, tl.math.div_rn(both.to(tl.float32), tl.maximum(either, 1).to(tl.float32)), 1.0)
        if DIAG:
            y = tl.where(diagonal, 1.0, y)
    return y


@triton.jit
def _loss_and_g(z, y):
    """Per element: the BCE-with-logits loss and g = sigmoid(z) - y, stable for any z."""
    # Stable softplus and sigmoid from one exponential: e = exp(-|z|) in (0, 1].
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    g = tl.where(z >= 0, 1.0, e) / u - y
    # log1p(e) to full precision without a log1p primitive (Goldberg's trick):
    # log(u) * e / (u - 1), whose rounding errors cancel; e itself where 1 + e rounds to 1.
    um1 = u - 1.0
    log1p_e = tl.where(um1 == 0.0, e, tl.log(u) * (e / tl.where(um1 == 0.0, 1.0, um1)))
    loss = tl.maximum(z, 0.0) + log1p_e - y * z
    return loss, g


@triton.jit
def _sigmoid_loss_pass(
    own_ptr,  # [n_own, dim]: the side whose rows this program owns (image in pass 1)
    other_ptr,  # [n_other, dim]: the side streamed through (text in pass 1)
    scale_ptr,  # 0-d float32
    bias_ptr,  # 0-d float32
    own_lab_ptr,  # label: [n_own] int64; jaccard: [n_own, LABEL_WORDS] int32; else unused
    other_lab_ptr,
    loss_ptr,  # [n_own] float32 (WRITE_STATS)
    gsum_ptr,  # [n_own] float32 (WRITE_STATS and COMPUTE_GRAD)
    grad_ptr,  # [n_own, dim] float32 (COMPUTE_GRAD)
    n_own,
    n_other,
    dim,
    TARGET: tl.constexpr,
    DIAG: tl.constexpr,  # y_ii = 1 (pair, jaccard): the texts are this rank's own
    LABEL_WORDS: tl.constexpr,
    WRITE_STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    G_SCALE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_K: tl.constexpr,  # dim <= BLOCK_K: the owned tile is loaded once, outside the loop
    SHARE_B: tl.constexpr,  # SINGLE_K and one D block of width BLOCK_K: reuse the S tile for the gradient
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)  # which BLOCK_D columns of the gradient this program owns

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_own
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    in_dtype = own_ptr.dtype.element_ty
    own_keys = _own_keys(own_lab_ptr, rows64, row_ok, TARGET, LABEL_WORDS, BLOCK_M)

    if SINGLE_K:
        a_tile = tl.load(
            own_ptr + rows64[:, None] * dim + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < dim),
            other=0.0,
        )
    if COMPUTE_GRAD:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if WRITE_STATS:
        loss_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        gsum_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)

    for start_n in range(0, n_other, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_other
        cols64 = cols.to(tl.int64)

        # S = X_own X_other^T over all of dim, fp32 accumulation.
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SINGLE_K:
            b_tile_t = tl.load(
                other_ptr + cols64[None, :] * dim + offs_k[:, None],
                mask=col_ok[None, :] & (offs_k[:, None] < dim),
                other=0.0,
            )
            s = tl.dot(a_tile, b_tile_t, s, input_precision=DOT_PRECISION)
        else:
            for k0 in range(0, dim, BLOCK_K):
                kk = k0 + offs_k
                a_k = tl.load(
                    own_ptr + rows64[:, None] * dim + kk[None, :],
                    mask=row_ok[:, None] & (kk[None, :] < dim),
                    other=0.0,
                )
                b_k = tl.load(
                    other_ptr + cols64[None, :] * dim + kk[:, None],
                    mask=col_ok[None, :] & (kk[:, None] < dim),
                    other=0.0,
                )
                s = tl.dot(a_k, b_k, s, input_precision=DOT_PRECISION)
        z = s * scale + bias

        valid = row_ok[:, None] & col_ok[None, :]
        y = _target_tile(own_lab_ptr, other_lab_ptr, own_keys, rows64, row_ok, cols64, col_ok,
                         rows[:, None] == cols[None, :], TARGET, DIAG, LABEL_WORDS, BLOCK_M, BLOCK_N)
        loss, g = _loss_and_g(z, y)
        g = tl.where(valid, g, 0.0)

        if WRITE_STATS:
            loss_acc += tl.sum(tl.where(valid, loss, 0.0), axis=1)
            if COMPUTE_GRAD:
                gsum_acc += tl.sum(g, axis=1)

        if COMPUTE_GRAD:
            if SHARE_B:
                b_grad = tl.trans(b_tile_t)
            else:
                b_grad = tl.load(
                    other_ptr + cols64[:, None] * dim + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
            # fp16/bf16: G goes into the second GEMM in the input dtype, as flash-attention does
            # with P: tensor-core rate, and G's rounding (2^-9 bf16, 2^-12 fp16 after the 2^14 scale)
            # is no larger than the inputs' own. fp32: G stays fp32 (DOT_PRECISION as for S).
            g_in = (g * G_SCALE).to(in_dtype)
            acc = tl.dot(g_in, b_grad, acc, input_precision=DOT_PRECISION)

    if WRITE_STATS:
        stats_ok = row_ok & (pid_d == 0)  # every D block has the stats; the first one writes them
        tl.store(loss_ptr + rows64, loss_acc, mask=stats_ok)
        if COMPUTE_GRAD:
            tl.store(gsum_ptr + rows64, gsum_acc, mask=stats_ok)
    if COMPUTE_GRAD:
        tl.store(
            grad_ptr + rows64[:, None] * dim + offs_d[None, :],
            acc * (1.0 / G_SCALE),
            mask=row_ok[:, None] & d_ok[None, :],
        )


@triton.jit
def _sigmoid_loss_epilogue(
    s_ptr,  # [n_rows, n_cols] S = X_chunk T^T (bf16 or fp32), row stride stride_s
    g_ptr,  # [n_rows, n_cols] G out (COMPUTE_GRAD), the input dtype, row stride stride_g; may be s_ptr
    scale_ptr,  # 0-d float32
    bias_ptr,  # 0-d float32
    own_lab_ptr,  # the chunk's rows: label [n_rows] int64; jaccard [n_rows, LABEL_WORDS] int32
    other_lab_ptr,  # every column's labels
    loss_ptr,  # [n_rows] float32
    gsum_ptr,  # [n_rows] float32 (COMPUTE_GRAD)
    n_rows,
    n_cols,
    row0,  # the chunk's first row in the whole batch: the diagonal is row0 + r == c
    stride_s,
    stride_g,
    TARGET: tl.constexpr,
    DIAG: tl.constexpr,
    LABEL_WORDS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    G_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row block of a chunk: the affine, the targets, the loss and g of every element; the
    row sums in column order (deterministic); G written over S (or into g_ptr)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    own_keys = _own_keys(own_lab_ptr, rows64, row_ok, TARGET, LABEL_WORDS, BLOCK_M)
    loss_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    gsum_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    g_dtype = g_ptr.dtype.element_ty
    for start_n in range(0, n_cols, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_cols
        cols64 = cols.to(tl.int64)
        valid = row_ok[:, None] & col_ok[None, :]
        s = tl.load(s_ptr + rows64[:, None] * stride_s + cols64[None, :], mask=valid, other=0.0).to(tl.float32)
        z = s * scale + bias
        y = _target_tile(own_lab_ptr, other_lab_ptr, own_keys, rows64, row_ok, cols64, col_ok,
                         (rows + row0)[:, None] == cols[None, :], TARGET, DIAG, LABEL_WORDS, BLOCK_M, BLOCK_N)
        loss, g = _loss_and_g(z, y)
        g = tl.where(valid, g, 0.0)
        loss_acc += tl.sum(tl.where(valid, loss, 0.0), axis=1)
        gsum_acc += tl.sum(g, axis=1)
        if COMPUTE_GRAD:
            tl.store(g_ptr + rows64[:, None] * stride_g + cols64[None, :], (g * G_SCALE).to(g_dtype), mask=valid)
    tl.store(loss_ptr + rows64, loss_acc, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(gsum_ptr + rows64, gsum_acc, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def block_sizes(n_own: int, n_other: int, dim: int, dtype: torch.dtype, compute_grad: bool,
                interpreted: bool, target: int = TARGET_PAIR) -> dict:
    """Tile sizes for one pass (a heuristic: @triton.autotune does not run under the interpreter).

    The gradient accumulator is [BLOCK_M, BLOCK_D] fp32 and must live in registers for the whole
    stream over the other side. Two ways to cover any D:
      * keep all of D in registers: cheapest in FLOPs but past D ~ 256 the accumulator
        (64 x 512 fp32 = 128 KiB of registers per program) spills;
      * give each program one BLOCK_D slice of the gradient (grid axis 1) and recompute S over all
        of D for every slice: registers stay bounded for any D, at the price of ceil(D / BLOCK_D)
        S GEMMs instead of one. Per pass the FLOPs are (n_d + 1) * 2 * B^2 * D with
        n_d = ceil(D / BLOCK_D), against 2 * 2 * B^2 * D without recompute: 16-bit (BLOCK_D 256)
        1x for D <= 256, 1.5x at D = 512, 2.5x at D = 1024; fp32 (BLOCK_D 128) 1x up to 128.
    We take the second with BLOCK_D as large as fits (256 for 16-bit, 128 for fp32), so that
    D <= 256 (the common projection widths of CLIP heads) pays nothing.
    """
    d_pow = _pow2(dim)
    if interpreted:
        # numpy per-op overhead dominates: few, large tiles.
        block_k = min(d_pow, 128)
        return dict(
            BLOCK_M=min(_pow2(n_own), 64), BLOCK_N=min(_pow2(n_other), 64), BLOCK_K=block_k,
            BLOCK_D=min(d_pow, 128), num_warps=4, num_stages=1,
        )
    wide = dtype != torch.float32  # 16-bit inputs: twice the elements per byte of shared memory
    single_k_limit = 128 if wide else 64
    block_k = d_pow if d_pow <= single_k_limit else (64 if wide else 32)
    block_d = min(d_pow, 256 if wide else 128)
    block_m = min(64 if compute_grad else 128, _pow2(n_own))
    # Register pressure (checked with ptxas -v for sm_90a, not timed): the fp32 gradient path
    # (tf32x3 splits each operand in two) and the Jaccard popcount tile spill at BLOCK_N = 64.
    jaccard = target == TARGET_JACCARD
    narrow = jaccard or (compute_grad and not wide)
    block_n = min(32 if narrow else 64, _pow2(n_other))
    num_warps = 8 if (compute_grad and (block_d >= 128 or not wide)) or block_m >= 128 else 4
    num_stages = 2 if block_k * block_n > 64 * 64 or (jaccard and compute_grad and not wide) else 3
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
                num_warps=num_warps, num_stages=num_stages)


def _launch(own, other, scale, bias, own_labels, other_labels, label_words, loss, gsum, grad,
            target, diagonal_is_pair, write_stats, compute_grad, interpreted, overrides):
    n_own, dim = own.shape
    n_other = other.shape[0]
    cfg = block_sizes(n_own, n_other, dim, own.dtype, compute_grad, interpreted, target)
    if overrides:
        cfg.update(overrides)
    n_d = triton.cdiv(dim, cfg["BLOCK_D"]) if compute_grad else 1
    single_k = dim <= cfg["BLOCK_K"]
    share_b = compute_grad and single_k and n_d == 1 and cfg["BLOCK_D"] == cfg["BLOCK_K"]
    if own.dtype == torch.float32:
        precision = fp32_dot_precision(own.device)
    else:
        precision = "tf32"  # ignored by tl.dot for 16-bit inputs
    grid = (triton.cdiv(n_own, cfg["BLOCK_M"]), n_d)
    _sigmoid_loss_pass[grid](
        own, other, scale, bias, own_labels, other_labels, loss, gsum, grad,
        n_own, n_other, dim,
        TARGET=target, DIAG=bool(diagonal_is_pair), LABEL_WORDS=label_words, WRITE_STATS=write_stats,
        COMPUTE_GRAD=compute_grad, G_SCALE=_g_scale(own.dtype), DOT_PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        SINGLE_K=single_k, SHARE_B=share_b,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _g_scale(dtype: torch.dtype) -> float:
    return _FP16_G_SCALE if dtype == torch.float16 else 1.0


def _outputs(image, text, compute_grad: bool, accumulate_text: bool):
    """(row_loss, row_gsum, grad_image, grad_text) in fp32; without gradients the last three are one empty
    tensor. ``accumulate_text``: grad_text starts at zero (the chunked strategy adds each chunk's G^T X)."""
    n_image, dim = image.shape
    device = image.device
    row_loss = torch.empty(n_image, dtype=torch.float32, device=device)
    if not compute_grad:
        none = torch.empty(0, dtype=torch.float32, device=device)
        return row_loss, none, none, none
    row_gsum = torch.empty(n_image, dtype=torch.float32, device=device)
    grad_image = torch.empty(n_image, dim, dtype=torch.float32, device=device)
    make = torch.zeros if accumulate_text else torch.empty
    grad_text = make(text.shape[0], dim, dtype=torch.float32, device=device)
    return row_loss, row_gsum, grad_image, grad_text


def _forward_fused(image, text, scale, bias, image_labels, text_labels, label_words, target, diagonal_is_pair,
                   compute_grad, interpreted, overrides):
    row_loss, row_gsum, grad_image, grad_text = _outputs(image, text, compute_grad, accumulate_text=False)
    # Pass 1: rows of images -> row_loss, row_gsum, grad_image.
    _launch(image, text, scale, bias, image_labels, text_labels, label_words,
            row_loss, row_gsum if compute_grad else row_loss, grad_image if compute_grad else row_loss,
            target, diagonal_is_pair, True, compute_grad, interpreted, overrides)
    if compute_grad:
        # Pass 2: rows of texts -> grad_text (the same kernel, sides swapped).
        _launch(text, image, scale, bias, text_labels, image_labels, label_words,
                row_loss, row_loss, grad_text,
                target, diagonal_is_pair, False, True, interpreted, overrides)
    return row_loss, row_gsum, grad_image, grad_text


# The chunk of S that the chunked strategy holds at once (its rows: as many as fit, at least 64).
CHUNK_BYTES = 512 * 2**20


def chunk_rows(n_image: int, n_text: int, bytes_per_element: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Image rows per chunk: the most whose S (and G) fit in chunk_bytes, a multiple of 64 (GEMM
    tiles), at least 64 and at most n_image."""
    rows = int(chunk_bytes) // max(1, n_text * bytes_per_element)
    rows = max(64, rows // 64 * 64)
    return min(rows, n_image)


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out: Optional[torch.Tensor] = None):
    """a @ b with fp32 accumulation and an `out_dtype` result: the vendor GEMM on a GPU (16-bit operands
    on tensor cores; fp32 follows torch's own TF32 setting), the widened product on a CPU."""
    if a.dtype == out_dtype:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype, out=out)
    result = (a.float() @ b.float()).to(out_dtype)
    return result if out is None else out.copy_(result)


def _add_mm_(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator (fp32) += a @ b, fp32 accumulation, in place."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(accumulator, a, b, out_dtype=accumulator.dtype, out=accumulator)
    else:
        accumulator += a.float() @ b.float()


def _forward_chunked(image, text, scale, bias, image_labels, text_labels, label_words, target, diagonal_is_pair,
                     compute_grad, interpreted, overrides, chunk_bytes):
    n_image = image.shape[0]
    n_text = text.shape[0]
    device = image.device
    # S in bf16 for bf16 inputs (the GEMM rounds its fp32 sums once, as plain PyTorch does), else in
    # fp32 (fp16's range is too short for unnormalised features); G in the inputs' dtype, over S
    # when the two agree.
    s_dtype = torch.bfloat16 if image.dtype == torch.bfloat16 else torch.float32
    separate_g = compute_grad and image.dtype != s_dtype
    per_element = torch.finfo(s_dtype).bits // 8 + (image.element_size() if separate_g else 0)
    rows = (overrides or {}).get("CHUNK_ROWS") or chunk_rows(n_image, n_text, per_element, chunk_bytes)
    block_m = (overrides or {}).get("BLOCK_M", 16 if not interpreted else 32)
    block_n = (overrides or {}).get("BLOCK_N", 256 if not interpreted else 64)
    row_loss, row_gsum, grad_image, grad_text = _outputs(image, text, compute_grad, accumulate_text=True)
    text_t = text.t()
    for row0 in range(0, n_image, rows):
        row1 = min(row0 + rows, n_image)
        own = image[row0:row1]
        s = _mm(own, text_t, s_dtype)
        g = torch.empty(s.shape, dtype=image.dtype, device=device) if separate_g else s
        own_labels = image_labels[row0:row1] if target != TARGET_PAIR else image_labels
        _sigmoid_loss_epilogue[(triton.cdiv(row1 - row0, block_m),)](
            s, g, scale, bias, own_labels, text_labels, row_loss[row0:row1],
            row_gsum[row0:row1] if compute_grad else row_loss, row1 - row0, n_text, row0, s.stride(0), g.stride(0),
            TARGET=target, DIAG=bool(diagonal_is_pair), LABEL_WORDS=label_words, COMPUTE_GRAD=compute_grad,
            G_SCALE=_g_scale(image.dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
        if compute_grad:
            _mm(g, text, torch.float32, out=grad_image[row0:row1])
            _add_mm_(grad_text, g.t(), own)
        del s, g
    if compute_grad and _g_scale(image.dtype) != 1.0:
        grad_image.mul_(1.0 / _g_scale(image.dtype))  # exact: a power of two
        grad_text.mul_(1.0 / _g_scale(image.dtype))
    return row_loss, row_gsum, grad_image, grad_text


STRATEGIES = ("chunked", "fused")


def default_strategy(device: torch.device) -> str:
    """chunked on a GPU (measured: the cuBLAS-based path, torch.compile of the reference, ran 2.3 ms
    against the fused kernel's 11.3 ms at B = 16384, D = 512 on an H200); fused under the
    interpreter, where it needs no B_i x B_t chunk. MEDVL_SIGMOID_STRATEGY=chunked|fused overrides
    it (medvl bench times both on a GPU)."""
    forced = os.environ.get("MEDVL_SIGMOID_STRATEGY")
    if forced:
        if forced not in STRATEGIES:
            raise ValueError(f"MEDVL_SIGMOID_STRATEGY must be one of {', '.join(STRATEGIES)}, got {forced!r}")
        return forced
    return "chunked" if device.type == "cuda" else "fused"


def sigmoid_loss_forward(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    target: str,
    diagonal_is_pair: bool,
    image_labels: Optional[torch.Tensor],
    text_labels: Optional[torch.Tensor],
    compute_grad: bool,
    *,
    strategy: Optional[str] = None,
    chunk_bytes: int = CHUNK_BYTES,
    block_overrides: Optional[dict] = None,
):
    """(row_loss[n_image], row_gsum[n_image], grad_image[n_image, D], grad_text[n_text, D]), float32.

    Inputs as validated by medvl.ops.sigmoid_loss: image (n_image, D) and text (n_text, D) of one
    floating dtype on one device; logit_scale/logit_bias 0-d float32 on that device (read by the
    kernels: no host sync); target "pair", "label" (int64 (n,) ids) or "jaccard" (int32 (n, W) packed
    bits). Without compute_grad the last three are empty and only the loss is computed.
    strategy: "chunked" or "fused" (see the module docstring; None: default_strategy). chunk_bytes
    bounds the chunked strategy's S chunk. `block_overrides` replaces tile sizes (tests use it to
    force edge tiles; CHUNK_ROWS forces the chunk's rows).
    """
    if target not in TARGET_NAMES:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGET_NAMES))}, got {target!r}")
    target = TARGET_NAMES.index(target)
    strategy = strategy or default_strategy(image.device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
    image = image.contiguous()
    text = text.contiguous()
    device = image.device
    scale = logit_scale.reshape(()).to(device=device, dtype=torch.float32)
    bias = logit_bias.reshape(()).to(device=device, dtype=torch.float32)
    interpreted = device.type == "cpu"

    label_words = 0
    if target == TARGET_LABEL:
        image_labels = image_labels.to(torch.int64).contiguous()
        text_labels = text_labels.to(torch.int64).contiguous()
    elif target == TARGET_JACCARD:
        image_labels = image_labels.to(torch.int32).contiguous()
        text_labels = text_labels.to(torch.int32).contiguous()
        label_words = image_labels.shape[1]
        if text_labels.shape[1] != label_words:
            raise ValueError(f"image and text label words differ: {label_words} vs {text_labels.shape[1]}")
    else:
        image_labels = text_labels = image  # never read; a valid pointer of the right device

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if strategy == "fused":
            return _forward_fused(image, text, scale, bias, image_labels, text_labels, label_words, target,
                                  diagonal_is_pair, compute_grad, interpreted, block_overrides)
        return _forward_chunked(image, text, scale, bias, image_labels, text_labels, label_words, target,
                                diagonal_is_pair, compute_grad, interpreted, block_overrides, chunk_bytes)
