"""Triplet mining written the obvious way, with full B_anchor x B_candidate matrices.

The rules every backend follows (and the tests check):
- positives share a label; within one set (no candidates) an anchor is never its own positive.
- batch_hard: per anchor, the farthest positive and the nearest negative; anchors lacking
  either are dropped.
- semi_hard: per (anchor, positive) pair, the nearest negative strictly farther than the positive;
  where none is, the farthest negative; pairs whose anchor has no negative are dropped.
- entities: score s = w0 IoU(disease) + w1 IoU(adjective) + w2 IoU(direction), two empty sets
  scoring 1. Positive: the highest score (ties: the farthest). Negative: the lowest score within
  [lo, hi) (ties: the nearest); dropped when there is none, or when it scores as high as the
  positive (then every candidate in range is as relevant as the positive).
- Ties in distance and score go to the lowest candidate index.

What is exact, and so the same on every backend, device and machine:
- Entity scores. The weights and the range are read as fractions (``entity_scoring``: 0.85 is
  17/20), and every score is compared as a rational number: scores equal in exact arithmetic tie,
  whatever the order of the terms. See ``entity_score_keys``.
- The decisions, on inputs whose dot products are exact (small integers, as the tests use): the
  distance formulas below are evaluated with correctly rounded float32 operations in a pinned
  order, square roots included (``sqrt_rn``: torch.sqrt on a CPU goes through MKL, whose last bit
  depends on the code path MKL picks for the processor).
What is not: the dot products of general float inputs are float32 sums whose order belongs to each
backend (torch's matmul here, tensor-core tiles on a GPU, FMA chains on the cpu backend), so
distances that differ by a rounding error may order differently from one backend to another. The
cpu backend itself gives the same bits on every x86 machine (its chains are the same on every
instruction set).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from medvl.options import unknown_option

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
STRATEGIES = ("batch_hard", "semi_hard", "entities")


class Triplets(NamedTuple):
    """Index tensors (int64, same length): anchor i, its positive and its negative candidate."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of a float32 tensor, the same bits on every device and CPU.

    torch.sqrt on a CPU runs MKL's vector math, whose float32 result is off by one unit in the last
    place for some inputs, differently for each code path MKL picks (AVX-512, AVX2, SSE4.2: the
    last is what MKL runs on many non-Intel processors). The kernels use the IEEE square root. So:
    round a float64 root to float32, then move one step wherever the exact root lies beyond the
    midpoint to a neighbour; the midpoints have 25 significant bits, so their squares are exact in
    float64, and no float32 equals a midpoint's square, so the test is never a tie.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"sqrt_rn takes float32, got {x.dtype}")
    root = x.double().sqrt().float()
    wide, x64 = root.double(), x.double()
    up = torch.nextafter(root, torch.full_like(root, math.inf))
    down = torch.nextafter(root, torch.zeros_like(root))
    above = x64 > ((wide + up.double()) * 0.5).square()
    below = (root > 0) & (x64 < ((wide + down.double()) * 0.5).square())
    return torch.where(above, up, torch.where(below, down, root))


