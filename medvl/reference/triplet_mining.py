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
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

DISTANCES = ("euclidean", "squared_euclidean", "cosine")
STRATEGIES = ("batch_hard", "semi_hard", "entities")


class Triplets(NamedTuple):
    """Index tensors (int64, same length): anchor i, its positive and its negative candidate."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


def pairwise_distance(anchors: torch.Tensor, candidates: torch.Tensor, distance: str) -> torch.Tensor:
    """(B_a, B_c) distances in float32 (float64 stays float64), with the kernels' formulas.

    squared = max(|a|^2 + |c|^2 - 2 <a, c>, 0); euclidean = sqrt(squared);
    cosine = 1 - <a, c> / (max(|a|, 1e-12) * max(|c|, 1e-12)). On inputs whose products are exact
    (small integers, as the tests use) every backend reproduces these bit for bit, ties included.
    """
    if anchors.dtype != torch.float64:
        anchors, candidates = anchors.float(), candidates.float()
    dot = anchors @ candidates.T
    if distance == "cosine":
        a_norm = anchors.pow(2).sum(1).sqrt().clamp_min(1e-12)
        c_norm = candidates.pow(2).sum(1).sqrt().clamp_min(1e-12)
        return 1 - dot / (a_norm[:, None] * c_norm[None, :])
    squared = (anchors.pow(2).sum(1)[:, None] + candidates.pow(2).sum(1)[None, :] - 2 * dot).clamp_min(0)
    if distance == "squared_euclidean":
        return squared
    if distance == "euclidean":
        return squared.sqrt()
    raise ValueError(f"distance must be one of {', '.join(map(repr, DISTANCES))}, got {distance!r}")


def entity_scores(anchor_entities: Sequence[torch.Tensor], candidate_entities: Sequence[torch.Tensor],
                  weights: Sequence[float]) -> torch.Tensor:
    """(B_a, B_c) weighted sum of the IoUs of each entity kind; two empty sets have IoU 1.

    Scores tie often (the sets are small and discrete), so the arithmetic is pinned down for every
    backend to reproduce bit for bit: float32 IoU = both / either, then w0*iou0 + w1*iou1 + w2*iou2
    summed left to right in float32, without fused multiply-adds.
    """
    total = None
    for a, c, w in zip(anchor_entities, candidate_entities, weights):
        a, c = a.to(torch.float64), c.to(torch.float64)
        both = a @ c.T  # exact counts
        either = a.sum(1, keepdim=True) + c.sum(1)[None, :] - both
        iou = torch.where(either > 0, both.float() / either.clamp_min(1).float(), torch.ones_like(both, dtype=torch.float32))
        term = iou * torch.tensor(w, dtype=torch.float32)
        total = term if total is None else total + term
    return total


def _first_arg(values: torch.Tensor, valid: torch.Tensor, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: index of the extreme valid value (lowest index on ties), and whether any was valid."""
    fill = float("-inf") if largest else float("inf")
    masked = values.masked_fill(~valid, fill)
    extreme = masked.max(1, keepdim=True).values if largest else masked.min(1, keepdim=True).values
    hit = valid & (masked == extreme)
    columns = torch.arange(values.shape[1], device=values.device).expand_as(values)
    index = torch.where(hit, columns, values.shape[1]).min(1).values
    return index, valid.any(1)


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
        scores = entity_scores(entities, candidate_entities, entity_weights)
        allowed = ~own if within else torch.ones_like(scores, dtype=torch.bool)
        best = scores.masked_fill(~allowed, float("-inf")).max(1, keepdim=True).values
        positive, has_positive = _first_arg(dist, allowed & (scores == best), largest=True)
        lo, hi = score_range
        in_range = allowed & (scores >= lo) & (scores < hi)
        lowest = scores.masked_fill(~in_range, float("inf")).min(1, keepdim=True).values
        negative, has_negative = _first_arg(dist, in_range & (scores == lowest), largest=False)
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

    raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}")
