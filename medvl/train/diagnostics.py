"""Collapse diagnostics at the end of a training run: did the model learn, or find the collapsed solution?

Written to ``OUT/diagnostics.json`` and logged, with a warning when the model looks collapsed (``medvl eval``
shows them beside its own held-out measures):

* ``loss``: the recipe's contrastive term over the last tenth of the run against the level of the collapsed
  solution, where the towers map every input to one vector and only the logit bias is learned. For SigLIP
  that level is ``B·H(p)`` (B the global batch, H the binary entropy, p the mean target: 1/B for pairs,
  16·H(1/16) = 3.741 at batch 16); MR-CLIP's softmax: ``log B``; MedTrim's triplets: the margin times the
  sum of the term weights. A loss at that level has learned nothing about which text goes with which volume.
* ``held_out`` / ``train``: on ``DIAGNOSTIC_SAMPLES`` held-out phantoms (seed
  :data:`~medvl.data.phantoms.HELD_OUT_SEED`) and as many training samples, encoded as evaluation encodes
  them: :func:`medvl.models.diagnostics.embedding_spread` (the mean cosine between two different samples,
  volume with own text against others) and volume->text retrieval R@1 / R@5 (an identical text counts).
* ``gap``: train minus held-out R@5 and matched-minus-unmatched cosine: memorised, not learned, when large.
* ``collapsed``: the held-out embeddings are collapsed (:data:`medvl.models.diagnostics.COLLAPSE_COSINE`);
  ``not_learned``: the final contrastive loss is not below the collapsed level (at least
  :data:`LOSS_AT_COLLAPSE` of it). Either is logged as a warning (``warnings``).

Real data sources have no held-out phantoms: ``held_out`` is None there (``medvl eval`` on a held-out
manifest gives it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

__all__ = ["DIAGNOSTIC_SAMPLES", "LOSS_AT_COLLAPSE", "collapsed_loss_level", "run_diagnostics"]

DIAGNOSTIC_SAMPLES = 64
# A final contrastive loss at this fraction of the collapsed level or above has learned nothing the collapsed
# solution does not have (a model whose towers standardise cannot collapse, and then stays above the level).
LOSS_AT_COLLAPSE = 0.98


def _binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


def collapsed_loss_level(loss: str, global_batch: int, *, labels: Optional[torch.Tensor] = None,
                         label: Optional[torch.Tensor] = None, margin: Optional[float] = None,
                         weights: Optional[Mapping[str, float]] = None) -> Optional[float]:
    """The value of a recipe's contrastive term at the collapsed solution, for a global batch of B.

    ``labels`` (N, F) findings of representative samples (for "siglip-jaccard": the mean Jaccard index of
    two samples sets the mean target), ``label`` (N,) classes (for "siglip-label"), ``margin`` and
    ``weights`` (for "medtrim"). None when the loss has no contrastive term to compare.
    """
    b = int(global_batch)
    if loss == "siglip":
        return b * _binary_entropy(1.0 / b)
    if loss == "mrclip":
        return math.log(b)
    if loss in ("siglip-label", "siglip-jaccard"):
        if loss == "siglip-label" and label is not None and len(label) > 1:
            lab = label.long()
            same = (lab[:, None] == lab[None, :]) & (lab[:, None] >= 0)
            off = same[~torch.eye(len(lab), dtype=torch.bool)].double().mean().item()
        elif loss == "siglip-jaccard" and labels is not None and len(labels) > 1:
            x = labels.double()
            both = x @ x.t()
            either = x.sum(1)[:, None] + x.sum(1)[None, :] - both
            jac = torch.where(either > 0, both / either.clamp_min(1), torch.ones_like(both))
            off = jac[~torch.eye(len(x), dtype=torch.bool)].mean().item()
        else:
            return None
        p = (1.0 + (b - 1) * off) / b  # the diagonal pair, then b - 1 others
        return b * _binary_entropy(p)
    if loss == "medtrim" and margin is not None:
        return float(margin) * float(sum((weights or {}).values()) or 4.0)
    return None


def _retrieval(image: torch.Tensor, text: torch.Tensor, texts: List[str], ks=(1, 5)) -> Dict[str, float]:
    """Volume->text R@k; ties keep the lower index first; an identical text counts as a match."""
    sim = image @ text.t()
    order = torch.argsort(-sim, dim=1, stable=True)
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    code = torch.tensor([ids[t] for t in texts])
    hit = code[order] == code[:, None]
    first = hit.float().argmax(1) + 1
    return {f"R@{k}": float((first <= k).float().mean()) for k in ks}


@torch.no_grad()
def _measure(model, dataset, device, batch_size: int = 16) -> Dict[str, Any]:
    from medvl.data import collate
    from medvl.models.diagnostics import embedding_spread

    images, texts_out, texts = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = model(batch["volume"].to(device), batch["text"])
        images.append(out["image_features"].float().cpu())
        texts_out.append(out["text_features"].float().cpu())
        texts += list(batch["text"])
    image, text = torch.cat(images), torch.cat(texts_out)
    spread = embedding_spread(image, text, texts)
    return {**spread, **_retrieval(image, text, texts), "chance_R@5": min(1.0, 5.0 / len(texts))}


def _subset(dataset, n: int):
    from torch.utils.data import Subset

    return Subset(dataset, list(range(min(n, len(dataset)))))


def _final_contrastive(metrics_path: Path, loss: str) -> Optional[float]:
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    key = "loss" if loss == "medtrim" else "contrastive"
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    tail = values[-max(1, len(values) // 10):]
    return float(np.mean(tail))


def run_diagnostics(model, recipe, dataset, *, data: str, kind: str, size, global_batch: int, out: Path,
                    device, log: Callable[[str], None] = lambda _m: None,
                    n: int = DIAGNOSTIC_SAMPLES) -> Dict[str, Any]:
    """Measure the trained ``model`` (see the module docstring), write ``out/diagnostics.json``, log a summary
    and the warnings; returns the dict. The model's train/eval mode is restored."""
    from medvl.data.phantoms import HELD_OUT_SEED
    from medvl.data.sources import SYNTHETIC_SOURCES, synthetic_dataset

    was_training = model.training
    model.eval()
    try:
        train_subset = _subset(dataset, n)
        train = _measure(model, train_subset, device)
        held_out = None
        if data in SYNTHETIC_SOURCES:
            held_out = _measure(model, synthetic_dataset(kind, min(n, len(dataset)), HELD_OUT_SEED, size), device)
    finally:
        model.train(was_training)
    # the texts and labels of the samples measured, without loading their volumes again
    read = [dataset.text_and_labels(i) for i in range(len(train_subset))]
    labels = torch.stack([findings for _, _, findings in read]) if read and read[0][2] is not None else None
    level = collapsed_loss_level(recipe.loss, global_batch, labels=labels,
                                 label=torch.tensor([label for _, label, _ in read]),
                                 margin=recipe.loss_options.get("margin", 0.3) if recipe.loss == "medtrim" else None,
                                 weights=recipe.loss_weights)
    final = _final_contrastive(Path(out) / "metrics.jsonl", recipe.loss)
    where = held_out or train
    warnings = [f"collapsed embeddings ({'held-out' if held_out else 'training'} samples): " + "; ".join(where["reasons"])
                ] if where["collapsed"] else []
    not_learned = level is not None and final is not None and final >= LOSS_AT_COLLAPSE * level
    if not_learned:
        warnings.append(f"the final contrastive loss {final:.4f} is not below the collapsed solution's {level:.4f}: "
                        "the model has not learned which text goes with which volume")
    result: Dict[str, Any] = {
        "loss": {"final": final, "collapsed_level": level, "global_batch": int(global_batch),
                 "ratio": None if not (level and final is not None) else final / level},
        "train": train, "held_out": held_out,
        "gap": None if held_out is None else {
            "R@5": train["R@5"] - held_out["R@5"],
            "matched_minus_unmatched": (train["matched_cosine"] - train["unmatched_cosine"])
            - (held_out["matched_cosine"] - held_out["unmatched_cosine"])},
        "collapsed": bool(where["collapsed"]), "not_learned": bool(not_learned), "warnings": warnings,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "diagnostics.json").write_text(json.dumps(result, indent=1) + "\n")
    loss_text = "" if final is None or level is None else f"contrastive {final:.3f} vs collapsed {level:.3f}; "
    log(f"diagnostics: {loss_text}{'held-out' if held_out else 'train'} cosine between samples "
        f"{where['image_offdiagonal_cosine']['mean']:.3f} (volumes), R@5 {where['R@5']:.3f} "
        f"(chance {where['chance_R@5']:.3f})" + ("" if held_out is None else
                                                 f"; train R@5 {train['R@5']:.3f} (gap {result['gap']['R@5']:+.3f})"))
    for warning in warnings:
        log(f"WARNING: {warning}")
    return result
