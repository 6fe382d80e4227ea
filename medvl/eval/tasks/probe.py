"""``probe``: logistic regression on the frozen pooled volume features (before the projection).

Target: the MR sequence name when the samples carry one (phantoms), else the integer class label (MR contrast
category, or a manifest's ``label``). Split: the evaluation set itself, stratified by class into halves with
``seed`` (the odd member of a class goes to the training half; a class of one is training only), so no extra
data is encoded. Baseline: the majority class."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from medvl.eval.eval_set import EvalSet, class_target
from medvl.eval.markdown import table
from medvl.eval.probe import linear_probe, stratified_halves
from medvl.eval.tasks.task import NotEnoughData, Task, as_numpy

__all__ = ["CLASS_NEEDS", "TASK", "class_missing", "probe_split", "probe_task"]

# What the probes (this one and fewshot) need of the data.
CLASS_NEEDS = ("single-label classes: MR sequence or contrast category (synthetic-mr, an MR folder), or a CT "
               "manifest with an integer 'label' column")


def probe_split(encoder, data: EvalSet, task: str, seed: int):
    """(pooled features, class targets, train indices, test indices, what the target and split are) of a
    probe on the evaluation set; NotEnoughData when the halves cannot hold two classes."""
    y, names, what = class_target(data)
    train, test = stratified_halves(y, seed)
    if np.unique(y[train]).size < 2 or test.size == 0:
        raise NotEnoughData(f"task {task!r}: the {len(data)} samples hold {np.unique(y).size} {what} class(es); "
                            "the stratified half split needs at least two classes with two samples each "
                            "(raise n)")
    x = as_numpy(data.volumes(encoder).pooled)
    info = {"target": what, "n_classes": int(np.unique(y).size),
            "split": f"evaluation set, stratified halves (seed {seed})"}
    if names is not None:
        info["classes"] = names
    return x, y, train, test, info


def probe_task(encoder, data, *, seed: int = 0) -> Dict[str, Any]:
    """Linear probe on the frozen pooled volume features, with a majority-class baseline."""
    encoder, data = TASK.prepare(encoder, data)
    x, y, train, test, info = probe_split(encoder, data, "probe", seed)
    result = linear_probe(x[train], y[train], x[test], y[test], seed=seed)
    values, counts = np.unique(y[train], return_counts=True)
    majority = values[np.argmax(counts)]
    result["majority_accuracy"] = float(np.mean(y[test] == majority))
    return {**result, **info}


def class_missing(data: EvalSet) -> Optional[str]:
    """Why the probes cannot run on ``data`` (no single-label class on every sample), or None."""
    target, _, why = class_target(data)
    return why if target is None else None


def _report(r: Mapping[str, Any]) -> str:
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "majority_accuracy", "n_train", "n_test")
    note = f"Target: {r['target']} ({r['n_classes']} classes); split: {r['split']}."
    return note + "\n\n" + table(keys, [[r[k] for k in keys]])


TASK = Task(
    name="probe",
    help="linear probe of the sequence or class, beside the majority",
    kinds=("mr", "ct"),
    needs=CLASS_NEEDS,
    run=probe_task,
    missing=class_missing,
    seeded=True,
    report=_report,
)
