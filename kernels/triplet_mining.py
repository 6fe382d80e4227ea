"""Triton kernels for medvl::triplet_mining: batch-hard, semi-hard and entity-score mining.

The rules, ties included, are those of csrc/triplet_mining/triplet_mining.h and of
medvl.reference.triplet_mining:

    squared(i, j) = max(|a_i|^2 + |c_j|^2 - 2 <a_i, c_j>, 0)     (euclidean mines the same: sqrt is monotone)
    cosine(i, j)  = 1 - <a_i, c_j> / (max(|a_i|, 1e-12) * max(|c_j|, 1e-12))
    key(i, j)     = N / D in float64, the exact entity score times its denominator: integer weights w_k,
                    b_k = |a & c|, e_k = |a | c| (both 1 for two empty sets), N = sum_k w_k b_k prod_{m!=k} e_m,
                    D = e0 e1 e2 (integers, exact in float64), one IEEE division

    batch_hard: positive = argmax distance over same-label candidates, negative = argmin over the others.
    entities:   positive = argmax (key, distance); negative = argmin (key, distance) over lo <= key < hi,
                dropped (-1) unless its score is below the positive's.
    semi_hard:  per positive pair (i, p): argmin distance over negatives with d(i, j) > d(i, p); else the
                farthest negative; -1 when anchor i has no negative.
    Every remaining tie goes to the lowest candidate index; -1 means "none".

Design: deterministic, no atomics, nothing n_anchor x n_candidate in memory. Each program owns BLOCK_M
anchors and sweeps the candidates in BLOCK_N tiles. A tile of dot products comes from tl.dot (fp32
accumulation) over D in BLOCK_K chunks; the squared norms (or the clamped norms, for cosine) are a
small O(n D) torch op with the reference's own expression. Per anchor the kernel keeps running
(value, index) extrema in registers: inside a tile the extreme value is a max/min reduction and its
index the minimum of the matching column indices; across tiles a later tile wins only on a strict
improvement, so ties stay with the lowest index (the tiles are visited in ascending order).

Semi-hard: the per-pair state does not fit a per-anchor register (an anchor has a variable number of
positive pairs), so the kernel walks each anchor's pairs in chunks of BLOCK_S slots, holding a
[BLOCK_M, BLOCK_S] state. For each chunk it sweeps the candidate tiles twice with one loop: the first
sweep picks d(i, p) out of the very same distance tiles (so the positive's distance and the negatives'
distances come from identical arithmetic and exact ties behave as in the reference), the second keeps
the nearest negative beyond it with [BLOCK_M, BLOCK_S, BLOCK_N] comparisons. The tile GEMM is thus
recomputed 2 * ceil(longest run of pairs in the block / BLOCK_S) times: cheap for the usual few
positives per anchor, linear in the positives per anchor otherwise.

Floating-point arithmetic: float32 divisions use tl.math.div_rn (IEEE, correctly rounded) rather
than the approximate default; the entity keys divide in float64, which Triton always rounds as IEEE
says (their numerators and denominators are integers, so no contraction or order can change them). The kernels are compiled
with enable_fp_fusion=False so that the distance epilogue rounds as the reference does. The tile
GEMMs run on the tensor cores either way (fusion only concerns element-wise code). The anchors' and
candidates' norms arrive from the caller (medvl.reference.triplet_mining.row_norms: correctly
rounded square roots on every device).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, popcount32

__all__ = ["SUPPORTED_STRATEGIES", "triplet_mining_forward", "block_sizes"]

STRATEGY_BATCH_HARD, STRATEGY_SEMI_HARD, STRATEGY_ENTITIES = 0, 1, 2
DISTANCE_EUCLIDEAN, DISTANCE_SQUARED, DISTANCE_COSINE = 0, 1, 2
SUPPORTED_STRATEGIES = {STRATEGY_BATCH_HARD, STRATEGY_SEMI_HARD, STRATEGY_ENTITIES}

_NO_INDEX = tl.constexpr(2147483647)  # "no column" in the index reductions (int32 max; candidates < 2^31)


# --------------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------------


@triton.jit
def _distance_tile(
    a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
    DISTANCE: tl.constexpr, SINGLE_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] fp32 distances (squared for both euclidean kinds). a_norm: [BLOCK_M] squared
    norms, or clamped norms for cosine; a_tile: the anchors' [BLOCK_M, BLOCK_K] tile when SINGLE_K."""
    offs_k = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SINGLE_K:
        c_t = tl.load(
            c_ptr + cols64[None, :] * dim + offs_k[:, None],
            mask=col_ok[None, :] & (offs_k[:, None] < dim),
            other=0.0,
        )
        dot = tl.dot(a_tile, c_t, dot, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, dim, BLOCK_K):
            kk = k0 + offs_k
            a_k = tl.load(
                a_ptr + rows64[:, None] * dim + kk[None, :],
                mask=row_ok[:, None] & (kk[None, :] < dim),
                other=0.0,
            )
            c_k = tl.load(
                c_ptr + cols64[None, :] * dim + kk[:, None],
                mask=col_ok[None, :] & (kk[:, None] < dim),
                other=0.0,
            )
            dot = tl.dot(a_k, c_k, dot, input_precision=DOT_PRECISION)
    c_norm = tl.load(c_norm_ptr + cols64, mask=col_ok, other=1.0)
    if DISTANCE == 2:
        # 1 - dot / (|a| |c|), the norms already clamped to 1e-12 (reference order: product, then divide).
        dist = 1.0 - tl.math.div_rn(dot, a_norm[:, None] * c_norm[None, :])
    else:
        # (|a|^2 + |c|^2) - 2 dot; 2 * dot is exact, so even a fused form rounds the same.
        dist = tl.maximum((a_norm[:, None] + c_norm[None, :]) - 2.0 * dot, 0.0)
    return dist


