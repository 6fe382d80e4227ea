"""Disease-prompt loss, written entry by entry: each finding's positive weight counted from its column."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def disease_prompt_loss(volume_embeddings, positive_prompts, negative_prompts, labels, logit_scale,
                        head_weight=None, max_pos_weight: float = 20.0) -> torch.Tensor:
    """Loop-by-entry reference of :class:`medvl.nn.DiseasePromptLoss` (``head_weight`` (out, in) or None)."""
    x = volume_embeddings if head_weight is None else volume_embeddings @ head_weight.t()
    B, n_findings = labels.shape
    terms = []
    for f in range(n_findings):
        column = [int(labels[b, f]) for b in range(B)]
        n_pos, n_neg = column.count(1), column.count(0)
        weight = min(n_neg / n_pos, max_pos_weight) if n_pos > 0 and n_neg > 0 else 1.0
        for b in range(B):
            if column[b] < 0:
                continue
            pf = positive_prompts[b, f] if positive_prompts.dim() == 3 else positive_prompts[f]
            nf = negative_prompts[b, f] if negative_prompts.dim() == 3 else negative_prompts[f]
            p, n = pf / pf.norm(), nf / nf.norm()
            v = x[b] / x[b].norm()
            z = logit_scale * ((v * p).sum() - (v * n).sum())
            # log sigmoid(z) and log(1 - sigmoid(z)) = log sigmoid(-z), in their stable form
            terms.append(-weight * F.logsigmoid(z) if column[b] == 1 else -F.logsigmoid(-z))
    if not terms:
        return x.sum() * 0.0
    return torch.stack(terms).mean()
