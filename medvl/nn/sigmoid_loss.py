"""SigLIPLoss: a drop-in for open_clip's SigLipLoss, backed by medvl.sigmoid_loss."""

from __future__ import annotations

from typing import Optional

import torch

from medvl.ops.sigmoid_loss import sigmoid_loss


class SigLIPLoss(torch.nn.Module):
    """Sigmoid contrastive loss (Zhai et al. 2023) with fused gradients, O(B * D) memory.

    Called as open_clip's ``SigLipLoss``: ``loss(image_features, text_features, logit_scale,
    logit_bias, output_dict=False)`` where ``logit_scale`` is the multiplier (already exp'd).
    ``target="label"`` or ``"jaccard"`` take labels per call through ``image_labels`` /
    ``text_labels``. With a process group, each rank sees the texts of every rank.

    Example:
        >>> loss_fn = SigLIPLoss()
        >>> x, t = torch.randn(4, 16), torch.randn(4, 16)
        >>> loss = loss_fn(x, t, torch.tensor(10.0), torch.tensor(-10.0))
    """

    def __init__(
        self,
        target: str = "pair",
        reduction: str = "image_mean",
        group=None,
        dist_mode: str = "ring",
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.target = target
        self.reduction = reduction
        self.group = group
        self.dist_mode = dist_mode
        self.backend = backend

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
        *,
        image_labels: Optional[torch.Tensor] = None,
        text_labels: Optional[torch.Tensor] = None,
    ):
        loss = sigmoid_loss(
            image_features, text_features, logit_scale, logit_bias,
            target=self.target, image_labels=image_labels, text_labels=text_labels,
            reduction=self.reduction, group=self.group, dist_mode=self.dist_mode, backend=self.backend,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"target={self.target!r}, reduction={self.reduction!r}, dist_mode={self.dist_mode!r}"
