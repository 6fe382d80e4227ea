"""LocalizationLoss: RadFinder's intra-scan localization, which depth bin of its volume a report snippet describes.

Softmax over the valid bins of ``cos / temperature``, soft cross-entropy against a Gaussian around the
true bin. Reference: ``medvl.reference.localization_loss``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medvl.nn.distributed import attached_zero, ddp_mean, global_sum

__all__ = ["LOCALIZATION_SIGMA_BINS", "LocalizationLoss", "center_depth", "gaussian_bin_targets"]

# Width (in depth bins) of the localization target. The tiny model has 4 depth bins (32 slices / patch_z 8):
# sigma = 2 bins spreads the target to about (0.26, 0.30, 0.26, 0.18), at most 0.075 nats away from the
# uniform guess, so the term barely says where a finding is; sigma = 0.5 gives (0.11, 0.79, 0.11) around the
# true bin: most of the mass on it, a little on its neighbours, which a finding that spans a bin edge touches.
LOCALIZATION_SIGMA_BINS = 0.5


def center_depth(depth: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, n_z, D) depth features minus each volume's mean over its valid depth bins (``mask`` (B, n_z) bool,
    all valid when None); invalid bins are left as they are."""
    if mask is None:
        return depth - depth.mean(1, keepdim=True)
    weights = mask.to(device=depth.device, dtype=depth.dtype).unsqueeze(-1)
    mean = (depth * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
    return torch.where(weights > 0, depth - mean, depth)


def gaussian_bin_targets(target: torch.Tensor, mask: torch.Tensor, sigma: float = LOCALIZATION_SIGMA_BINS,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Soft targets (B, n_z): ``exp(-(k - target)^2 / (2 sigma^2))`` over the valid bins, normalised per row.

    Rows whose target is -1 come back all zero. ``mask`` (B, n_z) bool marks the valid bins.
    """
    bins = torch.arange(mask.shape[1], device=mask.device, dtype=dtype)
    centre = target.to(device=mask.device, dtype=dtype).unsqueeze(1)
    weights = torch.exp(-(bins.unsqueeze(0) - centre) ** 2 / (2.0 * sigma ** 2))
    weights = weights * (mask & (target.to(mask.device) >= 0).unsqueeze(1))
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-30)


class LocalizationLoss(nn.Module):
    """RadFinder's intra-scan localization: which depth bin of its volume does a report snippet describe.

    ``forward(snippet_features (B, D), depth_features (B, n_z, D), target (B,) long, mask (B, n_z) bool
    or None)``. Depth features are expected already through the projection head; both sides are
    normalised here. Logits ``cos / temperature`` over the valid bins of each row (``mask``, all
    valid when None), soft cross-entropy against :func:`gaussian_bin_targets` (sigma in bins).
    Rows with target -1 are skipped; the loss is the mean over the other rows (0, attached to the
    graph, when none). A target outside ``[0, n_z)`` or on an invalid bin raises ValueError.
    With a process group the mean runs over every rank's rows (each rank returns its share, see
    :func:`~medvl.nn.distributed.ddp_mean`).
    """

    def __init__(self, temperature: float = 0.1, sigma: float = LOCALIZATION_SIGMA_BINS, group=None):
        super().__init__()
        if temperature <= 0 or sigma <= 0:
            raise ValueError(f"LocalizationLoss: temperature and sigma must be > 0, got {temperature}, {sigma}")
        self.temperature, self.sigma = float(temperature), float(sigma)
        self.group = group

    def forward(self, snippet_features: torch.Tensor, depth_features: torch.Tensor, target: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, n_z, _ = depth_features.shape
        if snippet_features.shape[0] != B or target.shape != (B,):
            raise ValueError(f"LocalizationLoss: snippet_features (B={B}, D) and target (B,) expected, got "
                             f"{tuple(snippet_features.shape)} and {tuple(target.shape)}")
        mask = torch.ones(B, n_z, dtype=torch.bool, device=depth_features.device) if mask is None \
            else mask.to(device=depth_features.device, dtype=torch.bool)
        if mask.shape != (B, n_z):
            raise ValueError(f"LocalizationLoss: mask must be (B={B}, n_z={n_z}), got {tuple(mask.shape)}")
        target = target.to(device=depth_features.device, dtype=torch.long)
        rows = target >= 0
        if bool((target >= n_z).any()):
            raise ValueError(f"LocalizationLoss: depth target outside [0, {n_z}) or -1: {target.tolist()}")
        if not bool(mask[rows, target[rows]].all()):
            raise ValueError("LocalizationLoss: a depth target falls on a bin that depth_mask marks invalid")
        s = F.normalize(snippet_features, dim=-1)
        d = F.normalize(depth_features, dim=-1)
        logits = torch.einsum("bd,bzd->bz", s, d) / self.temperature
        log_p = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        q = gaussian_bin_targets(target, mask, self.sigma, dtype=log_p.dtype)
        per_row = -torch.where(mask, q * log_p, torch.zeros_like(log_p)).sum(1)
        if self.group is None:
            return per_row[rows].mean() if bool(rows.any()) else attached_zero(logits)
        if not bool(global_sum(rows.sum(), self.group) > 0):
            return attached_zero(logits)
        return ddp_mean(torch.where(rows, per_row, torch.zeros_like(per_row)).sum(), rows.sum(), self.group)
