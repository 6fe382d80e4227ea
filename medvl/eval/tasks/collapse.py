"""``collapse``: is the embedding space collapsed on these held-out samples? The spread of the volumes and of
their own texts (:func:`medvl.models.diagnostics.embedding_spread`). The report shows it in its collapse
section, beside the training run's diagnostics, rather than in a section of its own."""

from __future__ import annotations

from typing import Any, Dict, Optional

from medvl.eval.eval_set import EvalSet
from medvl.eval.tasks.task import Task

__all__ = ["TASK", "collapse_task"]


def collapse_task(encoder, data) -> Dict[str, Any]:
    """Is the embedding space collapsed on these held-out samples? :func:`medvl.models.diagnostics.embedding_spread`
    of the volumes and their own texts (mean cosine between two different samples, volume with own text
    against the others), with a warning when collapsed."""
    from medvl.models.diagnostics import COLLAPSE_COSINE, embedding_spread

    encoder, data = TASK.prepare(encoder, data)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    return {**embedding_spread(volumes.image_features, texts, data.texts), "threshold": COLLAPSE_COSINE}


def _missing(data: EvalSet) -> Optional[str]:
    return "fewer than two samples" if len(data) < 2 else None


TASK = Task(
    name="collapse",
    help="is the embedding space collapsed? (mean cosines)",
    kinds=("ct", "mr"),
    needs="CT or MR volume-text pairs (at least two)",
    run=collapse_task,
    missing=_missing,
    report=None,
)
