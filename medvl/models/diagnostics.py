"""Is a CLIP model's embedding space collapsed? Measures on the features of a set of samples.

A model whose towers map every input to (nearly) one vector has found the contrastive losses' collapsed
solution: it can lower the loss only through the logit bias, and ranks everything alike. Its signs, on
held-out samples: any two volumes (or two different texts) have a cosine near 1, and a volume is no closer
to its own text than to the others. The trainer (``medvl.train.diagnostics``) and the evaluation report
(``medvl.eval``) read them from here, so both say "collapsed" on the same rule.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["COLLAPSE_COSINE", "embedding_spread"]

# Mean cosine between two different samples above which a modality counts as collapsed. A trained model on
# the phantoms keeps it well below (the samples share one anatomy, so it is not near 0 either); at the
# collapsed solution it is above 0.999.
COLLAPSE_COSINE = 0.95


def _mean_offdiagonal(features: torch.Tensor, keep: Optional[torch.Tensor] = None) -> Dict[str, float]:
    n = features.shape[0]
    cos = features @ features.t()
    mask = ~torch.eye(n, dtype=torch.bool)
    if keep is not None:
        mask &= keep
    values = cos[mask]
    if values.numel() == 0:
        return {"mean": float("nan"), "max": float("nan")}
    return {"mean": float(values.mean()), "max": float(values.max())}


def embedding_spread(image_features: torch.Tensor, text_features: Optional[torch.Tensor] = None,
                     texts: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """How spread the embeddings of N paired samples are, and whether they look collapsed.

    Args:
        image_features: (N, D) volume embeddings (normalised here); N >= 2.
        text_features: (N, D) embeddings of each volume's own text, or None.
        texts: the N texts; pairs of identical texts are left out of the text-text cosine (MR sentences
            repeat, and an identical pair has cosine 1 whatever the model).

    Returns ``{"n", "image_offdiagonal_cosine": {"mean", "max"}, "text_offdiagonal_cosine": {...},
    "matched_cosine" (volume with its own text, mean), "unmatched_cosine" (with the other texts, mean),
    "collapsed": bool, "reasons": [str]}``. Collapsed: a modality's mean off-diagonal cosine is above
    :data:`COLLAPSE_COSINE`.
    """
    image = F.normalize(image_features.detach().to("cpu", torch.float64), dim=-1)
    n = image.shape[0]
    if image.dim() != 2 or n < 2:
        raise ValueError(f"image_features: expected (N >= 2, D), got shape {tuple(image.shape)}")
    out: Dict[str, object] = {"n": int(n), "image_offdiagonal_cosine": _mean_offdiagonal(image)}
    reasons = []
    if out["image_offdiagonal_cosine"]["mean"] > COLLAPSE_COSINE:
        reasons.append(f"two volumes have a mean cosine of {out['image_offdiagonal_cosine']['mean']:.4f} "
                       f"(> {COLLAPSE_COSINE})")
    if text_features is not None:
        text = F.normalize(text_features.detach().to("cpu", torch.float64), dim=-1)
        if text.shape != image.shape:
            raise ValueError(f"text_features: expected the shape of image_features {tuple(image.shape)}, got "
                             f"{tuple(text.shape)}")
        keep = None
        if texts is not None:
            if len(texts) != n:
                raise ValueError(f"texts: expected {n}, got {len(texts)}")
            ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
            code = torch.tensor([ids[t] for t in texts])
            keep = code[:, None] != code[None, :]
        out["text_offdiagonal_cosine"] = _mean_offdiagonal(text, keep)
        cross = image @ text.t()
        out["matched_cosine"] = float(cross.diagonal().mean())
        out["unmatched_cosine"] = float(cross[~torch.eye(n, dtype=torch.bool)].mean())
        if out["text_offdiagonal_cosine"]["mean"] > COLLAPSE_COSINE:
            reasons.append(f"two different texts have a mean cosine of "
                           f"{out['text_offdiagonal_cosine']['mean']:.4f} (> {COLLAPSE_COSINE})")
    out["collapsed"] = bool(reasons)
    out["reasons"] = reasons
    return out
