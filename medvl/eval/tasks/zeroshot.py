"""``zeroshot`` (CT, findings labels): per finding, ``sigmoid(cos(v, p+) - cos(v, p-))`` over every template of
:data:`medvl.data.PROMPT_TEMPLATES`, ROC AUC per finding. The volume side is RadFinder's prompt head applied to
the pooled features when the checkpoint has one (the space the prompt term trained), else the image features.
Beside each AUC, its supervised ceiling: a linear probe on the same volumes' features."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np

from medvl.eval.eval_set import EvalSet
from medvl.eval.markdown import table
from medvl.eval.metrics import probe_auc, prompt_separation, zero_shot_auc, zero_shot_scores
from medvl.eval.plots import plot_zeroshot_roc
from medvl.eval.tasks.task import Plot, Task, as_numpy

__all__ = ["TASK", "zeroshot_task"]


def zeroshot_task(encoder, data, *, templates=None, seed: int = 0) -> Dict[str, Any]:
    """Zero-shot finding classification with prompt pairs; ``{"macro", "per_class", "probe", ...}``.

    ``probe``: the supervised ceiling beside it, per finding: the AUC of a logistic regression trained on
    labelled folds of the same held-out volumes' pooled features (:func:`~medvl.eval.metrics.probe_auc`):
    what the image tower encodes of a finding, of which zero-shot reaches what is aligned with text.
    ``prompt_separation``: whether the text side tells the findings apart at all
    (:func:`~medvl.eval.metrics.prompt_separation`): findings whose prompt directions are parallel rank the
    volumes alike, whatever the probe says."""
    from medvl.data.prompts import disease_prompts

    encoder, data = TASK.prepare(encoder, data)
    names = data.finding_names
    prompts = disease_prompts(names, templates)
    n_templates = len(prompts[names[0]][0])
    texts = [p for f in names for p in prompts[f][0]] + [p for f in names for p in prompts[f][1]]
    features = encoder.encode_texts(texts, kind="prompt")
    half = len(names) * n_templates
    positive = features[:half].reshape(len(names), n_templates, -1)
    negative = features[half:].reshape(len(names), n_templates, -1)
    volumes = data.volumes(encoder)
    side = encoder.project(volumes.pooled) if encoder.has_prompt_head else volumes.image_features
    scores = zero_shot_scores(as_numpy(side), as_numpy(positive), as_numpy(negative))
    labels = data.labels.astype(np.int64)
    metrics = zero_shot_auc(scores, labels, class_names=names)
    macro = metrics.pop("macro")
    ceiling = probe_auc(as_numpy(volumes.pooled), labels, names, seed=seed)
    separation = prompt_separation(as_numpy(positive), as_numpy(negative), class_names=names)
    return {"macro": macro, "per_class": metrics, "n": len(data), "n_templates": n_templates,
            "prompt_separation": separation,
            "probe": {"macro": ceiling.pop("macro"), "per_class": ceiling,
                      "note": "supervised ceiling: cross-validated logistic regression on the same held-out volumes' "
                              "pooled features (4 stratified folds)"},
            "volume_side": "prompt head" if encoder.has_prompt_head else "image projection",
            "data": {"class_names": list(names), "scores": scores.round(6).tolist(), "labels": labels.tolist()}}


def _missing(data: EvalSet) -> Optional[str]:
    if data.labels is None or data.finding_names is None:
        return "no findings labels with known names"
    return None


def _report(r: Mapping[str, Any]) -> str:
    keys = ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity", "n_pos", "n_neg")
    probe = r.get("probe") or {"per_class": {}, "macro": {}}
    separation = r.get("prompt_separation") or {"per_class": {}}

    def closest(name):
        entry = separation["per_class"].get(name)
        return None if entry is None else f"{entry['closest']} ({entry['cosine']:.2f})"

    rows = [[name, m.get("auc"), (probe["per_class"].get(name) or {}).get("auc"), closest(name)]
            + [m.get(k) for k in keys[1:]] for name, m in r["per_class"].items()]
    rows.append(["macro", r["macro"].get("auc"), probe["macro"].get("auc"), None]
                + [r["macro"].get(k) for k in keys[1:5]] + [None, None])
    note = (f"{r['n']} volumes, {r['n_templates']} templates per finding, volume side: {r['volume_side']}. "
            "Chance AUC 0.5. probe AUC: the supervised ceiling, a linear probe on the same volumes' features "
            "(4-fold cross-validated). closest prompt direction: the finding whose positive-minus-negative prompt "
            "direction is nearest (cosine; near 1, the two rank the volumes alike)")
    if separation.get("mean_offdiagonal_cosine") is not None:
        note += f"; mean cosine between two findings' directions {separation['mean_offdiagonal_cosine']:.2f}"
    return note + ".\n\n" + table(("finding", "zero-shot AUC", "probe AUC", "closest prompt direction") + keys[1:],
                                    rows)


TASK = Task(
    name="zeroshot",
    help="zero-shot finding classification: ROC AUC per finding",
    kinds=("ct",),
    needs="CT volumes with findings labels whose names are known (synthetic-ct, CT-RATE)",
    run=zeroshot_task,
    missing=_missing,
    seeded=True,
    report=_report,
    plot=Plot("roc", "zeroshot_roc.png", plot_zeroshot_roc),
)
