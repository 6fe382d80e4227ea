"""Sigmoid contrastive loss, written the obvious way with a full B_img x B_txt logit matrix."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from medvl.options import unknown_option

TARGETS = ("pair", "label", "jaccard")
REDUCTIONS = ("image_mean", "mean", "sum")


def reduction_scale(reduction: str, n_image: int, n_text_total: int) -> float:
    """What the summed loss is multiplied by: 1 / B_img (open_clip's convention), 1 / (B_img B_txt), or 1."""
    if reduction == "image_mean":
        return 1.0 / n_image
    if reduction == "mean":
        return 1.0 / (n_image * n_text_total)
    if reduction == "sum":
        return 1.0
    raise unknown_option(reduction, REDUCTIONS, name="reduction")


def sigmoid_loss_targets(
    n_image: int,
    n_text: int,
    target: str = "pair",
    image_labels: Optional[torch.Tensor] = None,
    text_labels: Optional[torch.Tensor] = None,
    diagonal_is_pair: bool = True,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """The (n_image, n_text) target matrix y_ij in [0, 1].

    pair: 1 on the diagonal (i == j) when the texts are this rank's own, else 0.
    label: 1 where image_labels[i] == text_labels[j].
    jaccard: |a_i & b_j| / |a_i | b_j| of multi-hot rows; two empty rows give 1; i == j gives 1
    when the texts are this rank's own.
    """
    if text_labels is None:
        text_labels = image_labels  # a paired batch: text j carries the labels of image j
    rows = torch.arange(n_image, device=device)[:, None]
    cols = torch.arange(n_text, device=device)[None, :]
    diagonal = (rows == cols) & diagonal_is_pair
    if target == "pair":
        return diagonal.to(dtype)
    if target == "label":
        return (image_labels[:, None] == text_labels[None, :]).to(dtype)
    if target == "jaccard":
        a = image_labels.to(torch.float64)
        b = text_labels.to(torch.float64)
        both = a @ b.T
        either = a.sum(1, keepdim=True) + b.sum(1)[None, :] - both
        y = torch.where(either > 0, both / either.clamp_min(1), torch.ones_like(both))
        return torch.where(diagonal, torch.ones_like(y), y).to(dtype)
    raise unknown_option(target, TARGETS, name="target")


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    target: str = "pair",
    image_labels: Optional[torch.Tensor] = None,
    text_labels: Optional[torch.Tensor] = None,
    reduction: str = "image_mean",
    diagonal_is_pair: bool = True,
) -> torch.Tensor:
    """sum_ij BCE-with-logits(logit_scale * <x_i, t_j> + logit_bias, y_ij), reduced.

    Differentiable by autograd in any dtype (float64 for gradcheck); computes in the inputs' dtype.
    """
    logits = logit_scale * image_features @ text_features.T + logit_bias
    y = sigmoid_loss_targets(
        image_features.shape[0], text_features.shape[0], target, image_labels, text_labels,
        diagonal_is_pair, device=logits.device, dtype=logits.dtype,
    )
    total = F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    return total * reduction_scale(reduction, image_features.shape[0], text_features.shape[0])


def sigmoid_loss_parts(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    target: str = "pair",
    image_labels: Optional[torch.Tensor] = None,
    text_labels: Optional[torch.Tensor] = None,
    diagonal_is_pair: bool = True,
    compute_grad: bool = True,
):
    """What every fused backend returns, computed in float32 from the full logit matrix.

    Returns (row_loss[n_image], row_gsum[n_image], grad_image[n_image, D], grad_text[n_text, D]):
    the per-row loss sums, the per-row sums of g_ij = sigmoid(z_ij) - y_ij, and sum_j g_ij t_j,
    sum_i g_ij x_i (not multiplied by logit_scale). Without compute_grad the last three are empty.
    """
    x = image_features.float()
    t = text_features.float()
    logits = logit_scale.float() * (x @ t.T) + logit_bias.float()
    y = sigmoid_loss_targets(
        x.shape[0], t.shape[0], target, image_labels, text_labels, diagonal_is_pair, device=x.device
    )
    row_loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)
    if not compute_grad:
        empty = x.new_empty(0)
        return row_loss, empty, empty, empty
    g = torch.sigmoid(logits) - y
    return row_loss, g.sum(1), g @ t, g.T @ x
