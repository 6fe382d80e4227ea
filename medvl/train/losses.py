"""Training losses of the recipes: RadFinder's disease prompts and localization, MR-CLIP's multi-positive loss.

Each module has a plain-PyTorch reference (``reference_*``) that materialises every intermediate
with explicit loops; the tests compare the two in value and gradient.

* :class:`DiseasePromptLoss` - per finding, a logit ``t * (cos(v, p+) - cos(v, p-))`` between the
  volume embedding ``v`` (through a second copy of the image projection head) and the finding's
  positive / negative prompt embeddings, trained with class-balanced binary cross-entropy.
* :class:`LocalizationLoss` - a report snippet picks the depth bin of the volume it describes:
  softmax over the valid bins of ``cos / temperature``, soft cross-entropy against a Gaussian
  around the true bin.
* :class:`MultiPositiveContrastiveLoss` - InfoNCE in which every text of the same category is a
  positive (MR-CLIP's contrast categories), with a learnable, capped temperature.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medvl.nn.standardize import standardize

__all__ = [
    "DiseasePromptLoss", "LocalizationLoss", "MultiPositiveContrastiveLoss", "center_depth",
    "prompt_pos_weight", "gaussian_bin_targets", "gather_with_grad",
    "reference_disease_prompt_loss", "reference_localization_loss", "reference_multi_positive_loss",
]


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that stays attached to the graph of `tensors` (so backward() still works)."""
    return sum(t.sum() * 0.0 for t in tensors)


def _world(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(group)


def _global_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks of ``group`` (a constant: no gradient); ``x`` itself without one."""
    if _world(group) == 1:
        return x
    import torch.distributed as dist
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def _ddp_mean(local_sum: torch.Tensor, local_count: torch.Tensor, group) -> torch.Tensor:
    """This rank's share of a mean over every rank's entries, scaled for DistributedDataParallel.

    DDP averages gradients over the W ranks, so each rank returns ``W * local_sum / global_count``:
    the average of those is ``global_sum / global_count``, the loss one process would compute on
    the whole batch, and so are its gradients.
    """
    count = _global_sum(local_count.to(local_sum.dtype), group)
    return local_sum * _world(group) / count


# --------------------------------------------------------------------------------------------
# Disease prompts
# --------------------------------------------------------------------------------------------

def prompt_pos_weight(labels: torch.Tensor, max_weight: float = 20.0, group=None) -> torch.Tensor:
    """Per-finding positive weight ``min(n_neg / n_pos, max_weight)`` from the known labels of a batch.

    ``labels`` (B, F) holds 1 (positive), 0 (negative) or -1 (unknown). A finding with no positive
    or no negative among the known labels gets weight 1 (plain BCE): with n_pos = 0 the weight
    multiplies nothing, and with n_neg = 0 the ratio 0 would silence the positives entirely.
    With a process group the counts are those of every rank's labels. The result is a constant
    (no gradient), shape (F,), float32.
    """
    counts = torch.stack([(labels == 1).sum(0), (labels == 0).sum(0)]).float()
    n_pos, n_neg = _global_sum(counts, group)
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
    rank's known entries (each rank returns its share, see :func:`_ddp_mean`), so DDP over W ranks
    equals one process on the whole batch.
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
            return _zero(logits)
        total = torch.where(known, per_entry, torch.zeros_like(per_entry)).sum()
        if self.group is None:
            return total / n_known
        if not bool(_global_sum(n_known, self.group) > 0):
            return _zero(logits)
        return _ddp_mean(total, n_known, self.group)


def reference_disease_prompt_loss(volume_embeddings, positive_prompts, negative_prompts, labels, logit_scale,
                                  head_weight=None, max_pos_weight: float = 20.0) -> torch.Tensor:
    """Loop-by-entry reference of :class:`DiseasePromptLoss` (``head_weight`` (out, in) or None)."""
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


# --------------------------------------------------------------------------------------------
# Localization
# --------------------------------------------------------------------------------------------

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
    :func:`_ddp_mean`).
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
            return per_row[rows].mean() if bool(rows.any()) else _zero(logits)
        if not bool(_global_sum(rows.sum(), self.group) > 0):
            return _zero(logits)
        return _ddp_mean(torch.where(rows, per_row, torch.zeros_like(per_row)).sum(), rows.sum(), self.group)


def reference_localization_loss(snippet_features, depth_features, target, mask=None, temperature: float = 0.1,
                                sigma: float = LOCALIZATION_SIGMA_BINS) -> torch.Tensor:
    """Row-by-row reference of :class:`LocalizationLoss`."""
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


# --------------------------------------------------------------------------------------------
# Multi-positive contrastive (MR-CLIP)
# --------------------------------------------------------------------------------------------

class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and hands each
    rank its own slice. All-reduce, not reduce-scatter, so that gloo (which has no reduce-scatter)
    runs it too; the features are (B, D), so the extra traffic is small."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over the ranks of ``group`` of ``x`` (same shape on every rank); gradients flow
    back to the rank that owns each slice, summed over every rank's loss."""
    if not x.requires_grad:
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)
    return _GatherWithGrad.apply(x, group)


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


def reference_multi_positive_loss(image_features, text_features, labels, scale) -> torch.Tensor:
    """Row-by-row single-process reference of :class:`MultiPositiveContrastiveLoss` (``scale`` already capped)."""
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