@triton.jit
def _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, start, count, a_count,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float64 (|a & c|, |a | c|) of one entity kind: words [start, start + count)
    of each row; a_count: the anchors' set sizes for that kind. Two empty sets: (1, 1), IoU 1."""
    both = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    c_count = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for w in range(start, start + count):
        word_a = tl.load(a_bits_ptr + rows64 * n_words + w, mask=row_ok, other=0)
        word_c = tl.load(c_bits_ptr + cols64 * n_words + w, mask=col_ok, other=0)
        both += popcount32(word_a[:, None] & word_c[None, :])
        c_count += popcount32(word_c)
    either = a_count[:, None] + c_count[None, :] - both  # |a | c| = |a| + |c| - |a & c|
    empty = either == 0
    return tl.where(empty, 1, both).to(tl.float64), tl.where(empty, 1, either).to(tl.float64)


@triton.jit
def _set_sizes(bits_ptr, rows64, row_ok, n_words, start, count, BLOCK_M: tl.constexpr):
    total = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for w in range(start, start + count):
        total += popcount32(tl.load(bits_ptr + rows64 * n_words + w, mask=row_ok, other=0))
    return total


@triton.jit
def _mine_per_anchor(
    a_ptr,  # [n_anchor, dim] fp32/fp16/bf16
    c_ptr,  # [n_candidate, dim], same dtype
    a_norm_ptr,  # [n_anchor] fp32: squared norms, or clamped norms (cosine)
    c_norm_ptr,  # [n_candidate] fp32
    a_lab_ptr,  # batch_hard: [n_anchor] int64
    c_lab_ptr,  # batch_hard: [n_candidate] int64
    a_bits_ptr,  # entities: [n_anchor, n_words] int32
    c_bits_ptr,  # entities: [n_candidate, n_words] int32
    pos_ptr,  # [n_anchor] int64 out
    neg_ptr,  # [n_anchor] int64 out
    n_anchor,
    n_candidate,
    dim,
    words0,
    words1,
    words2,
    weight0,
    weight1,
    weight2,
    score_low,
    score_high,
    STRATEGY: tl.constexpr,  # 0 batch_hard, 2 entities
    DISTANCE: tl.constexpr,
    WITHIN: tl.constexpr,
    SINGLE_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_anchor
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    a_norm = tl.load(a_norm_ptr + rows64, mask=row_ok, other=1.0)
    if SINGLE_K:
        a_tile = tl.load(
            a_ptr + rows64[:, None] * dim + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < dim),
            other=0.0,
        )
    else:
        a_tile = a_norm  # unused

    # Running extrema: index -1 = none yet. "pos" is the farthest positive (batch_hard) or the
    # top (score, distance) (entities); "neg" the nearest negative or the lowest in-range score.
    pos_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    pos_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    neg_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    neg_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if STRATEGY == 0:
        a_lab = tl.load(a_lab_ptr + rows64, mask=row_ok, other=0)
    else:
        pos_s = tl.zeros((BLOCK_M,), dtype=tl.float64)
        neg_s = tl.zeros((BLOCK_M,), dtype=tl.float64)
        n_words = words0 + words1 + words2
        a_count0 = _set_sizes(a_bits_ptr, rows64, row_ok, n_words, 0, words0, BLOCK_M)
        a_count1 = _set_sizes(a_bits_ptr, rows64, row_ok, n_words, words0, words1, BLOCK_M)
        a_count2 = _set_sizes(a_bits_ptr, rows64, row_ok, n_words, words0 + words1, words2, BLOCK_M)
        # Integer arguments (weights and range times the denominator), exact in float64; tl.cast also
        # takes the constexpr that Triton makes of an argument equal to 1.
        w0 = tl.cast(weight0, tl.float64)
        w1 = tl.cast(weight1, tl.float64)
        w2 = tl.cast(weight2, tl.float64)
        lo = tl.cast(score_low, tl.float64)
        hi = tl.cast(score_high, tl.float64)

    for start_n in range(0, n_candidate, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_candidate
        cols64 = cols.to(tl.int64)
        allowed = row_ok[:, None] & col_ok[None, :]
        if WITHIN:
            allowed = allowed & (rows[:, None] != cols[None, :])

        if STRATEGY == 0:
            dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                                  DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            c_lab = tl.load(c_lab_ptr + cols64, mask=col_ok, other=0)
            same = a_lab[:, None] == c_lab[None, :]
            # Farthest positive.
            is_pos = allowed & same
            t_d = tl.max(tl.where(is_pos, dist, float("-inf")), axis=1)
            t_idx = tl.min(tl.where(is_pos & (dist == t_d[:, None]), cols[None, :], _NO_INDEX), axis=1)
            take = (t_idx != _NO_INDEX) & ((pos_idx < 0) | (t_d > pos_d))
            pos_idx = tl.where(take, t_idx, pos_idx)
            pos_d = tl.where(take, t_d, pos_d)
            # Nearest negative.
            is_neg = allowed & (a_lab[:, None] != c_lab[None, :])
            t_d = tl.min(tl.where(is_neg, dist, float("inf")), axis=1)
            t_idx = tl.min(tl.where(is_neg & (dist == t_d[:, None]), cols[None, :], _NO_INDEX), axis=1)
            take = (t_idx != _NO_INDEX) & ((neg_idx < 0) | (t_d < neg_d))
            neg_idx = tl.where(take, t_idx, neg_idx)
            neg_d = tl.where(take, t_d, neg_d)
        else:
            # The exact score key N / D, folding the kinds in as the reference does (the integers are
            # exact, so the fold order cannot matter; the one division rounds as IEEE says).
            both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, 0,
                                         words0, a_count0, BLOCK_M, BLOCK_N)
            numerator = w0 * both
            denominator = either
            both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, words0,
                                         words1, a_count1, BLOCK_M, BLOCK_N)
            numerator = numerator * either + w1 * both * denominator
            denominator = denominator * either
            both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words,
                                         words0 + words1, words2, a_count2, BLOCK_M, BLOCK_N)
            numerator = numerator * either + w2 * both * denominator
            denominator = denominator * either
            # float64 `/` is IEEE division (div.rn.f64; only float32 `/` is approximate in Triton).
            score = numerator / denominator
            dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                                  DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            # Positive: the highest score, then the largest distance, then the lowest index.
            t_s = tl.max(tl.where(allowed, score, float("-inf")), axis=1)
            top = allowed & (score == t_s[:, None])
            t_d = tl.max(tl.where(top, dist, float("-inf")), axis=1)
            t_idx = tl.min(tl.where(top & (dist == t_d[:, None]), cols[None, :], _NO_INDEX), axis=1)
            take = (t_idx != _NO_INDEX) & (
                (pos_idx < 0) | (t_s > pos_s) | ((t_s == pos_s) & (t_d > pos_d)))
            pos_idx = tl.where(take, t_idx, pos_idx)
            pos_s = tl.where(take, t_s, pos_s)
            pos_d = tl.where(take, t_d, pos_d)
            # Negative: the lowest score in [lo, hi), then the smallest distance, then the lowest index.
            in_range = allowed & (score >= lo) & (score < hi)
            t_s = tl.min(tl.where(in_range, score, float("inf")), axis=1)
            low = in_range & (score == t_s[:, None])
            t_d = tl.min(tl.where(low, dist, float("inf")), axis=1)
            t_idx = tl.min(tl.where(low & (dist == t_d[:, None]), cols[None, :], _NO_INDEX), axis=1)
            take = (t_idx != _NO_INDEX) & (
                (neg_idx < 0) | (t_s < neg_s) | ((t_s == neg_s) & (t_d < neg_d)))
            neg_idx = tl.where(take, t_idx, neg_idx)
            neg_s = tl.where(take, t_s, neg_s)
            neg_d = tl.where(take, t_d, neg_d)

    if STRATEGY == 2:
        # No negative unless it scores below the positive (then it is less related than the positive).
        neg_idx = tl.where((neg_idx >= 0) & (pos_idx >= 0) & (neg_s < pos_s), neg_idx, -1)
    tl.store(pos_ptr + rows64, pos_idx.to(tl.int64), mask=row_ok)
    tl.store(neg_ptr + rows64, neg_idx.to(tl.int64), mask=row_ok)


