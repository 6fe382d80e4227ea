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

Design: deterministic, no atomics, nothing n_anchor x n_candidate in memory. A program owns BLOCK_M
anchors and sweeps candidate tiles of BLOCK_N in ascending order. A tile of dot products comes from
tl.dot (fp32 accumulation) over D in BLOCK_K chunks (one chunk, with the anchors' tile loaded once,
when D fits); the norms are a small O(n D) torch op with the reference's own expression. Per anchor
the kernel keeps running (value, index) extrema in registers: inside a tile the extreme value is a
max/min reduction and its index the minimum of the matching column indices; across tiles a later
tile wins only on a strict improvement, so ties stay with the lowest index.

  batch_hard / entities  grid (anchor tiles, SPLIT). With few anchor tiles (small batches) the
      streamed candidate side is split SPLIT ways: split s sweeps its own contiguous candidate range
      and writes its extrema (value, [score,] index) to a [SPLIT, n_anchor] workspace, and
      _combine_splits folds the splits in ascending order with the same strict-improvement rule:
      the result is the one an unsplit sweep gives, for every SPLIT (deterministic, no atomics).
  semi_hard  grid (anchor tiles). Sweep 1 computes each tile once and reads d(i, p) of every positive
      pair out of it (the pairs of anchor i are its positives in ascending candidate order, so a
      positive's pair slot is pair_offsets[i] + the number of positives before it: an exclusive
      prefix count along the tile row plus a running count), into a P-long workspace, and keeps the
      farthest negative. Sweep 2 walks the anchors' pairs in chunks of BLOCK_S slots and recomputes
      each tile once per chunk: per slot, the nearest negative strictly beyond d(i, p) is a masked
      row minimum of the tile. Tiles are computed 1 + ceil(longest run of pairs / BLOCK_S) times;
      d(i, p) comes from the very same tile code as the negatives' distances (exact ties behave as in
      the reference), and no anchor re-reads candidates on its own.

Floating-point arithmetic: float32 divisions use tl.math.div_rn (IEEE, correctly rounded) rather
than the approximate default; the entity keys divide in float64, which Triton always rounds as IEEE
says (their numerators and denominators are integers, so no contraction or order can change them).
The kernels are compiled with enable_fp_fusion=False so that the distance epilogue rounds as the
reference does. The tile GEMMs run on the tensor cores either way (fusion only concerns element-wise
code). The anchors' and candidates' norms arrive from the caller
(medvl.reference.triplet_mining.row_norms: correctly rounded square roots on every device).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._common import fp32_dot_precision, popcount32

__all__ = ["SUPPORTED_STRATEGIES", "GPU_TILES", "triplet_mining_forward", "block_sizes", "candidate_splits"]

# Strategies and distances by name, as medvl.ops passes them; their index is the kernels' code.
STRATEGY_NAMES = ("batch_hard", "semi_hard", "entities")
DISTANCE_NAMES = ("euclidean", "squared_euclidean", "cosine")
STRATEGY_BATCH_HARD, STRATEGY_SEMI_HARD, STRATEGY_ENTITIES = range(len(STRATEGY_NAMES))
DISTANCE_EUCLIDEAN, DISTANCE_SQUARED, DISTANCE_COSINE = range(len(DISTANCE_NAMES))
SUPPORTED_STRATEGIES = set(STRATEGY_NAMES)

_NO_INDEX = tl.constexpr(2147483647)  # "no column" in the index reductions (int32 max; candidates < 2^31)


