"""MultiPositiveContrastiveLoss: MR-CLIP's InfoNCE in which every text of the volume's category is a positive.

With a learnable, capped temperature. Reference: ``medvl.reference.multi_positive_loss``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medvl.nn.distributed import gather_with_grad

__all__ = ["MultiPositiveContrastiveLoss"]


def _multi_positive_side(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per row: mean over the positive columns of -log softmax(row)."""
    log_p = torch.log_softmax(logits, dim=1)
    n = positives.sum(1).clamp(min=1).to(log_p.dtype)
    return -(torch.where(positives, log_p, torch.zeros_like(log_p)).sum(1) / n)


class MultiPositiveContrastiveLoss(nn.Module):
    """MR-CLIP's contrastive loss: every text of the volume's category is a positive.

    ``logits = s * V @ T^T`` with ``s = exp(log_scale)`` capped at ``max_scale`` (100; clamped in
    the forward, so the scale gets no gradient while above the cap), ``log_scale`` a parameter
    initialised at ``log(init_scale)`` (1 / 0.07). Features are used as given (pass normalised
    ones, as CLIPModel returns). For volume i, the loss is the mean over the texts j of the same
    category of ``-log softmax_j``; the same from the text side; total ``0.5 * image + 0.5 * text``,
    each the mean over rows. Image i and text i form a pair and are always positives of each other,
    also when ``labels[i] == -1`` (no category: plain CLIP for that row; -1 never matches another).

    With a process group (same batch size on every rank), the volumes, texts and labels of all
    ranks are gathered; each rank's loss covers its own volumes against all texts and its own
    texts against all volumes. The gather carries gradient back to each feature's owner (open_clip's
    gather_with_grad=True), so under DDP over W ranks the averaged gradient equals that of one
    process on the whole batch.
    """

    def __init__(self, init_scale: float = 1.0 / 0.07, max_scale: float = 100.0, learn_scale: bool = True,
                 group=None):
        super().__init__()
        value = torch.tensor(math.log(init_scale), dtype=torch.float32)
        if learn_scale:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.max_scale, self.group = float(max_scale), group

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B = image_features.shape[0]
        if text_features.shape[0] != B or labels.shape != (B,):
            raise ValueError(f"MultiPositiveContrastiveLoss: image/text pairs and labels (B={B},) expected, got "
                             f"{tuple(image_features.shape)}, {tuple(text_features.shape)}, {tuple(labels.shape)}")
        labels = labels.to(device=image_features.device, dtype=torch.long)
        offset = 0
        all_images, all_texts, all_labels = image_features, text_features, labels
        if self.group is not None:
            import torch.distributed as dist
            offset = dist.get_rank(self.group) * B
            all_images = gather_with_grad(image_features, self.group)
            all_texts = gather_with_grad(text_features, self.group)
            all_labels = gather_with_grad(labels, self.group)
        n = all_labels.shape[0]
        same = (labels.unsqueeze(1) == all_labels.unsqueeze(0)) & (labels >= 0).unsqueeze(1)
        pair = torch.arange(B, device=labels.device).unsqueeze(1) + offset == torch.arange(n, device=labels.device)
        positives = same | pair                                                   # (B, n) local rows
        s = self.scale.to(image_features.dtype)
        image_side = _multi_positive_side(s * image_features @ all_texts.t(), positives)
        text_side = _multi_positive_side(s * text_features @ all_images.t(), positives)
        return 0.5 * image_side.mean() + 0.5 * text_side.mean()
