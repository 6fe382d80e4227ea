"""Triplet losses over mined triplets: TripletLoss and MedTrim's four-term MedTrimLoss."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from medvl.ops.triplet_mining import triplet_mining
from medvl.options import look_up_option, unknown_option
from medvl.reference.triplet_mining import DISTANCES, Triplets

REDUCTIONS = ("mean", "sum", "mean_nonzero")


def row_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between matching rows, differentiable; the same definitions mining uses."""
    if distance == "euclidean":
        return torch.linalg.vector_norm(a - b, dim=1)
    if distance == "squared_euclidean":
        return (a - b).pow(2).sum(1)
    if distance == "cosine":
        norms = torch.linalg.vector_norm(a, dim=1).clamp_min(1e-12) * torch.linalg.vector_norm(b, dim=1).clamp_min(1e-12)
        return 1 - (a * b).sum(1) / norms
    raise unknown_option(distance, DISTANCES, name="distance")


def triplet_margin_loss(anchors: torch.Tensor, candidates: torch.Tensor, triplets: Triplets, margin: float,
                        distance: str, reduction: str) -> torch.Tensor:
    """Hinge max(d(a, p) - d(a, n) + margin, 0) over triplets; gradients flow through the gathers."""
    look_up_option(reduction, REDUCTIONS, name="reduction")
    anchor, positive, negative = triplets
    if anchor.numel() == 0:
        # No triplet: a zero that still belongs to the graph, so backward() works.
        return (anchors.sum() + candidates.sum()) * 0.0
    a = anchors[anchor]
    losses = torch.relu(row_distance(a, candidates[positive], distance)
                        - row_distance(a, candidates[negative], distance) + margin)
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    active = losses > 0
    return losses.sum() / active.sum().clamp_min(1)


class TripletLoss(torch.nn.Module):
    """Triplet margin loss on mined triplets (batch-hard by default), memory O(B * D).

    ``loss(embeddings, labels)`` mines within the batch; ``loss(anchors, labels, candidates=texts,
    candidate_labels=...)`` mines across modalities. ``reduction="mean_nonzero"`` averages over
    the triplets that violate the margin (pytorch-metric-learning's default reducer).

    Example:
        >>> loss = TripletLoss(margin=0.2)(torch.randn(16, 8), torch.randint(0, 4, (16,)))
    """

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", strategy: str = "batch_hard",
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        if strategy == "entities":
            raise ValueError("strategy='entities' mines from entity sets: use MedTrimLoss")
        look_up_option(reduction, REDUCTIONS, name="reduction")
        self.margin, self.distance, self.strategy, self.reduction, self.backend = (
            margin, distance, strategy, reduction, backend)

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                candidates: Optional[torch.Tensor] = None, candidate_labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        triplets = triplet_mining(embeddings, candidates, labels=labels, candidate_labels=candidate_labels,
                                  strategy=self.strategy, distance=self.distance, backend=self.backend)
        return triplet_margin_loss(embeddings, embeddings if candidates is None else candidates, triplets,
                                   self.margin, self.distance, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, strategy={self.strategy!r}"


class MedTrimLoss(torch.nn.Module):
    """MedTrim's multimodal triplet alignment (Ozturk et al. 2025, arXiv:2504.15929).

    Triplets are mined from entity scores (disease, adjective, direction sets parsed from each
    report) in four directions: image-image, text-text, image-text and text-image; the loss is
    the weighted sum of the four hinge losses. Image i and text i share report i's entities.
    ``weights`` default to 1 each (the four terms summed).

    The entity score of two reports is ``0.85 IoU(diseases) + 0.10 IoU(adjectives) + 0.05 IoU(directions)``
    (``entity_weights``; two reports without a disease have disease IoU 1): what a report is about is its
    findings, so the disease term decides, and the adjectives (size, severity) and directions (side, lobe),
    0.15 together, only refine the order among reports with similar findings. Per anchor the positive is the
    candidate of highest score and the negative the one of lowest score within ``score_range`` = [0, 0.6):
    a report that shares no finding (score 0 to 0.15) is eligible, and is the one pushed away first, as
    Precision@R counts it irrelevant; candidates scoring 0.6 or more (most findings shared) are never
    negatives. The mining op's
    own default range, [0.25, 0.6), excludes exactly the unrelated reports (0 of 3,428 finding-disjoint
    pairs were eligible over 50 phantom batches), so the loss only ever pushed partly related reports apart.

    ``mining="batch_hard"`` is the baseline MedTrim compares against: the same four terms, triplets
    mined batch-hard with positives = samples whose disease entity sets are identical (the hardest
    positive and hardest negative per anchor), i.e. class labels without the graded entity score.

    Example:
        >>> sets = [torch.rand(8, k) < 0.3 for k in (14, 6, 9)]
        >>> loss = MedTrimLoss()(torch.randn(8, 16), torch.randn(8, 16), sets)
    """

    TERMS = ("image_image", "text_text", "image_text", "text_image")
    MINING = ("entities", "batch_hard")

    def __init__(self, margin: float = 0.3, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 distance: str = "euclidean", entity_weights: Sequence[float] = (0.85, 0.10, 0.05),
                 score_range: Tuple[float, float] = (0.0, 0.6), reduction: str = "mean",
                 backend: Optional[str] = None, mining: str = "entities"):
        super().__init__()
        look_up_option(mining, self.MINING, name="mining")
        self.mining = mining
        if len(weights) != 4:
            raise ValueError(f"weights must hold four numbers ({', '.join(self.TERMS)}), got {tuple(weights)}")
        self.margin, self.weights, self.distance = margin, tuple(float(w) for w in weights), distance
        self.entity_weights, self.score_range = tuple(entity_weights), tuple(score_range)
        self.reduction, self.backend = reduction, backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, entities: Sequence[torch.Tensor],
                output_dict: bool = False) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        directions = {
            "image_image": (image_features, None),
            "text_text": (text_features, None),
            "image_text": (image_features, text_features),
            "text_image": (text_features, image_features),
        }
        terms = {}
        if self.mining == "batch_hard":
            # one class id per distinct disease set: identical sets are positives of each other
            labels = torch.unique(entities[0].to(torch.uint8), dim=0, return_inverse=True)[1]
        for name, (anchors, candidates) in directions.items():
            if self.mining == "batch_hard":
                triplets = triplet_mining(anchors, candidates, labels=labels, strategy="batch_hard",
                                          distance=self.distance, backend=self.backend)
            else:
                triplets = triplet_mining(anchors, candidates, entities=entities, strategy="entities",
                                          distance=self.distance, entity_weights=self.entity_weights,
                                          score_range=self.score_range, backend=self.backend)
            terms[name] = triplet_margin_loss(anchors, anchors if candidates is None else candidates, triplets,
                                              self.margin, self.distance, self.reduction)
        total = sum(w * terms[name] for w, name in zip(self.weights, self.TERMS))
        return {"loss": total, **terms} if output_dict else total
