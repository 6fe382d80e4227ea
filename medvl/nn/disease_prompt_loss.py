"""DiseasePromptLoss: RadFinder's disease-prompt supervision of the volume embeddings.

Per finding, a logit ``t * (cos(v, p+) - cos(v, p-))`` between the volume embedding ``v`` (through a
second copy of the image projection head) and the finding's positive / negative prompt embeddings,
trained with class-balanced binary cross-entropy. Reference: ``medvl.reference.disease_prompt_loss``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medvl.nn.distributed import attached_zero, ddp_mean, global_sum
from medvl.nn.standardize import standardize

__all__ = ["DiseasePromptLoss", "prompt_pos_weight"]


def prompt_pos_weight(labels: torch.Tensor, max_weight: float = 20.0, group=None) -> torch.Tensor:
    """Per-finding positive weight ``min(n_neg / n_pos, max_weight)`` from the known labels of a batch.

    ``labels`` (B, F) holds 1 (positive), 0 (negative) or -1 (unknown). A finding with no positive
    or no negative among the known labels gets weight 1 (plain BCE): with n_pos = 0 the weight
    multiplies nothing, and with n_neg = 0 the ratio 0 would silence the positives entirely.
    With a process group the counts are those of every rank's labels. The result is a constant
    (no gradient), shape (F,), float32.
    """
    counts = torch.stack([(labels == 1).sum(0), (labels == 0).sum(0)]).float()
    n_pos, n_neg = global_sum(counts, group)
    ratio = (n_neg / n_pos.clamp(min=1.0)).clamp(max=max_weight)
    return torch.where((n_pos > 0) & (n_neg > 0), ratio, torch.ones_like(ratio))


class DiseasePromptLoss(nn.Module):
    """RadFinder's disease-prompt supervision, class-balanced BCE over known finding labels.

    The module owns ``head``, a bias-free ``Linear(embed_dim_in, out_dim)``: a second copy of the
    CLIP image projection (copy its weights with :meth:`init_from`), trained by this loss only.
    With ``embed_dim_in=None`` there is no head and the volume embeddings must already be in the
    text space.

    ``forward(volume_embeddings (B, E_in), positive_prompts, negative_prompts, labels (B, F) in
    {1, 0, -1}, logit_scale, statistics=None)``: prompts are (F, D), one per finding for the whole batch, or
    (B, F, D), each sample's own variant (RadFinder draws a template per sample).
    ``v = normalize(head(x))`` (``normalize(standardize(head(x), *statistics))`` with ``statistics``, the
    (mean, var) of the head's projection over the batch), prompts are normalised too, logit
    ``t * (cos(v, p+) - cos(v, p-))`` with ``t`` the multiplier (already exp'd); BCE with logits,
    ``pos_weight`` from :func:`prompt_pos_weight`, unknown labels masked out, mean over the known
    entries (0, attached to the graph, when none).

    With a process group, ``pos_weight`` counts every rank's labels and the mean runs over every
    rank's known entries (each rank returns its share, see :func:`~medvl.nn.distributed.ddp_mean`),
    so DDP over W ranks equals one process on the whole batch.
    """

    def __init__(self, embed_dim_in: Optional[int] = None, out_dim: Optional[int] = None,
                 max_pos_weight: float = 20.0, group=None):
        super().__init__()
        if (embed_dim_in is None) != (out_dim is None):
            raise ValueError("DiseasePromptLoss: give both embed_dim_in and out_dim, or neither (no head)")
        self.head = None if embed_dim_in is None else nn.Linear(embed_dim_in, out_dim, bias=False)
        self.max_pos_weight = float(max_pos_weight)
        self.group = group

    @torch.no_grad()
    def init_from(self, linear: nn.Linear) -> "DiseasePromptLoss":
        """Copy the weight of the CLIP image projection ``linear`` into ``head`` (shapes must match)."""
        if self.head is None:
            raise ValueError("DiseasePromptLoss.init_from: this loss was built without a head")
        if linear.weight.shape != self.head.weight.shape:
            raise ValueError(f"DiseasePromptLoss.init_from: projection weight {tuple(linear.weight.shape)} "
                             f"does not match head {tuple(self.head.weight.shape)}")
        self.head.weight.copy_(linear.weight)
        return self

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``head(x)`` (identity without a head), not normalised; works on any leading shape."""
        return x if self.head is None else self.head(x)

    def forward(self, volume_embeddings: torch.Tensor, positive_prompts: torch.Tensor,
                negative_prompts: torch.Tensor, labels: torch.Tensor, logit_scale,
                statistics: Optional[tuple] = None) -> torch.Tensor:
        if labels.dim() != 2 or labels.shape[0] != volume_embeddings.shape[0]:
            raise ValueError(f"DiseasePromptLoss: labels must be (B, F) with B={volume_embeddings.shape[0]}, "
                             f"got {tuple(labels.shape)}")
        B, n_findings = labels.shape
        per_sample = positive_prompts.dim() == 3
        expected = (B, n_findings) if per_sample else (n_findings,)
        if positive_prompts.shape != negative_prompts.shape or tuple(positive_prompts.shape[:-1]) != expected:
            raise ValueError(f"DiseasePromptLoss: positive/negative prompts must both be (F={n_findings}, D) or "
                             f"(B={B}, F={n_findings}, D), got {tuple(positive_prompts.shape)} and "
                             f"{tuple(negative_prompts.shape)}")
        v = self.project(volume_embeddings)
        if statistics is not None:  # (mean, var) of the head's projection over the batch
            v = standardize(v, *statistics)
        v = F.normalize(v, dim=-1)
        pos = F.normalize(positive_prompts, dim=-1)
        neg = F.normalize(negative_prompts, dim=-1)
        if per_sample:
            logits = logit_scale * torch.einsum("bd,bfd->bf", v, pos - neg)
        else:
            logits = logit_scale * (v @ pos.t() - v @ neg.t())                   # (B, F)
        labels = labels.to(logits.device)
        known = labels >= 0
        pos_weight = prompt_pos_weight(labels, self.max_pos_weight, self.group).to(logits.dtype)
        per_entry = F.binary_cross_entropy_with_logits(
            logits, (labels == 1).to(logits.dtype), pos_weight=pos_weight, reduction="none")
        n_known = known.sum()
        if self.group is None and not bool(known.any()):
            return attached_zero(logits)
        total = torch.where(known, per_entry, torch.zeros_like(per_entry)).sum()
        if self.group is None:
            return total / n_known
        if not bool(global_sum(n_known, self.group) > 0):
            return attached_zero(logits)
        return ddp_mean(total, n_known, self.group)
