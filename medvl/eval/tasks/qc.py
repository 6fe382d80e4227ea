"""``qc`` (MR): metadata quality control. Score = cosine distance between a volume and its metadata sentence;
for each kind of :data:`medvl.data.CORRUPTION_KINDS` and each rate (0.1, 0.5), that share of the series gets a
corrupted sentence (``corrupt_metadata``), AUC corrupted vs the untouched rest, keys ``"<kind>@<rate>"``.
(The header rules of ``medvl qc`` are :mod:`medvl.eval.qc`.)"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from medvl.data.values import finite_float
from medvl.eval.eval_set import EvalSet
from medvl.eval.markdown import fmt, table
from medvl.eval.metrics import cosine_distance, qc_auc
from medvl.eval.plots import plot_qc_histograms
from medvl.eval.tasks.task import NotEnoughData, Plot, Task, as_numpy

__all__ = ["QC_RATES", "TASK", "qc_task"]

QC_RATES = (0.1, 0.5)


def _changed_tag(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """The tag a corruption changed (corrupt_metadata changes exactly one)."""
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    return changed[0] if len(changed) == 1 else "+".join(sorted(changed))


def _numeric_factor(before: Mapping[str, Any], after: Mapping[str, Any], tag: str) -> Optional[str]:
    """``"x<factor>"`` when the corruption multiplied the number ``tag`` held (a numeric error), else None."""
    old, new = finite_float(before.get(tag)), finite_float(after.get(tag))
    if old is None or new is None or old == 0 or old == new:
        return None
    return f"x{new / old:.3g}"


def _factor_order(label: str) -> float:
    """Sort key of a ``by_factor`` label ("x0.25" -> 0.25)."""
    return float(label[1:])


def _auc_or_none(clean: np.ndarray, corrupted: Sequence[float]) -> Optional[float]:
    return qc_auc(clean, np.asarray(corrupted, dtype=np.float64)) if len(corrupted) else None


def qc_task(encoder, data, *, rates: Sequence[float] = QC_RATES, kinds: Optional[Sequence[str]] = None,
            seed: int = 0) -> Dict[str, Any]:
    """Metadata QC: AUC of the volume-sentence cosine distance, corrupted vs clean, per kind and rate, and
    within each, per corrupted tag and split by whether the image determines the tag; numeric errors also per
    factor (``by_factor``, keys like ``"x0.5"``).

    A corruption that leaves the sentence unchanged (e.g. an inversion time moved within its sentence bin)
    cannot be seen by any sentence-based score: it is counted (``n_text_unchanged``) and left out of the
    AUCs. ``image_determined`` / ``image_independent`` split the corruptions by the tag they touch:
    the phantom's image does not depend on :data:`~medvl.data.phantoms.MR_IMAGE_INDEPENDENT_TAGS` (the
    scanner's maker and model), so no image-text model can notice them; MR-CLIP's claim is about the
    others.
    """
    from medvl.data.metadata import CORRUPTION_KINDS, corrupt_metadata, metadata_to_text
    from medvl.data.phantoms import MR_IMAGE_INDEPENDENT_TAGS

    encoder, data = TASK.prepare(encoder, data)
    kinds = list(CORRUPTION_KINDS if kinds is None else kinds)
    for rate in rates:
        if not (isinstance(rate, numbers.Real) and 0 < rate < 1):
            raise ValueError(f"rates: each rate must be a share in (0, 1), got {rate!r}")
    n = len(data)
    if n < 2:
        raise NotEnoughData("task 'qc' needs at least two series (one corrupted, one clean)")
    image = data.volumes(encoder).image_features
    clean_text = [metadata_to_text(m) for m in data.metadata]
    clean_scores = cosine_distance(as_numpy(image), as_numpy(encoder.encode_texts(clean_text)))
    by_case: Dict[str, Any] = {}
    scores: Dict[str, Dict[str, List[float]]] = {}
    for k, kind in enumerate(kinds):
        for rate in rates:
            rng = np.random.default_rng([int(seed), k, int(round(rate * 1000))])
            wanted = min(n - 1, max(1, int(round(rate * n))))
            chosen, texts, tags, factors = [], [], [], []
            for i in rng.permutation(n).tolist():
                if len(chosen) == wanted:
                    break
                try:
                    corrupted = corrupt_metadata(data.metadata[i], kind, rng)
                except ValueError:  # nothing of that kind to corrupt in this series: leave it clean
                    continue
                chosen.append(i)
                texts.append(metadata_to_text(corrupted))
                tags.append(_changed_tag(data.metadata[i], corrupted))
                factors.append(_numeric_factor(data.metadata[i], corrupted, tags[-1]))
            key = f"{kind}@{rate:g}"
            if not chosen:
                by_case[key] = {"auc": None, "n_clean": n, "n_corrupted": 0}
                continue
            corrupted_scores = cosine_distance(as_numpy(image[chosen]), as_numpy(encoder.encode_texts(texts)))
            clean = np.delete(clean_scores, chosen)
            changed = [t != clean_text[i] for t, i in zip(texts, chosen)]
            seen = [float(s) for s, c in zip(corrupted_scores, changed) if c]
            by_tag: Dict[str, List[float]] = {}
            by_factor: Dict[str, List[float]] = {}
            split: Dict[str, List[float]] = {"image_determined": [], "image_independent": []}
            for score, tag, factor, c in zip(corrupted_scores, tags, factors, changed):
                if c:
                    by_tag.setdefault(tag, []).append(float(score))
                    if factor is not None:
                        by_factor.setdefault(factor, []).append(float(score))
                    split["image_independent" if tag in MR_IMAGE_INDEPENDENT_TAGS else "image_determined"].append(
                        float(score))
            by_case[key] = {"auc": _auc_or_none(clean, seen), "n_clean": int(clean.size),
                            "n_corrupted": len(chosen), "n_text_unchanged": int(len(chosen) - len(seen)),
                            **{group: {"auc": _auc_or_none(clean, v), "n": len(v)} for group, v in split.items()},
                            "by_tag": {tag: {"auc": _auc_or_none(clean, v), "n": len(v)}
                                       for tag, v in sorted(by_tag.items())}}
            if by_factor:  # numeric errors: a x2 error may stay inside the sequence's own range, a x10 may not
                by_case[key]["by_factor"] = {f: {"auc": _auc_or_none(clean, v), "n": len(v)}
                                             for f, v in sorted(by_factor.items(), key=lambda kv: _factor_order(kv[0]))}
            scores[key] = {"clean": clean.round(6).tolist(), "corrupted": corrupted_scores.round(6).tolist()}
    aucs = [v["auc"] for v in by_case.values() if v["auc"] is not None]
    return {"by_case": by_case, "mean_auc": float(np.mean(aucs)) if aucs else None,
            "clean_score_mean": float(clean_scores.mean()), "n": n, "score": "cosine distance volume-sentence",
            "image_independent_tags": list(MR_IMAGE_INDEPENDENT_TAGS), "data": scores}


def _missing(data: EvalSet) -> Optional[str]:
    if any(m is None for m in data.metadata):
        return "no acquisition metadata on every sample"
    return None


def _auc_n(entry: Optional[Mapping[str, Any]]) -> str:
    if not entry:
        return "-"
    return f"{fmt(entry['auc'])} ({entry['n']})"


def _report(r: Mapping[str, Any]) -> str:
    rows = [[case, v["auc"], (v.get("image_determined") or {}).get("auc"),
             (v.get("image_independent") or {}).get("auc"), v["n_clean"], v["n_corrupted"],
             v.get("n_text_unchanged")] for case, v in r["by_case"].items()]
    tags = sorted({t for v in r["by_case"].values() for t in v.get("by_tag", {})})
    cases = [c for c, v in r["by_case"].items() if v.get("by_tag")]
    tag_rows = [[t] + [_auc_n(r["by_case"][c]["by_tag"].get(t)) for c in cases] for t in tags]
    note = (f"Score: {r['score']} (corrupted = positive); mean AUC {fmt(r['mean_auc'])}. Corruptions that leave "
            f"the sentence unchanged are left out of the AUCs (n unchanged). Image-independent tags (the image "
            f"cannot show them): {', '.join(r.get('image_independent_tags', []))}.")
    factors = sorted({f for v in r["by_case"].values() for f in v.get("by_factor", {})}, key=_factor_order)
    factor_cases = [c for c, v in r["by_case"].items() if v.get("by_factor")]
    factor_rows = [[f] + [_auc_n(r["by_case"][c]["by_factor"].get(f)) for c in factor_cases] for f in factors]
    by_factor = ("\n\nAUC (n) of numeric errors by factor:\n\n" + table(["factor"] + factor_cases, factor_rows)
                 if factor_rows else "")
    return (note + "\n\n" + table(("corruption@rate", "AUC", "image-determined", "image-independent", "n clean",
                                   "n corrupted", "n unchanged"), rows)
            + "\n\nAUC (n) by corrupted tag:\n\n" + table(["tag"] + cases, tag_rows) + by_factor)


TASK = Task(
    name="qc",
    help="metadata QC: ROC AUC, corrupted sentences against clean",
    kinds=("mr",),
    needs="MR series with acquisition metadata (synthetic-mr, an MR NIfTI folder with sidecars)",
    run=qc_task,
    missing=_missing,
    seeded=True,
    report=_report,
    plot=Plot("qc_histograms", "qc_histograms.png", plot_qc_histograms),
)
