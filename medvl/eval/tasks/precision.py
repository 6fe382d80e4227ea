"""``precision``: MedTrim's P@R volume->report, relevance from the findings (CT, multi-hot) or the contrast
category (MR), each relevance with its chance level."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

from medvl.eval.eval_set import EvalSet
from medvl.eval.markdown import fmt, table
from medvl.eval.metrics import RELEVANCE_MODES, precision_at_r
from medvl.eval.tasks.task import Task, as_numpy, cutoffs

__all__ = ["PRECISION_RS", "TASK", "precision_task"]

PRECISION_RS = (1, 10, 20, 50)
_MAX_CLASS_ROWS = 20  # longer per-class tables stay in results.json only
_RELEVANCE_WORDS = {"shared": "shares a finding (or both normal)", "identical": "identical finding sets",
                    "jaccard": "Jaccard index of the finding sets (graded)", "equal labels": "same contrast category"}


def precision_task(encoder, data, *, rs: Sequence[int] = PRECISION_RS) -> Dict[str, Any]:
    """MedTrim's P@R volume->report with label-defined relevance, and its chance level.

    CT (findings): the top level is "share a finding" relevance (MedTrim's); ``by_relevance`` adds the
    stricter "identical" finding sets and the graded "jaccard" relevance (an item counts by the Jaccard
    index of the two finding sets), each with its chance level (the mean relevance of the gallery: the
    P@R of a random ranking). When most phantom pairs share some finding, "shared" is near 1 by chance
    and cannot tell methods apart; the other two can.
    """
    encoder, data = TASK.prepare(encoder, data)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    similarity = as_numpy(volumes.image_features @ texts.t())
    cut = cutoffs(rs, len(data))
    if data.kind == "ct":
        result = precision_at_r(similarity, data.labels, data.labels, cut, class_names=data.finding_names)
        result["by_relevance"] = {}
        for mode in RELEVANCE_MODES:
            r = result if mode == "shared" else precision_at_r(similarity, data.labels, data.labels, cut,
                                                               relevance=mode)
            result["by_relevance"][mode] = {**{k: v for k, v in r.items() if k.startswith("P@")},
                                            "chance": r["chance"], "macro": r["macro"]}
    else:
        result = precision_at_r(similarity, data.label, data.label, cut)
        result["per_class"] = {str(k): v for k, v in result["per_class"].items()}
        result["relevance"] = "same contrast category"
    return result


def _missing(data: EvalSet) -> Optional[str]:
    if data.kind == "ct" and data.labels is None:
        return "no findings labels"
    if data.kind == "mr" and not (data.label >= 0).all():
        return "no contrast category on every sample"
    return None


def _report(r: Mapping[str, Any]) -> str:
    keys = [k for k in r if k.startswith("P@")]
    rows = [["all"] + [r[k] for k in keys] + [r["n_queries"]], ["macro"] + [r["macro"][k] for k in keys] + [None]]
    note = f"Relevance: {_RELEVANCE_WORDS.get(r['relevance'], r['relevance'])}; chance {fmt(r['chance'])}."
    if "by_relevance" in r:
        graded = [[_RELEVANCE_WORDS[m]] + [v[k] for k in keys] + [v["chance"]] for m, v in r["by_relevance"].items()]
        note += (" Each relevance, with the P@R of a random ranking (chance):\n\n"
                 + table(["relevance"] + keys + ["chance"], graded) + "\n\nPer class (shares a finding):")
    if len(r["per_class"]) <= _MAX_CLASS_ROWS:
        rows += [[str(c)] + [v[k] for k in keys] + [v["n_queries"]] for c, v in r["per_class"].items()]
    else:
        note += f" {len(r['per_class'])} classes: the per-class values are in results.json."
    return note + "\n\n" + table(["queries"] + keys + ["n"], rows)


TASK = Task(
    name="precision",
    help="MedTrim's precision at R volume->report, beside chance",
    kinds=("ct", "mr"),
    needs="findings labels (CT) or contrast categories (MR)",
    run=precision_task,
    missing=_missing,
    report=_report,
)