# --------------------------------------------------------------------------------------------
# GPU tuning table. NOT MEASURED: starting points that compile for sm_90a (Triton 3.8, ptxas, without
# a GPU) into wgmma with no spills and fit the shared memory; settle them on the GPU with
# bench/bench_triplet_mining.py's tile sweep (test_tile_sweep, GPU only) and replace these rows with
# its winners. Keys: (strategy, operand kind): "16bit" (fp16/bf16) or "fp32". BLOCK_K: the largest D
# held in one chunk (the anchors' tile loaded once per program); a larger D loops over chunks of
# BLOCK_K_LOOP. Comments: registers per thread and dynamic shared memory at D = 256, bf16.
# --------------------------------------------------------------------------------------------
GPU_TILES = {
    # 202 registers, 128 KiB (K loop); single-K at D = 256 would be 243 registers and 192 KiB at 2 stages.
    (STRATEGY_BATCH_HARD, "16bit"): dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, BLOCK_K_LOOP=64, num_warps=8,
                                         num_stages=4),
    (STRATEGY_BATCH_HARD, "fp32"): dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, BLOCK_K_LOOP=32, num_warps=8,
                                        num_stages=3),
    # Three popcount / IoU tiles in float64 beside the distances: 64 x 64 spills, 64 x 32 does not (221).
    (STRATEGY_ENTITIES, "16bit"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, BLOCK_K_LOOP=64, num_warps=8,
                                       num_stages=2),
    (STRATEGY_ENTITIES, "fp32"): dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, BLOCK_K_LOOP=32, num_warps=8,
                                      num_stages=2),
    # BLOCK_S pair slots per chunk, each a masked [BLOCK_M, BLOCK_N] row minimum per tile: 255 registers,
    # no spills, 112 KiB single-K; BLOCK_S = 16 or 128-wide tiles spill.
    (STRATEGY_SEMI_HARD, "16bit"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, BLOCK_K_LOOP=64, BLOCK_S=8,
                                        num_warps=8, num_stages=2),
    (STRATEGY_SEMI_HARD, "fp32"): dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_K_LOOP=32, BLOCK_S=8,
                                       num_warps=8, num_stages=2),
}
# Candidate splits (batch_hard, entities): enough programs for SPLIT_TARGET_WAVES waves of the GPU's
# SMs, each split at least MIN_TILES_PER_SPLIT candidate tiles long. Also starting points.
SPLIT_TARGET_WAVES = 2
MIN_TILES_PER_SPLIT = 4


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
def _anchor_tile(a_ptr, rows64, row_ok, dim, SINGLE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The anchors' [BLOCK_M, BLOCK_K] operand, loaded once when all of D fits one chunk."""
    offs_k = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        a_tile = tl.load(a_ptr + rows64[:, None] * dim + offs_k[None, :],
                         mask=row_ok[:, None] & (offs_k[None, :] < dim), other=0.0)
    else:
        a_tile = tl.zeros((BLOCK_M,), dtype=tl.float32)  # unused: _distance_tile loads its chunks
    return a_tile


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
def _entity_keys(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, words0, words1, words2,
                 a_count0, a_count1, a_count2, w0, w1, w2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float64 exact score keys N / D, folding the kinds in as the reference does (the
    integers are exact, so the fold order cannot matter; the one division rounds as IEEE says)."""
    n_words = words0 + words1 + words2
    both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, 0, words0,
                                 a_count0, BLOCK_M, BLOCK_N)
    numerator = w0 * both
    denominator = either
    both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, words0, words1,
                                 a_count1, BLOCK_M, BLOCK_N)
    numerator = numerator * either + w1 * both * denominator
    denominator = denominator * either
    both, either = _overlap_tile(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, n_words, words0 + words1,
                                 words2, a_count2, BLOCK_M, BLOCK_N)
    numerator = numerator * either + w2 * both * denominator
    denominator = denominator * either
    # float64 `/` is IEEE division (div.rn.f64; only float32 `/` is approximate in Triton).
    return numerator / denominator


@triton.jit
def _row_extreme(values, valid, cols, LARGEST: tl.constexpr):
    """Per row: the extreme valid value, and its lowest column (-1 where no column is valid)."""
    if LARGEST:
        best = tl.max(tl.where(valid, values, float("-inf")), axis=1)
    else:
        best = tl.min(tl.where(valid, values, float("inf")), axis=1)
    index = tl.min(tl.where(valid & (values == best[:, None]), cols[None, :], _NO_INDEX), axis=1)
    return best, tl.where(index == _NO_INDEX, -1, index)


@triton.jit
def _beats(t_index, t_score, t_dist, index, score, dist, LARGEST: tl.constexpr, SCORED: tl.constexpr):
    """Whether a candidate extremum (t_*) replaces the running one. Candidates are visited in ascending
    index order (tiles, then splits), so only a strict improvement wins and ties keep the lower index.
    SCORED (entities): the score decides first, the distance breaks its ties, in the same sense."""
    if LARGEST:
        better = t_dist > dist
    else:
        better = t_dist < dist
    if SCORED:
        if LARGEST:
            better = (t_score > score) | ((t_score == score) & better)
        else:
            better = (t_score < score) | ((t_score == score) & better)
    return (t_index >= 0) & ((index < 0) | better)


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
    pos_ptr,  # [n_anchor] int64 out (SPLIT == 1), else the split workspace's int32 [2, SPLIT, n_anchor]
    neg_ptr,  # [n_anchor] int64 out (SPLIT == 1)
    part_d_ptr,  # SPLIT > 1: fp32 [2, SPLIT, n_anchor] distances of the partial extrema
    part_s_ptr,  # SPLIT > 1, entities: fp64 [2, SPLIT, n_anchor] their score keys
    n_anchor,
    n_candidate,
    candidates_per_split,  # a multiple of BLOCK_N
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
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_anchor
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    a_norm = tl.load(a_norm_ptr + rows64, mask=row_ok, other=1.0)
    a_tile = _anchor_tile(a_ptr, rows64, row_ok, dim, SINGLE_K, BLOCK_M, BLOCK_K)

    # Running extrema: index -1 = none yet. "pos" is the farthest positive (batch_hard) or the
    # top (score, distance) (entities); "neg" the nearest negative or the lowest in-range score.
    pos_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    pos_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    neg_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    neg_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos_s = tl.zeros((BLOCK_M,), dtype=tl.float64)
    neg_s = tl.zeros((BLOCK_M,), dtype=tl.float64)
    if STRATEGY == 0:
        a_lab = tl.load(a_lab_ptr + rows64, mask=row_ok, other=0)
    else:
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

    c_begin = split * candidates_per_split
    c_end = tl.minimum(c_begin + candidates_per_split, n_candidate)
    for start_n in range(c_begin, c_end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < c_end
        cols64 = cols.to(tl.int64)
        allowed = row_ok[:, None] & col_ok[None, :]
        if WITHIN:
            allowed = allowed & (rows[:, None] != cols[None, :])
        dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                              DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

        if STRATEGY == 0:
            c_lab = tl.load(c_lab_ptr + cols64, mask=col_ok, other=0)
            same = a_lab[:, None] == c_lab[None, :]
            t_d, t_idx = _row_extreme(dist, allowed & same, cols, True)  # farthest positive
            take = _beats(t_idx, t_d, t_d, pos_idx, pos_d, pos_d, True, False)
            pos_idx = tl.where(take, t_idx, pos_idx)
            pos_d = tl.where(take, t_d, pos_d)
            t_d, t_idx = _row_extreme(dist, allowed & ~same, cols, False)  # nearest negative
            take = _beats(t_idx, t_d, t_d, neg_idx, neg_d, neg_d, False, False)
            neg_idx = tl.where(take, t_idx, neg_idx)
            neg_d = tl.where(take, t_d, neg_d)
        else:
            score = _entity_keys(a_bits_ptr, c_bits_ptr, rows64, row_ok, cols64, col_ok, words0, words1, words2,
                                 a_count0, a_count1, a_count2, w0, w1, w2, BLOCK_M, BLOCK_N)
            # Positive: the highest score, then the largest distance, then the lowest index.
            t_s = tl.max(tl.where(allowed, score, float("-inf")), axis=1)
            t_d, t_idx = _row_extreme(dist, allowed & (score == t_s[:, None]), cols, True)
            take = _beats(t_idx, t_s, t_d, pos_idx, pos_s, pos_d, True, True)
            pos_idx = tl.where(take, t_idx, pos_idx)
            pos_s = tl.where(take, t_s, pos_s)
            pos_d = tl.where(take, t_d, pos_d)
            # Negative: the lowest score in [lo, hi), then the smallest distance, then the lowest index.
            in_range = allowed & (score >= lo) & (score < hi)
            t_s = tl.min(tl.where(in_range, score, float("inf")), axis=1)
            t_d, t_idx = _row_extreme(dist, in_range & (score == t_s[:, None]), cols, False)
            take = _beats(t_idx, t_s, t_d, neg_idx, neg_s, neg_d, False, True)
            neg_idx = tl.where(take, t_idx, neg_idx)
            neg_s = tl.where(take, t_s, neg_s)
            neg_d = tl.where(take, t_d, neg_d)

    if SPLIT == 1:
        if STRATEGY == 2:
            # No negative unless it scores below the positive (then it is less related than the positive).
            neg_idx = tl.where((neg_idx >= 0) & (pos_idx >= 0) & (neg_s < pos_s), neg_idx, -1)
        tl.store(pos_ptr + rows64, pos_idx.to(tl.int64), mask=row_ok)
        tl.store(neg_ptr + rows64, neg_idx.to(tl.int64), mask=row_ok)
    else:
        # This split's extrema; [0] = positive, [1] = negative; _combine_splits folds them.
        at = split.to(tl.int64) * n_anchor + rows64
        other = tl.cast(n_anchor, tl.int64) * SPLIT
        tl.store(pos_ptr + at, pos_idx, mask=row_ok)
        tl.store(pos_ptr + other + at, neg_idx, mask=row_ok)
        tl.store(part_d_ptr + at, pos_d, mask=row_ok)
        tl.store(part_d_ptr + other + at, neg_d, mask=row_ok)
        if STRATEGY == 2:
            tl.store(part_s_ptr + at, pos_s, mask=row_ok)
            tl.store(part_s_ptr + other + at, neg_s, mask=row_ok)


@triton.jit
def _combine_splits(
    part_idx_ptr,  # int32 [2, SPLIT, n_anchor]: positive, then negative
    part_d_ptr,  # fp32 [2, SPLIT, n_anchor]
    part_s_ptr,  # fp64 [2, SPLIT, n_anchor] (entities)
    pos_ptr,  # [n_anchor] int64 out
    neg_ptr,  # [n_anchor] int64 out
    n_anchor,
    SCORED: tl.constexpr,  # entities
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The splits' extrema folded in ascending split order (ascending candidates), as one sweep would."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < n_anchor
    rows64 = rows.to(tl.int64)
    other = tl.cast(n_anchor, tl.int64) * SPLIT
    pos_idx = tl.full((BLOCK,), -1, dtype=tl.int32)
    pos_d = tl.zeros((BLOCK,), dtype=tl.float32)
    pos_s = tl.zeros((BLOCK,), dtype=tl.float64)
    neg_idx = tl.full((BLOCK,), -1, dtype=tl.int32)
    neg_d = tl.zeros((BLOCK,), dtype=tl.float32)
    neg_s = tl.zeros((BLOCK,), dtype=tl.float64)
    for s in range(SPLIT):
        at = tl.cast(n_anchor, tl.int64) * s + rows64
        t_idx = tl.load(part_idx_ptr + at, mask=row_ok, other=-1)
        t_d = tl.load(part_d_ptr + at, mask=row_ok, other=0.0)
        t_s = t_d.to(tl.float64)
        if SCORED:
            t_s = tl.load(part_s_ptr + at, mask=row_ok, other=0.0)
        take = _beats(t_idx, t_s, t_d, pos_idx, pos_s, pos_d, True, SCORED)
        pos_idx = tl.where(take, t_idx, pos_idx)
        pos_d = tl.where(take, t_d, pos_d)
        pos_s = tl.where(take, t_s, pos_s)
        t_idx = tl.load(part_idx_ptr + other + at, mask=row_ok, other=-1)
        t_d = tl.load(part_d_ptr + other + at, mask=row_ok, other=0.0)
        t_s = t_d.to(tl.float64)
        if SCORED:
            t_s = tl.load(part_s_ptr + other + at, mask=row_ok, other=0.0)
        take = _beats(t_idx, t_s, t_d, neg_idx, neg_s, neg_d, False, SCORED)
        neg_idx = tl.where(take, t_idx, neg_idx)
        neg_d = tl.where(take, t_d, neg_d)
        neg_s = tl.where(take, t_s, neg_s)
    if SCORED:
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
    pair_d_ptr,  # [P] fp32 workspace: d(i, p) of every pair, written by sweep 1
    neg_ptr,  # [P] int64 out
    n_anchor,
    n_candidate,
    dim,
    DISTANCE: tl.constexpr,
    WITHIN: tl.constexpr,
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
    offs_s = tl.arange(0, BLOCK_S)
    a_norm = tl.load(a_norm_ptr + rows64, mask=row_ok, other=1.0)
    a_tile = _anchor_tile(a_ptr, rows64, row_ok, dim, SINGLE_K, BLOCK_M, BLOCK_K)
    a_lab = tl.load(a_lab_ptr + rows64, mask=row_ok, other=0)
    first = tl.load(offsets_ptr + rows64, mask=row_ok, other=0)
    count = tl.load(offsets_ptr + rows64 + 1, mask=row_ok, other=0) - first

    # Sweep 1: every pair's d(i, p) out of the tiles, and each anchor's farthest negative (the fallback).
    seen = tl.zeros((BLOCK_M,), dtype=tl.int64)  # positives of each anchor before this tile
    far_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    far_d = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start_n in range(0, n_candidate, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_candidate
        cols64 = cols.to(tl.int64)
        dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                              DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        c_lab = tl.load(c_lab_ptr + cols64, mask=col_ok, other=0)
        valid = row_ok[:, None] & col_ok[None, :]
        same = a_lab[:, None] == c_lab[None, :]
        is_pos = valid & same
        if WITHIN:
            is_pos = is_pos & (rows[:, None] != cols[None, :])
        t_d, t_idx = _row_extreme(dist, valid & ~same, cols, True)
        take = _beats(t_idx, t_d, t_d, far_idx, far_d, far_d, True, False)
        far_idx = tl.where(take, t_idx, far_idx)
        far_d = tl.where(take, t_d, far_d)
        # Pair slot of positive (i, j): offsets[i] + positives of i before j (ascending candidates).
        ones = is_pos.to(tl.int32)
        before = (tl.cumsum(ones, axis=1) - ones).to(tl.int64)
        slot = first[:, None] + seen[:, None] + before
        tl.store(pair_d_ptr + slot, dist, mask=is_pos)
        seen += tl.sum(ones, axis=1).to(tl.int64)
    # The slots written above are read back below by other threads of this program.
    tl.debug_barrier()

    # Sweep 2: per pair, the nearest negative strictly beyond d(i, p), BLOCK_S slots per chunk.
    longest = tl.max(count, axis=0)
    for s0 in range(0, longest, BLOCK_S):
        slot = s0 + offs_s
        pair_ok = row_ok[:, None] & (slot[None, :] < count[:, None])  # [BLOCK_M, BLOCK_S]
        pair = first[:, None] + slot[None, :]
        d_ap = tl.load(pair_d_ptr + pair, mask=pair_ok, other=float("inf"))  # absent slots: nothing beyond
        best_idx = tl.full((BLOCK_M, BLOCK_S), -1, dtype=tl.int32)
        best_d = tl.full((BLOCK_M, BLOCK_S), float("inf"), dtype=tl.float32)
        for start_n in range(0, n_candidate, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < n_candidate
            cols64 = cols.to(tl.int64)
            dist = _distance_tile(a_ptr, c_ptr, a_tile, rows64, row_ok, cols64, col_ok, dim, a_norm, c_norm_ptr,
                                  DISTANCE, SINGLE_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            c_lab = tl.load(c_lab_ptr + cols64, mask=col_ok, other=0)
            is_neg = row_ok[:, None] & col_ok[None, :] & (a_lab[:, None] != c_lab[None, :])
            for s in tl.static_range(BLOCK_S):
                in_slot = offs_s[None, :] == s
                threshold = tl.sum(tl.where(in_slot, d_ap, 0.0), axis=1)
                # Slot s's nearest negative beyond its positive in this tile; the lowest column on ties.
                beyond = tl.where(is_neg & (dist > threshold[:, None]), dist, float("inf"))
                t_d, t_col = tl.min(beyond, axis=1, return_indices=True, return_indices_tie_break_left=True)
                # Only a finite minimum counts. When every negative beyond d(i, p) is at +inf, the
                # fallback (the farthest negative) is the lowest-index one at +inf: the same answer.
                take = in_slot & (t_d[:, None] < best_d)
                best_idx = tl.where(take, (start_n + t_col)[:, None], best_idx)
                best_d = tl.where(take, t_d[:, None], best_d)
        negative = tl.where(best_idx >= 0, best_idx, far_idx[:, None])
        tl.store(neg_ptr + pair, negative.to(tl.int64), mask=pair_ok)


# --------------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------------


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, int(n))))


def block_sizes(n_anchor: int, n_candidate: int, dim: int, dtype: torch.dtype, strategy: int,
                interpreted: bool, longest_pairs: Optional[int] = None) -> dict:
    """Tile sizes: GPU_TILES on a GPU (no side wider than its extent needs), a few large tiles under the
    interpreter (numpy's per-op overhead dominates there). tl.dot needs every tile side >= 16.
    @triton.autotune is not used: it does not run under the interpreter, and a configuration that
    changes from run to run could change the D-chunking of the dot products, and with it the rounding."""
    d_pow = _pow2(dim)
    if interpreted:
        cfg = dict(BLOCK_M=min(_pow2(n_anchor), 64), BLOCK_N=min(_pow2(n_candidate), 64),
                   BLOCK_K=min(d_pow, 128), BLOCK_S=1, num_warps=4, num_stages=1)
        if strategy == STRATEGY_SEMI_HARD:
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
            cfg["BLOCK_S"] = min(triton.next_power_of_2(max(1, longest_pairs or 1)), 16)
        return cfg
    row = GPU_TILES[(strategy, "fp32" if dtype == torch.float32 else "16bit")]
    block_k = d_pow if d_pow <= row["BLOCK_K"] else row["BLOCK_K_LOOP"]
    return dict(BLOCK_M=min(row["BLOCK_M"], _pow2(n_anchor)), BLOCK_N=min(row["BLOCK_N"], _pow2(n_candidate)),
                BLOCK_K=block_k, BLOCK_S=row.get("BLOCK_S", 1), num_warps=row["num_warps"],
                num_stages=row["num_stages"])


def candidate_splits(n_anchor: int, n_candidate: int, block_m: int, block_n: int, device: torch.device) -> int:
    """How many ways batch_hard / entities split the candidates: 1 unless the anchor tiles alone would
    leave the GPU's SMs idle (small batches). The result does not depend on it (see the docstring)."""
    if device.type != "cuda":
        return 1
    anchor_tiles = triton.cdiv(n_anchor, block_m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(SPLIT_TARGET_WAVES * sms, anchor_tiles)
    return max(1, min(want, triton.cdiv(n_candidate, block_n) // MIN_TILES_PER_SPLIT))


def triplet_mining_forward(*, anchors: torch.Tensor, candidates: torch.Tensor, labels: Optional[torch.Tensor],
                           candidate_labels: Optional[torch.Tensor], anchor_bits: Optional[torch.Tensor],
                           candidate_bits: Optional[torch.Tensor], strategy: str, distance: str,
                           entity_words: Sequence[int], weights: Sequence[float], lo: float, hi: float, within: bool,
                           anchor_norms: torch.Tensor, candidate_norms: torch.Tensor,
                           pair_offsets: Optional[torch.Tensor] = None, pair_positive: Optional[torch.Tensor] = None,
                           block_overrides: Optional[dict] = None):
    """(positive, negative) int64 on the inputs' device, -1 for none.

    batch_hard / entities: positive[n_anchor], negative[n_anchor]. semi_hard: positive is empty and
    negative[P] follows pair_positive, with pair_offsets [n_anchor + 1] in CSR form: the pairs of anchor
    i must be all its positives (same label; j != i within one set) in ascending candidate order, as
    medvl.ops._labels.same_label_pairs makes them (the kernel finds a pair's slot by counting).
    The inputs as medvl.ops.triplet_mining validates them (keyword arguments: this layer imports
    nothing of medvl): entity weights and the range lo, hi are the exact integer form (times one
    denominator); anchor_norms / candidate_norms are float32 [n]: squared norms, or max(|x|, 1e-12)
    for the cosine distance. `block_overrides` replaces
    entries of block_sizes(), and SPLIT the candidate split (tests force several tiles and splits on
    small inputs).
    """
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGY_NAMES))}, got {strategy!r}")
    if distance not in DISTANCE_NAMES:
        raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCE_NAMES))}, got {distance!r}")
    strategy, distance = STRATEGY_NAMES.index(strategy), DISTANCE_NAMES.index(distance)
    anchors = anchors.contiguous()
    within = bool(within)
    candidates = anchors if within else candidates.contiguous()
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
        if interpreted and pair_positive.numel():  # free on the CPU; on a GPU it would be a sync
            longest = int((pair_offsets[1:] - pair_offsets[:-1]).max())
    cfg = block_sizes(n_anchor, n_candidate, dim, anchors.dtype, strategy, interpreted, longest)
    if block_overrides:
        cfg.update(block_overrides)
    single_k = dim <= cfg["BLOCK_K"]
    n_anchor_tiles = triton.cdiv(n_anchor, cfg["BLOCK_M"])
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    device_ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    if strategy == STRATEGY_SEMI_HARD:
        positive = torch.empty(0, dtype=torch.int64, device=device)
        negative = torch.empty(pair_positive.shape[0], dtype=torch.int64, device=device)
        if pair_positive.numel() == 0:
            return positive, negative
        pair_distance = torch.empty(pair_positive.shape[0], dtype=torch.float32, device=device)
        labels = labels.to(torch.int64).contiguous()
        candidate_labels = labels if within else candidate_labels.to(torch.int64).contiguous()
        with device_ctx:
            _mine_semi_hard[(n_anchor_tiles,)](
                anchors, candidates, a_norm, c_norm, labels, candidate_labels, pair_offsets, pair_distance,
                negative, n_anchor, n_candidate, dim,
                DISTANCE=distance, WITHIN=within, SINGLE_K=single_k, DOT_PRECISION=precision,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_S=cfg["BLOCK_S"],
                **launch,
            )
        return positive, negative

    positive = torch.empty(n_anchor, dtype=torch.int64, device=device)
    negative = torch.empty(n_anchor, dtype=torch.int64, device=device)
    words = [0, 0, 0]
    integer_weights = [0, 0, 0]
    if strategy == STRATEGY_BATCH_HARD:
        labels = labels.to(torch.int64).contiguous()
        candidate_labels = labels if within else candidate_labels.to(torch.int64).contiguous()
        bits = candidate_bits = labels  # never read
    else:
        bits = anchor_bits.to(torch.int32).contiguous()
        candidate_bits = bits if within else candidate_bits.to(torch.int32).contiguous()
        words = [int(w) for w in entity_words] + [0] * (3 - len(entity_words))
        integer_weights = [int(w) for w in weights] + [0] * (3 - len(weights))
        if bits.shape[1] != sum(words) or candidate_bits.shape[1] != sum(words):
            raise ValueError(f"entity bits have {bits.shape[1]} / {candidate_bits.shape[1]} words, "
                             f"entity_words say {sum(words)}")
        labels = candidate_labels = a_norm  # never read

    split = int(cfg.get("SPLIT") or candidate_splits(n_anchor, n_candidate, cfg["BLOCK_M"], cfg["BLOCK_N"], device))
    # Whole candidate tiles per split; recounted so that no split is empty.
    per_split = triton.cdiv(triton.cdiv(n_candidate, split), cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    split = triton.cdiv(n_candidate, per_split)
    scored = strategy == STRATEGY_ENTITIES
    if split == 1:
        out_pos, out_neg, part_d, part_s = positive, negative, a_norm, a_norm  # the last two never read
    else:
        out_pos = torch.empty(2, split, n_anchor, dtype=torch.int32, device=device)
        out_neg = out_pos  # never read: the partial layout keeps both extrema in out_pos
        part_d = torch.empty(2, split, n_anchor, dtype=torch.float32, device=device)
        part_s = torch.empty(2, split, n_anchor, dtype=torch.float64, device=device) if scored else part_d
    with device_ctx:
        _mine_per_anchor[(n_anchor_tiles, split)](
            anchors, candidates, a_norm, c_norm, labels, candidate_labels, bits, candidate_bits, out_pos, out_neg,
            part_d, part_s, n_anchor, n_candidate, per_split, dim, words[0], words[1], words[2],
            integer_weights[0], integer_weights[1], integer_weights[2], int(lo), int(hi),
            STRATEGY=strategy, DISTANCE=distance, WITHIN=within, SINGLE_K=single_k, DOT_PRECISION=precision,
            SPLIT=split, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            **launch,
        )
        if split > 1:
            block = min(1024, _pow2(n_anchor))
            _combine_splits[(triton.cdiv(n_anchor, block),)](
                out_pos, part_d, part_s, positive, negative, n_anchor, SCORED=scored, SPLIT=split, BLOCK=block,
                num_warps=4,
            )
    return positive, negative
