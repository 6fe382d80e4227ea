"""``fewshot``: linear probes on k shots per class of the frozen pooled volume features, over several draws;
the target and the split are the ``probe`` task's."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import numpy as np

from medvl.eval.markdown import table
from medvl.eval.probe import few_shot
from medvl.eval.tasks.probe import CLASS_NEEDS, class_missing, probe_split
from medvl.eval.tasks.task import Task, cutoffs

__all__ = ["FEWSHOT_KS", "FEWSHOT_SEEDS", "TASK", "fewshot_task"]

FEWSHOT_KS = (1, 2, 5, 10)
FEWSHOT_SEEDS = (0, 1, 2, 3, 4)


def fewshot_task(encoder, data, *, ks: Sequence[int] = FEWSHOT_KS, seeds: Sequence[int] = FEWSHOT_SEEDS,
                 seed: int = 0) -> Dict[str, Any]:
    """Few-shot linear probes: accuracy over k shots per class and several draws."""
    encoder, data = TASK.prepare(encoder, data)
    x, y, train, test, info = probe_split(encoder, data, "fewshot", seed)
    largest = int(np.unique(y[train], return_counts=True)[1].max())
    shots = cutoffs(ks, largest)
    return {"by_k": few_shot(x[train], y[train], x[test], y[test], ks=shots, seeds=seeds),
            "n_train": int(train.size), "n_test": int(test.size), **info}


def _report(r: Mapping[str, Any]) -> str:
    rows = [[k, v["mean"], v["std"], v["k_effective"]] for k, v in r["by_k"].items()]
    note = f"Target: {r['target']}; {r['n_train']} training / {r['n_test']} test samples; {r['split']}."
    return note + "\n\n" + table(("shots per class", "accuracy mean", "std", "k effective"), rows)


TASK = Task(
    name="fewshot",
    help="linear probes on k shots per class, over several draws",
    kinds=("mr", "ct"),
    needs=CLASS_NEEDS,
    run=fewshot_task,
    missing=class_missing,
    seeded=True,
    report=_report,
)
