"""Triton kernels for medvl::sigmoid_loss: the sigmoid (SigLIP) loss with its gradients fused.

The math and the outputs are those of csrc/sigmoid_loss/sigmoid_loss.h and of
medvl.reference.sigmoid_loss.sigmoid_loss_parts:

    z_ij = logit_scale * <x_i, t_j> + logit_bias
    loss_ij = max(z, 0) + log1p(exp(-|z|)) - y_ij * z       g_ij = sigmoid(z) - y_ij
    row_loss[i] = sum_j loss_ij       row_gsum[i] = sum_j g_ij
    grad_image[i] = sum_j g_ij t_j    grad_text[j] = sum_i g_ij x_i   (not scaled by logit_scale)

Design: deterministic, no atomics, nothing n_image x n_text in memory. One kernel,
`_sigmoid_loss_pass`, launched twice with the roles of the two sides swapped:

  pass 1 (rows):    each program owns BLOCK_M images, streams every text block, and writes
                    row_loss, row_gsum and grad_image for its rows (its own outputs: no race).
  pass 2 (columns): only with compute_grad; each program owns BLOCK_M texts, streams every image
                    block, recomputes S^T = T X^T and G^T and writes grad_text = G^T X.
                    Every quantity is symmetric in the two sides (pair/label/Jaccard targets,
                    the diagonal), so pass 2 is pass 1 with (text, image) for (image, text).

With D <= BLOCK_D the two passes cost 8·Bi·Bt·D FLOPs (two S GEMMs + two gradient GEMMs) against the 6 of a single
pass that would add G^T X into grad_text with atomics; determinism is worth the extra GEMM here.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, popcount32

__all__ = ["sigmoid_loss_forward", "block_sizes"]

TARGET_PAIR, TARGET_LABEL, TARGET_JACCARD = 0, 1, 2

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
def _sigmoid_loss_pass(
    own_ptr,  # [n_own, dim]: the side whose rows this program owns (image in pass 1)
    other_ptr,  # [n_other, dim]: the side streamed through (text in pass 1)
    scale_ptr,  # 0-d float32
    bias_ptr,  # 0-d float32
    own_lab_ptr,  # label: [n_own] int64; jaccard: [n_own, label_words] int32; else unused
    other_lab_ptr,
    loss_ptr,  # [n_own] float32 (WRITE_STATS)
    gsum_ptr,  # [n_own] float32 (WRITE_STATS and COMPUTE_GRAD)
    grad_ptr,  # [n_own, dim] float32 (COMPUTE_GRAD)
    n_own,
    n_other,
    dim,
    label_words,
    TARGET: tl.constexpr,
    DIAG: tl.constexpr,  # y_ii = 1 (pair, jaccard): the texts are this rank's own
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

    if TARGET == 1:
        own_label = tl.load(own_lab_ptr + rows64, mask=row_ok, other=0)
    if TARGET == 2:
        own_bits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for w in range(0, label_words):
            word = tl.load(own_lab_ptr + rows64 * label_words + w, mask=row_ok, other=0)
            own_bits += popcount32(word)

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

        # Targets, from the labels of this tile only.
        valid = row_ok[:, None] & col_ok[None, :]
        diagonal = rows[:, None] == cols[None, :]
        if TARGET == 0:
            if DIAG:
                y = tl.where(diagonal, 1.0, 0.0)
            else:
                y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        elif TARGET == 1:
            other_label = tl.load(other_lab_ptr + cols64, mask=col_ok, other=0)
            y = tl.where(own_label[:, None] == other_label[None, :], 1.0, 0.0)
        else:
            both = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            other_bits = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for w in range(0, label_words):
                word_a = tl.load(own_lab_ptr + rows64 * label_words + w, mask=row_ok, other=0)
                word_b = tl.load(other_lab_ptr + cols64 * label_words + w, mask=col_ok, other=0)
                both += popcount32(word_a[:, None] & word_b[None, :])
                other_bits += popcount32(word_b)
            either = own_bits[:, None] + other_bits[None, :] - both  # |a | b| = |a| + |b| - |a & b|
            y = tl.where(either > 0, both.to(tl.float32) / tl.maximum(either, 1).to(tl.float32), 1.0)
            if DIAG:
                y = tl.where(diagonal, 1.0, y)

        # Stable softplus and sigmoid from one exponential: e = exp(-|z|) in (0, 1].
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        g = tl.where(z >= 0, 1.0, e) / u - y
        g = tl.where(valid, g, 0.0)

        if WRITE_STATS:
            # log1p(e) to full precision without a log1p primitive (Goldberg's trick):
            # log(u) * e / (u - 1), whose rounding errors cancel; e itself where 1 + e rounds to 1.
            um1 = u - 1.0
            log1p_e = tl.where(um1 == 0.0, e, tl.log(u) * (e / tl.where(um1 == 0.0, 1.0, um1)))
            loss = tl.maximum(z, 0.0) + log1p_e - y * z
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
        n_own, n_other, dim, label_words,
        TARGET=target, DIAG=bool(diagonal_is_pair), WRITE_STATS=write_stats, COMPUTE_GRAD=compute_grad,
        G_SCALE=_FP16_G_SCALE if own.dtype == torch.float16 else 1.0, DOT_PRECISION=precision,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
        SINGLE_K=single_k, SHARE_B=share_b,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def sigmoid_loss_forward(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    target: int,
    diagonal_is_pair: bool,
    image_labels: Optional[torch.Tensor],
    text_labels: Optional[torch.Tensor],
    compute_grad: bool,
    *,
    block_overrides: Optional[dict] = None,
):
    """(row_loss[n_image], row_gsum[n_image], grad_image[n_image, D], grad_text[n_text, D]), float32.

    Inputs as validated by medvl.ops.sigmoid_loss: image (n_image, D) and text (n_text, D) of one
    floating dtype on one device; logit_scale/logit_bias 0-d float32 on that device (read by the
    kernel: no host sync); target 0 pair, 1 label (int64 (n,) ids), 2 jaccard (int32 (n, W) packed
    bits). Without compute_grad the last three are empty and only the loss is computed.
    `block_overrides` replaces entries of block_sizes() (tests use it to force edge tiles).
    """
    if target not in (TARGET_PAIR, TARGET_LABEL, TARGET_JACCARD):
        raise ValueError(f"target must be 0 (pair), 1 (label) or 2 (jaccard), got {target!r}")
    image = image.contiguous()
    text = text.contiguous()
    n_image, dim = image.shape
    n_text = text.shape[0]
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

    row_loss = torch.empty(n_image, dtype=torch.float32, device=device)
    if compute_grad:
        row_gsum = torch.empty(n_image, dtype=torch.float32, device=device)
        grad_image = torch.empty(n_image, dim, dtype=torch.float32, device=device)
        grad_text = torch.empty(n_text, dim, dtype=torch.float32, device=device)
    else:
        row_gsum = grad_image = grad_text = torch.empty(0, dtype=torch.float32, device=device)

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        # Pass 1: rows of images -> row_loss, row_gsum, grad_image.
        _launch(image, text, scale, bias, image_labels, text_labels, label_words,
                row_loss, row_gsum if compute_grad else row_loss, grad_image if compute_grad else row_loss,
                target, diagonal_is_pair, True, compute_grad, interpreted, block_overrides)
        if compute_grad:
            # Pass 2: rows of texts -> grad_text (the same kernel, sides swapped).
            _launch(text, image, scale, bias, text_labels, image_labels, label_words,
                    row_loss, row_loss, grad_text,
                    target, diagonal_is_pair, False, True, interpreted, block_overrides)
    return row_loss, row_gsum, grad_image, grad_text
