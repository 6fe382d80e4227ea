"""Standardisation of the joint-space embeddings across the batch: the conditioning of the CLIP towers.

Why: mean pooling leaves every sample's embedding dominated by a component all samples share (position
embeddings, the common anatomy or wording: two phantoms' pooled features have a cosine of about 0.97 at
initialisation, two reports' about 0.99). The contrastive gradient between samples is then a small difference
of large terms, and the towers fall onto the losses' collapsed solution within a few dozen steps (one vector
for every input; the loss is lowered through the logit bias alone). Standardising each embedding feature
across the batch (``BatchNorm1d(affine=False)``, Ioffe & Szegedy 2015) removes the shared component and gives
every feature unit spread, so the embeddings cannot collapse in training and the loss reads what differs.

Where: on the projected embeddings, after each tower's projection and before the L2 normalisation. Nothing
with parameters comes after it, so the batch coupling can live in the loss, over exactly the batch the loss
sees: the training losses (``medvl.train.recipes.RecipeLoss``) standardise with
:func:`batch_statistics` over the global batch, all micro-batches of a gradient-accumulation step joined
and every rank of the process group all-reduced with gradient (as SyncBatchNorm does), so N ranks train as
one process on the global batch and K micro-batches as one batch of K·B. The model itself only ever applies
stored statistics (:class:`FeatureStandardizer`), so a single volume or sentence is encoded the same way
whatever else is in its batch.

Stored statistics: the population mean and variance of the training embeddings under the final weights,
measured after training ("precise" statistics rather than a moving average of stale batches; Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm"): :meth:`FeatureStandardizer.calibrate`. Before calibration they
are mean 0 and variance 1, i.e. (up to eps) no standardisation.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from medvl.nn.distributed import all_reduce_sum, global_sum, world_size

__all__ = ["EPS", "FeatureStandardizer", "batch_statistics", "standardize"]

# Added to the variance, as BatchNorm's default.
EPS = 1e-5


def batch_statistics(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (biased) variance of the rows of ``x`` (any leading shape, features last), over
    every rank of ``group`` when given; both differentiable with respect to ``x`` on every rank. In float64:
    the variance is E[x^2] - E[x]^2, and the embeddings' shared component (the reason to standardise) makes
    the mean large against the spread, which float32 would cancel away."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
    sums = torch.cat([rows.sum(0), rows.square().sum(0)])
    count = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=x.device)
    if world_size(group) > 1:
        sums = all_reduce_sum(sums, group)
        count = global_sum(count, group)
    mean = sums[:rows.shape[1]] / count
    var = (sums[rows.shape[1]:] / count - mean.square()).clamp_min(0.0)
    return mean, var


def standardize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the last axis, in ``x``'s dtype (the difference taken in the
    statistics' precision, so a large shared component cancels exactly)."""
    wide = torch.promote_types(x.dtype, mean.dtype)
    return ((x.to(wide) - mean.to(wide)) * torch.rsqrt(var.to(wide) + eps)).to(x.dtype)


class FeatureStandardizer(nn.Module):
    """Stored per-feature statistics of a tower's projected embeddings, applied as :func:`standardize`.

    ``forward(x)``: any leading shape, ``width`` features last. Buffers (saved with the weights): ``mean``,
    ``var`` and ``num_samples`` (how many embeddings the statistics were measured on; 0: never, and the
    buffers are the identity's 0 and 1).
    """

    def __init__(self, width: int, eps: float = EPS):
        super().__init__()
        self.width, self.eps = int(width), float(eps)
        self.register_buffer("mean", torch.zeros(self.width))
        self.register_buffer("var", torch.ones(self.width))
        self.register_buffer("num_samples", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.width}, eps={self.eps}, num_samples={int(self.num_samples)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ValueError(f"FeatureStandardizer: expected {self.width} features on the last axis, got shape "
                             f"{tuple(x.shape)}")
        return standardize(x, self.mean, self.var, self.eps)

    @torch.no_grad()
    def calibrate(self, embeddings: torch.Tensor) -> None:
        """Store the mean and variance of ``embeddings`` (N, width): a population of the training data
        encoded with the final weights."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.width or embeddings.shape[0] < 2:
            raise ValueError(f"calibrate: expected (N >= 2, {self.width}) embeddings, got {tuple(embeddings.shape)}")
        x = embeddings.to(torch.float64)
        self.mean.copy_(x.mean(0).to(self.mean.dtype))
        self.var.copy_(x.var(0, unbiased=False).to(self.var.dtype))
        self.num_samples.fill_(int(x.shape[0]))

    @torch.no_grad()
    def fold(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` with ``x @ W'.T + b' == standardize(x @ weight.T)``: a bias-free projection followed
        by this standardisation, as one affine map (what evaluation applies to cached features)."""
        scale = torch.rsqrt(self.var.to(torch.float64) + self.eps)
        folded = weight.detach().to(torch.float64) * scale[:, None]
        bias = -self.mean.to(torch.float64) * scale
        return folded.to(weight.dtype), bias.to(weight.dtype)