def row_norms(x: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Per row, in float32: |x|^2, or max(|x|, 1e-12) for the cosine distance (what the kernels take)."""
    squared = x.float().pow(2).sum(1)
    return sqrt_rn(squared).clamp_min(1e-12) if cosine else squared


def pairwise_distance(anchors: torch.Tensor, candidates: torch.Tensor, distance: str) -> torch.Tensor:
    """(B_a, B_c) distances in float32 (float64 stays float64), with the kernels' formulas.

    squared = max(|a|^2 + |c|^2 - 2 <a, c>, 0); euclidean = sqrt(squared);
    cosine = 1 - <a, c> / (max(|a|, 1e-12) * max(|c|, 1e-12)). On inputs whose products are exact
    (small integers, as the tests use) every backend reproduces these bit for bit, ties included.
    """
    wide = anchors.dtype == torch.float64
    if not wide:
        anchors, candidates = anchors.float(), candidates.float()
    sqrt = torch.sqrt if wide else sqrt_rn
    dot = anchors @ candidates.T
    if distance == "cosine":
        if wide:
            a_norm = anchors.pow(2).sum(1).sqrt().clamp_min(1e-12)
            c_norm = candidates.pow(2).sum(1).sqrt().clamp_min(1e-12)
        else:
            a_norm, c_norm = row_norms(anchors, True), row_norms(candidates, True)
        return 1 - dot / (a_norm[:, None] * c_norm[None, :])
    squared = (anchors.pow(2).sum(1)[:, None] + candidates.pow(2).sum(1)[None, :] - 2 * dot).clamp_min(0)
    if distance == "squared_euclidean":
        return squared
    if distance == "euclidean":
        return sqrt(squared)
    raise unknown_option(distance, DISTANCES, name="distance")


# Weights and range bounds are read as the nearest fractions with a denominator up to this.
MAX_WEIGHT_DENOMINATOR = 10**6
# Keys are float64 quotients of integers; they order and tie exactly while (S + 1) D^2 <= 2^52.
_EXACT_KEY_LIMIT = 2**52


class EntityScoring(NamedTuple):
    """Entity scores in integers: score = sum_k weights[k] IoU_k / denominator.

    low and high are the score range times the denominator, moved to just outside the reachable
    scores [-S, S] (S = sum |weights|) when the range reaches past them (infinite bounds included).
    """

    weights: Tuple[int, int, int]
    low: int
    high: int
    denominator: int


def entity_scoring(weights: Sequence[float], score_range: Tuple[float, float]) -> EntityScoring:
    """Read weights and range as fractions (0.85 -> 17/20, 1/3 -> 1/3: the nearest fraction with a
    denominator up to 10^6, which is within 1e-12 of the float) over one common denominator."""
    fractions = [Fraction(float(w)).limit_denominator(MAX_WEIGHT_DENOMINATOR) for w in weights]
    reach = sum(abs(f) for f in fractions)
    bounds = []
    for value in (float(v) for v in score_range):
        if math.isinf(value) or abs(Fraction(value)) > reach:
            bounds.append(math.copysign(math.inf, value))  # past every score: no bound on that side
        else:
            bounds.append(Fraction(value).limit_denominator(MAX_WEIGHT_DENOMINATOR))
    denominator = math.lcm(*(f.denominator for f in fractions + [b for b in bounds if isinstance(b, Fraction)]))
    scaled = tuple(int(f * denominator) for f in fractions)
    outside = sum(abs(w) for w in scaled) + 1
    low, high = (int(b * denominator) if isinstance(b, Fraction) else int(math.copysign(outside, b)) for b in bounds)
    return EntityScoring(scaled, low, high, denominator)


def check_entity_scoring(scoring: EntityScoring, union_bounds: Sequence[int]) -> Optional[str]:
    """Why scores could not be compared exactly (None when they can). union_bounds: per entity kind,
    an upper bound on |a | c| (the set width, or the two largest set sizes added)."""
    largest_denominator = math.prod(max(1, int(u)) for u in union_bounds)
    reach = sum(abs(w) for w in scoring.weights) + 1
    if reach * largest_denominator ** 2 <= _EXACT_KEY_LIMIT:
        return None
    return (f"entity scores cannot be compared exactly: weights {scoring.weights} / {scoring.denominator} over "
            f"sets whose unions reach {tuple(int(u) for u in union_bounds)} entities need "
            f"(sum of weights + 1) x (product of union sizes)^2 <= 2^52; use weights with fewer decimals, or "
            f"fewer entities per kind")


def entity_score_keys(anchor_entities: Sequence[torch.Tensor], candidate_entities: Sequence[torch.Tensor],
                      weights: Sequence[int]) -> torch.Tensor:
    """(B_a, B_c) float64 keys, score x denominator, that order and tie exactly as the scores do.

    With integer weights W_k and per kind b = |a & c|, e = |a | c| (b = e = 1 for two empty sets),
    the score is N / D with D = e0 e1 e2 and N = sum_k W_k b_k prod_{m != k} e_m, integers that
    float64 holds exactly (check_entity_scoring bounds them). The key is N / D rounded once: two
    different fractions with denominators up to D_max lie at least 1 / D_max^2 apart, more than a
    rounding step of a key when (S + 1) D_max^2 <= 2^52, so keys are equal exactly when the scores
    are, and rounding is monotone, so they order as the scores do. Every backend computes the same
    N and D (integers: no rounding order to pin) and divides once, IEEE round to nearest.
    """
    numerator, denominator = None, None
    for a, c, w in zip(anchor_entities, candidate_entities, weights):
        a, c = a.to(torch.float64), c.to(torch.float64)
        both = a @ c.T  # exact counts
        either = a.sum(1, keepdim=True) + c.sum(1)[None, :] - both
        empty = either == 0
        both, either = both.masked_fill(empty, 1.0), either.masked_fill(empty, 1.0)
        if numerator is None:
            numerator, denominator = float(w) * both, either
        else:  # N/D + w b/e = (N e + w b D) / (D e)
            numerator = numerator * either + float(w) * both * denominator
            denominator = denominator * either
    return numerator / denominator


def union_bounds(entities: Sequence[torch.Tensor], candidate_entities: Sequence[torch.Tensor],
                 tight: bool) -> Tuple[int, ...]:
    """Per kind, a bound on |a | c|: the set width, or (tight) the two largest set sizes added."""
    if not tight:
        return tuple(int(a.shape[1]) for a in entities)
    return tuple(min(int(a.shape[1]), int(a.sum(1).max()) + int(c.sum(1).max()))
                 for a, c in zip(entities, candidate_entities))


def _first_arg(values: torch.Tensor, valid: torch.Tensor, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: index of the extreme valid value (lowest index on ties), and whether any was valid."""
    fill = float("-inf") if largest else float("inf")
    masked = values.masked_fill(~valid, fill)
    extreme = masked.max(1, keepdim=True).values if largest else masked.min(1, keepdim=True).values
    hit = valid & (masked == extreme)
    columns = torch.arange(values.shape[1], device=values.device).expand_as(values)
    index = torch.where(hit, columns, values.shape[1]).min(1).values
    # "Found" means an index was found: a NaN value equals nothing, so it can never yield index B.
    return index, hit.any(1)


def triplet_mining(
    anchors: torch.Tensor,
    candidates: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    candidate_labels: Optional[torch.Tensor] = None,
    entities: Optional[Sequence[torch.Tensor]] = None,
    candidate_entities: Optional[Sequence[torch.Tensor]] = None,
    strategy: str = "batch_hard",
    distance: str = "euclidean",
    entity_weights: Sequence[float] = (0.85, 0.10, 0.05),
    score_range: Tuple[float, float] = (0.25, 0.6),
) -> Triplets:
    within = candidates is None
    if within:
        candidates, candidate_labels, candidate_entities = anchors, labels, entities
    n_anchor, n_candidate = anchors.shape[0], candidates.shape[0]
    # Mining only compares distances, and the square root orders them as their squares do (it can
    # only merge two squares into one rounded root): every backend mines euclidean on squares.
    dist = pairwise_distance(anchors, candidates, "squared_euclidean" if distance == "euclidean" else distance)
    own = torch.eye(n_anchor, n_candidate, dtype=torch.bool, device=anchors.device) if within else None
    arange = torch.arange(n_anchor, device=anchors.device)

    if strategy == "entities":
        scoring = entity_scoring(entity_weights, score_range)
        sets = [e.to(torch.int64) for e in entities]
        candidate_sets = [e.to(torch.int64) for e in candidate_entities]
        problem = check_entity_scoring(scoring, union_bounds(sets, candidate_sets, tight=False))
        if problem:
            problem = check_entity_scoring(scoring, union_bounds(sets, candidate_sets, tight=True))
        if problem:
            raise ValueError(problem)
        keys = entity_score_keys(sets, candidate_sets, scoring.weights)
        allowed = ~own if within else torch.ones_like(keys, dtype=torch.bool)
        best = keys.masked_fill(~allowed, float("-inf")).max(1, keepdim=True).values
        positive, has_positive = _first_arg(dist, allowed & (keys == best), largest=True)
        in_range = allowed & (keys >= scoring.low) & (keys < scoring.high)
        lowest = keys.masked_fill(~in_range, float("inf")).min(1, keepdim=True).values
        negative, has_negative = _first_arg(dist, in_range & (keys == lowest), largest=False)
        keep = has_positive & has_negative & (lowest.squeeze(1) < best.squeeze(1))
        return Triplets(arange[keep], positive[keep], negative[keep])

    if labels is None:
        labels = arange
        if not within and candidate_labels is None:
            candidate_labels = torch.arange(n_candidate, device=anchors.device)  # candidate i pairs anchor i
    if candidate_labels is None:
        candidate_labels = labels
    same = labels[:, None] == candidate_labels[None, :]
    positive_mask = same & ~own if within else same
    negative_mask = ~same

    if strategy == "batch_hard":
        positive, has_positive = _first_arg(dist, positive_mask, largest=True)
        negative, has_negative = _first_arg(dist, negative_mask, largest=False)
        keep = has_positive & has_negative
        return Triplets(arange[keep], positive[keep], negative[keep])

    if strategy == "semi_hard":
        pair_anchor, pair_positive = positive_mask.nonzero(as_tuple=True)
        negatives_of = []
        step = max(1, 2**22 // max(n_candidate, 1))  # pairs x candidates in slices of ~4M entries
        for start in range(0, pair_anchor.numel(), step):
            anchor_rows = pair_anchor[start:start + step]
            rows = dist[anchor_rows]
            negatives = negative_mask[anchor_rows]
            d_ap = dist[anchor_rows, pair_positive[start:start + step]]
            beyond, has_beyond = _first_arg(rows, negatives & (rows > d_ap[:, None]), largest=False)
            farthest, _ = _first_arg(rows, negatives, largest=True)
            negatives_of.append(torch.where(has_beyond, beyond, farthest))
        negative = torch.cat(negatives_of) if negatives_of else pair_anchor.clone()
        keep = negative_mask.any(1)[pair_anchor]
        return Triplets(pair_anchor[keep], pair_positive[keep], negative[keep])

    raise unknown_option(strategy, STRATEGIES, name="strategy")
