"""Supervised contrastive loss (Khosla et al. 2020), as MR-CLIP trains with, in O(B * chunk) memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_losses(rows: torch.Tensor, embeddings: torch.Tensor, row_labels: torch.Tensor, labels: torch.Tensor,
                  first: int, temperature: float) -> torch.Tensor:
    logits = rows @ embeddings.T / temperature
    own = torch.arange(first, first + rows.shape[0], device=rows.device)[:, None] == torch.arange(
        embeddings.shape[0], device=rows.device)[None, :]
    logits = logits.masked_fill(own, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (row_labels[:, None] == labels[None, :]) & ~own
    count = positives.sum(1)
    total = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return torch.where(count > 0, -total / count.clamp_min(1), torch.zeros_like(total))


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (rows of the B x B logits held at once, e.g. "
                         f"1024), got {chunk_size!r}")


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1, chunk_size: int = 1024
                ) -> torch.Tensor:
    """Mean over anchors with a nonzero loss of -mean_{p in P(i)} log softmax_{k != i}(cos(i, k) / T)[p].

    Rows are processed chunk by chunk under activation checkpointing, so neither the forward nor
    the backward holds more than chunk_size x B logits. Equal to pytorch-metric-learning's
    SupConLoss (cosine similarity, AvgNonZeroReducer) on the same inputs.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (B, D) tensor, got shape {tuple(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _check_chunk_size(chunk_size)
    normalized = F.normalize(embeddings, dim=1)
    losses = []
    for first in range(0, normalized.shape[0], chunk_size):
        rows = normalized[first:first + chunk_size]
        row_labels = labels[first:first + chunk_size]
        if torch.is_grad_enabled() and embeddings.requires_grad:
            losses.append(checkpoint(_chunk_losses, rows, normalized, row_labels, labels, first, temperature,
                                     use_reentrant=False))
        else:
            losses.append(_chunk_losses(rows, normalized, row_labels, labels, first, temperature))
    per_anchor = torch.cat(losses)
    active = per_anchor > 0
    return per_anchor.sum() / active.sum().clamp_min(1)


class SupConLoss(torch.nn.Module):
    """Supervised contrastive loss with several positives per anchor (shared label).

    Example:
        >>> loss = SupConLoss(temperature=0.1)(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    """

    def __init__(self, temperature: float = 0.1, chunk_size: int = 1024):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        _check_chunk_size(chunk_size)
        self.temperature, self.chunk_size = temperature, chunk_size

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(embeddings, labels, self.temperature, self.chunk_size)
