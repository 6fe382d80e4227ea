"""Localization loss, written row by row: the Gaussian target and the softmax over each volume's valid bins."""

from __future__ import annotations

import math

import torch


def localization_loss(snippet_features, depth_features, target, mask=None, *, temperature: float,
                      sigma: float) -> torch.Tensor:
    """Row-by-row reference of :class:`medvl.nn.LocalizationLoss` (``sigma`` in depth bins)."""
    B, n_z, _ = depth_features.shape
    terms = []
    for b in range(B):
        t = int(target[b])
        if t < 0:
            continue
        valid = [k for k in range(n_z) if mask is None or bool(mask[b, k])]
        s = snippet_features[b] / snippet_features[b].norm()
        logits = torch.stack([(s * depth_features[b, k]).sum() / depth_features[b, k].norm() for k in valid])
        logits = logits / temperature
        log_p = logits - torch.logsumexp(logits, 0)
        q = [math.exp(-((k - t) ** 2) / (2 * sigma ** 2)) for k in valid]
        total = sum(q)
        terms.append(-sum(qk / total * log_p[i] for i, qk in enumerate(q)))
    if not terms:
        return snippet_features.sum() * 0.0
    return torch.stack(terms).mean()
