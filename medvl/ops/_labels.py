"""Label helpers shared by the ops: bit packing of multi-hot sets, and label-group pairs without B x B."""

from __future__ import annotations

from typing import Tuple

import torch


def pack_multi_hot(labels: torch.Tensor) -> torch.Tensor:
    """(B, K) multi-hot -> (B, max(1, ceil(K / 32))) int32 words; bit k % 32 of word k // 32 is label k."""
    rows, width = labels.shape
    words = max(1, (width + 31) // 32)
    padded = labels.new_zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :width] = labels.to(torch.bool).to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=labels.device),
                                       torch.arange(32, device=labels.device))
    packed = (padded.view(rows, words, 32) * weights).sum(-1)
    # Reinterpret the unsigned 32-bit words as int32 (the kernels read bits, not values).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(B, W) int32 words back to (B, 32 W) bool."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int64)
    return (((bits.to(torch.int64)[:, :, None] >> shifts) & 1) != 0).reshape(bits.shape[0], -1)


def same_label_pairs(labels: torch.Tensor, candidate_labels: torch.Tensor, exclude_self: bool
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (anchor, candidate) pair with equal labels, in row-major order.

    Returns (offsets[B_a + 1], anchor[P], candidate[P]): the pairs of anchor i are
    offsets[i]:offsets[i + 1], candidates ascending. Memory is O(B + P): the P pairs are semi-hard
    mining's output (one triplet per positive pair), about B^2 / C for C equally frequent labels;
    besides them one P-long index is made, and nothing B x B.
    """
    order = torch.argsort(candidate_labels, stable=True)
    sorted_labels = candidate_labels[order]
    start = torch.searchsorted(sorted_labels, labels, side="left")
    counts = torch.searchsorted(sorted_labels, labels, side="right") - start
    anchor = torch.repeat_interleave(torch.arange(labels.shape[0], device=labels.device), counts)
    # Pair p of anchor i sits at sorted position start[i] + (p - first[i]): one P-long index.
    first = torch.cumsum(counts, 0) - counts
    index = torch.repeat_interleave(start - first, counts)
    index += torch.arange(index.shape[0], device=labels.device)
    candidate = order[index]
    del index
    if exclude_self:
        keep = candidate != anchor
        anchor, candidate = anchor[keep], candidate[keep]
        counts = torch.bincount(anchor, minlength=labels.shape[0])
    offsets = torch.zeros(labels.shape[0] + 1, dtype=torch.int64, device=labels.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, anchor, candidate