@triton.jit
def _mine_semi_hard(
    a_ptr,
    c_ptr,
    a_norm_ptr,
    c_norm_ptr,
    a_lab_ptr,  # [n_anchor] int64
    c_lab_ptr,  # [n_candidate] int64
    offsets_ptr,  # [n_anchor + 1] int64: anchor i's pairs are offsets[i]:offsets[i + 1]
    pair_pos_ptr,  # [P] int64: the positive candidate of each pair
    neg_ptr,  # [P] int64 out
    n_anchor,
    n_candidate,
    dim,
    DISTANCE: tl.constexpr,
    SINGLE_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_anchor
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_s = tl.arange(0, BLOCK_S)

    a_norm = tl.load(a_norm_ptr + rows64, mask=row_ok, other=1.0)
    if SINGLE_K:
        a_tile = tl.load(
            a_ptr + rows64[:, None] * dim + offs_k[None, :],
            mask=row_ok[:, None] & (offs_k[None, :] < dim),
            other=0.0,
        )
    else:
        a_tile = a_norm  # unused
    a_lab = tl.load(a_lab_ptr + rows64, mask=row_ok, other=0)
    first = tl.load(offsets_ptr + rows64, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows64 + 1, mask=row_ok, other=0) - first
    longest = tl.max(count, axis=0)
    n_tiles = tl.cdiv(n_candidate, BLOCK_N)

    for s0 in range(0, longest, BLOCK_S):
        slot = s0 + offs_s
        pair_ok = row_ok[:, None] & (slot[None, :] < count[:, None])  # [BLOCK_M, BLOCK_S]
        pair = first[:, None] + slot[None, :]
        pair_pos = tl.load(pair_pos_ptr + pair, mask=pair_ok, other=-1).to(tl.int32)
        d_ap = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
        best_idx = tl.full((BLOCK_M, BLOCK_S), -1, dtype=tl.int32)
        best_d = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
        far_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
        far_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
        # Two sweeps in one loop, so both see the distances from the same code:
        # it < n_tiles picks d(i, p) out of the tiles, it >= n_tiles mines the negatives.
        for it in range(0, 2 * n_tiles):
            start_n = (it % n_tiles) * BLOCK_N
            cols = start_n + offs_n
            col_ok = cols < n_candidate
            cols64 = cols.to(tl.int64)
            dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                                  DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            dist3 = dist[:, None, :]
            if it < n_tiles:
                hit = pair_pos[:, :, None] == cols[None, None, :]  # at most one column per pair, overall
                d_ap += tl.sum(tl.where(hit, dist3, 0.0), axis=2)
            else:
                c_lab = tl.load(c_lab_ptr + cols64, mask=col_ok, other=0)
                is_neg = row_ok[:, None] & col_ok[None, :] & (a_lab[:, None] != c_lab[None, :])
                # Farthest negative of the anchor (the fallback).
                t_d = tl.max(tl.where(is_neg, dist, float("-inf")), axis=1)
                t_idx = tl.min(tl.where(is_neg & (dist == t_d[:, None]), cols[None, :], _NO_INDEX), axis=1)
                take = (t_idx != _NO_INDEX) & ((far_idx < 0) | (t_d > far_d))
                far_idx = tl.where(take, t_idx, far_idx)
                far_d = tl.where(take, t_d, far_d)
                # Nearest negative strictly beyond each pair's positive.
                beyond = is_neg[:, None, :] & (dist3 > d_ap[:, :, None])  # [BLOCK_M, BLOCK_S, BLOCK_N]
                t_d2 = tl.min(tl.where(beyond, dist3, float("inf")), axis=2)
                cols3 = cols[None, None, :]
                t_idx2 = tl.min(tl.where(beyond & (dist3 == t_d2[:, :, None]), cols3, _NO_INDEX), axis=2)
                take2 = (t_idx2 != _NO_INDEX) & ((best_idx < 0) | (t_d2 < best_d))
                best_idx = tl.where(take2, t_idx2, best_idx)
                best_d = tl.where(take2, t_d2, best_d)
        negative = tl.where(best_idx >= 0, best_idx, far_idx[:, None])
        tl.store(neg_ptr + pair, negative.to(tl.int64), mask=pair_ok)


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def block_sizes(n_anchor: int, n_candidate: int, dim: int, dtype: torch.dtype, strategy: int,
                interpreted: bool, longest_pairs: Optional[int] = None) -> dict:
    """Tile sizes (a heuristic: @triton.autotune does not run under the interpreter).

    GPU: the per-anchor kernels are a GEMM with a light epilogue (two or four row reductions per tile),
    so they take GEMM-like tiles: 128 x 64 with K chunks of 64 (16-bit) or 32 (fp32), all of D held in
    one chunk up to 128 (16-bit) / 64 (fp32). Entities add three popcount/IoU tiles: 64 x 32, 8 warps.
    Semi-hard holds [BLOCK_M, BLOCK_S, BLOCK_N] comparison tiles: small tiles (16 x 8 x 32).
    Chosen from ptxas -v for sm_90a (no spills for fp32/fp16/bf16, single-K and K-loop; not timed):
    entities at 64 x 64 with 4 warps spilled ~1 KB per thread. tl.dot needs every tile side >= 16.
    Interpreter: numpy per-op overhead dominates, few large tiles.
    """
    d_pow = _pow2(dim)
    if interpreted:
        cfg = dict(BLOCK_M=min(_pow2(n_anchor), 64), BLOCK_N=min(_pow2(n_candidate), 64),
                   BLOCK_K=min(d_pow, 128), BLOCK_S=1, num_warps=4, num_stages=1)
        if strategy == STRATEGY_SEMI_HARD:
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
            cfg["BLOCK_S"] = min(triton.next_power_of_2(max(1, longest_pairs or 1)), 32)
        return cfg
    wide = dtype != torch.float32
    single_k_limit = 128 if wide else 64
    block_k = d_pow if d_pow <= single_k_limit else (64 if wide else 32)
    if strategy == STRATEGY_SEMI_HARD:
        return dict(BLOCK_M=16, BLOCK_N=min(32, _pow2(n_candidate)), BLOCK_K=min(block_k, 64 if wide else 32),
                    BLOCK_S=8, num_warps=4, num_stages=2)
    if strategy == STRATEGY_BATCH_HARD:
        block_m, block_n = min(128, _pow2(n_anchor)), min(64, _pow2(n_candidate))
    else:
        block_m, block_n = min(64, _pow2(n_anchor)), min(32, _pow2(n_candidate))
    num_warps = 8 if block_m >= 64 else 4
    num_stages = 2 if block_k * block_n > 64 * 64 else 3
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_S=1, num_warps=num_warps,
                num_stages=num_stages)


