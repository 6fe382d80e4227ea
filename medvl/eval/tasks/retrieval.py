"""``retrieval``: volume->text and text->volume, an identical report or sentence counting as a match both ways;
plus class level (MR: the same contrast category; CT: the identical set of findings)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np

from medvl.eval.markdown import table
from medvl.eval.metrics import retrieval_metrics
from medvl.eval.tasks.task import Task, as_numpy, cutoffs

__all__ = ["RETRIEVAL_KS", "TASK", "retrieval_task"]

RETRIEVAL_KS = (1, 5, 10, 50, 100)


def retrieval_task(encoder, data, *, ks: Sequence[int] = RETRIEVAL_KS) -> Dict[str, Any]:
    """Volume<->text retrieval, pair level (identical texts match) and class level."""
    encoder, data = TASK.prepare(encoder, data)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    similarity = as_numpy(volumes.image_features @ texts.t())
    n = len(data)
    cut = cutoffs(ks, n)
    text_ids = np.unique(np.asarray(data.texts, dtype=object), return_inverse=True)[1]
    same_text = text_ids[:, None] == text_ids[None, :]
    out: Dict[str, Any] = {
        "volume_to_text": retrieval_metrics(similarity, same_text, cut),
        "text_to_volume": retrieval_metrics(similarity.T, same_text.T, cut),
        "n": n, "n_distinct_texts": int(text_ids.max() + 1),
        "chance_R@1": {"pair": float(same_text.mean())},
    }
    relevance, what = None, None
    if data.kind == "mr" and (data.label >= 0).all():
        relevance, what = data.label[:, None] == data.label[None, :], "same contrast category"
    elif data.kind == "ct" and data.labels is not None:
        codes = np.unique(data.labels, axis=0, return_inverse=True)[1].reshape(-1)
        relevance, what = codes[:, None] == codes[None, :], "identical finding sets"
    elif (data.label >= 0).all():
        relevance, what = data.label[:, None] == data.label[None, :], "same label"
    if relevance is not None:
        out["class_relevance"] = what
        out["volume_to_text_class"] = retrieval_metrics(similarity, relevance, cut)
        out["text_to_volume_class"] = retrieval_metrics(similarity.T, relevance.T, cut)
        out["chance_R@1"]["class"] = float(relevance.mean())
    return out


def _report(r: Mapping[str, Any]) -> str:
    directions = [d for d in ("volume_to_text", "text_to_volume", "volume_to_text_class", "text_to_volume_class")
                  if d in r]
    keys = [k for k in r["volume_to_text"] if k.startswith("R@")] + ["MedR", "mAP", "n_queries"]
    rows = [[d] + [r[d].get(k) for k in keys] for d in directions]
    chance = ", ".join(f"{k} {v:.3f}" for k, v in r["chance_R@1"].items())
    note = (f"{r['n']} pairs, {r['n_distinct_texts']} distinct texts; identical texts match"
            + (f"; class level: {r['class_relevance']}" if "class_relevance" in r else "")
            + f". Chance R@1: {chance}.")
    return note + "\n\n" + table(["direction"] + keys, rows)


TASK = Task(
    name="retrieval",
    help="volume<->text retrieval, pair level and class level",
    kinds=("ct", "mr"),
    needs="CT or MR volume-text pairs",
    run=retrieval_task,
    report=_report,
)
