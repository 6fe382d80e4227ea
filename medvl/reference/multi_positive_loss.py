"""Multi-positive contrastive loss, written row by row with each row's positives listed."""

from __future__ import annotations

import torch


def multi_positive_loss(image_features, text_features, labels, scale) -> torch.Tensor:
    """Row-by-row single-process reference of :class:`medvl.nn.MultiPositiveContrastiveLoss` (``scale``
    already capped)."""
    B = image_features.shape[0]
    logits = scale * image_features @ text_features.t()

    def side(matrix):
        rows = []
        for i in range(B):
            log_p = matrix[i] - torch.logsumexp(matrix[i], 0)
            pos = [j for j in range(B) if j == i or (int(labels[i]) >= 0 and int(labels[j]) == int(labels[i]))]
            rows.append(-sum(log_p[j] for j in pos) / len(pos))
        return torch.stack(rows).mean()

    return 0.5 * side(logits) + 0.5 * side(logits.t())