def triplet_mining_forward(inputs, anchor_norms: torch.Tensor, candidate_norms: torch.Tensor,
                           pair_offsets: Optional[torch.Tensor] = None, pair_positive: Optional[torch.Tensor] = None,
                           *, block_overrides: Optional[dict] = None):
    """(positive, negative) int64 on the inputs' device, -1 for none.

    batch_hard / entities: positive[n_anchor], negative[n_anchor]. semi_hard: positive is empty and
    negative[P] follows pair_positive (with pair_offsets [n_anchor + 1] in CSR form).
    `inputs` is medvl.ops.triplet_mining._Inputs (validated there); anchor_norms / candidate_norms are
    float32 [n]: squared norms, or max(|x|, 1e-12) for the cosine distance. `block_overrides`
    replaces entries of block_sizes() (tests use it to force several tiles on small inputs).
    """
    strategy, distance = int(inputs.strategy), int(inputs.distance)
    if strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(SUPPORTED_STRATEGIES)}, got {strategy!r}")
    if distance not in (DISTANCE_EUCLIDEAN, DISTANCE_SQUARED, DISTANCE_COSINE):
        raise ValueError(f"distance must be 0, 1 or 2, got {distance!r}")
    anchors = inputs.anchors.contiguous()
    within = bool(inputs.within)
    candidates = anchors if within else inputs.candidates.contiguous()
    if candidates.dtype != anchors.dtype or candidates.shape[1] != anchors.shape[1]:
        raise ValueError("anchors and candidates must share dtype and dim")
    n_anchor, dim = anchors.shape
    n_candidate = candidates.shape[0]
    device = anchors.device
    interpreted = device.type == "cpu"
    a_norm = anchor_norms.to(device=device, dtype=torch.float32).contiguous()
    c_norm = a_norm if within else candidate_norms.to(device=device, dtype=torch.float32).contiguous()
    precision = fp32_dot_precision(device) if anchors.dtype == torch.float32 else "tf32"  # 16-bit: ignored

    longest = None
    if strategy == STRATEGY_SEMI_HARD:
        if pair_offsets is None or pair_positive is None:
            raise ValueError("semi_hard needs pair_offsets and pair_positive")
        pair_offsets = pair_offsets.to(device=device, dtype=torch.int64).contiguous()
        pair_positive = pair_positive.to(device=device, dtype=torch.int64).contiguous()
        if interpreted and pair_positive.numel():  # free on the CPU; on a GPU it would be a sync
            longest = int((pair_offsets[1:] - pair_offsets[:-1]).max())
    cfg = block_sizes(n_anchor, n_candidate, dim, anchors.dtype, strategy, interpreted, longest)
    if block_overrides:
        cfg.update(block_overrides)
    single_k = dim <= cfg["BLOCK_K"]
    grid = (triton.cdiv(n_anchor, cfg["BLOCK_M"]),)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)

    if strategy == STRATEGY_SEMI_HARD:
        positive = torch.empty(0, dtype=torch.int64, device=device)
        negative = torch.empty(pair_positive.shape[0], dtype=torch.int64, device=device)
        if pair_positive.numel() == 0:
            return positive, negative
        labels = inputs.labels.to(torch.int64).contiguous()
        candidate_labels = labels if within else inputs.candidate_labels.to(torch.int64).contiguous()
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _mine_semi_hard[grid](
                anchors, candidates, a_norm, c_norm, labels, candidate_labels, pair_offsets, pair_positive,
                negative, n_anchor, n_candidate, dim,
                DISTANCE=distance, SINGLE_K=single_k, DOT_PRECISION=precision,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_S=cfg["BLOCK_S"],
                **launch,
            )
        return positive, negative

    positive = torch.empty(n_anchor, dtype=torch.int64, device=device)
    negative = torch.empty(n_anchor, dtype=torch.int64, device=device)
    words = [0, 0, 0]
    weights = [0, 0, 0]
    if strategy == STRATEGY_BATCH_HARD:
        labels = inputs.labels.to(torch.int64).contiguous()
        candidate_labels = labels if within else inputs.candidate_labels.to(torch.int64).contiguous()
        bits = candidate_bits = labels  # never read
    else:
        bits = inputs.anchor_bits.to(torch.int32).contiguous()
        candidate_bits = bits if within else inputs.candidate_bits.to(torch.int32).contiguous()
        words = [int(w) for w in inputs.entity_words] + [0] * (3 - len(inputs.entity_words))
        weights = [int(w) for w in inputs.weights] + [0] * (3 - len(inputs.weights))
        if bits.shape[1] != sum(words) or candidate_bits.shape[1] != sum(words):
            raise ValueError(f"entity bits have {bits.shape[1]} / {candidate_bits.shape[1]} words, "
                             f"entity_words say {sum(words)}")
        labels = candidate_labels = a_norm  # never read
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _mine_per_anchor[grid](
            anchors, candidates, a_norm, c_norm, labels, candidate_labels, bits, candidate_bits, positive, negative,
            n_anchor, n_candidate, dim, words[0], words[1], words[2], weights[0], weights[1], weights[2],
            int(inputs.lo), int(inputs.hi),
            STRATEGY=strategy, DISTANCE=distance, WITHIN=within, SINGLE_K=single_k, DOT_PRECISION=precision,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            **launch,
        )
    return positive, negative
