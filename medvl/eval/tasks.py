"""Evaluation tasks of a trained CLIP model on held-out data, and :func:`evaluate`, which runs them.

    results = evaluate("runs/siglip", out="runs/siglip/eval")                  # CT phantoms, seed 100000
    results = evaluate((model, run_config), data="synthetic-mr", tasks=["qc"])  # a model just trained

Each task takes a :class:`~medvl.eval.cache.CachedEncoder` (or a bare CLIPModel) and an :class:`EvalSet`
(or a dataset) and returns the dicts of :mod:`medvl.eval.metrics` / :mod:`medvl.eval.probe`, plus, under
``"data"``, the per-sample values its plot is drawn from. Every volume and text goes through the
encoder's cache, so the tasks of one run share their encodings and a second run re-encodes nothing.

Tasks (``TASKS``; the data kinds each applies to in ``TASK_KINDS``):

* ``zeroshot`` (CT, findings labels): per finding, ``sigmoid(cos(v, p+) - cos(v, p-))`` over every
  template of :data:`medvl.data.PROMPT_TEMPLATES`, ROC AUC per finding. The volume side is RadFinder's
  prompt head applied to the pooled features when the checkpoint has one (the space the prompt term
  trained), else the image features.
* ``retrieval``: volume->text and text->volume, an identical report/sentence counts as a match both
  ways; plus class level (MR: the same contrast category; CT: the identical set of findings).
* ``precision``: MedTrim's P@R volume->report, relevance from the findings (CT, multi-hot) or the
  contrast category (MR).
* ``probe`` / ``fewshot``: logistic regression on the frozen pooled volume features (before the
  projection). Target: the MR sequence name when the samples carry one (phantoms), else the integer
  class label (MR contrast category, or a manifest's ``label``). Split: the evaluation set itself,
  stratified by class into halves with ``seed`` (the odd member of a class goes to the training half;
  a class of one is training only), so no extra data is encoded. Baseline: the majority class.
* ``qc`` (MR): metadata quality control. Score = cosine distance between a volume and its metadata
  sentence; for each kind of ``medvl.data.CORRUPTION_KINDS`` and each rate (0.1, 0.5), that share of
  the series gets a corrupted sentence (``corrupt_metadata``), AUC corrupted vs the untouched rest,
  keys ``"<kind>@<rate>"``.
* ``localization`` (CT with report snippets, i.e. the phantoms): each snippet picks the depth bin of
  its own volume (``predict_depth`` on the depth features through the prompt head, else through
  ``visual.proj``); true bin ``depth_index // patch_z``; error in mm (bin = patch_z x the slice
  thickness read from the volume's affine). Baselines in the same run: the middle bin, a random bin
  (seeded), and the mean true bin of the same finding over the *other* samples of the evaluation set
  (leave-one-out: a prior from the same distribution as the training phantoms, without generating or
  encoding a second set, and never using the sample's own position).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from medvl.data.synthetic import HELD_OUT_SEED
from medvl.eval.cache import CachedEncoder, EmbeddingCache, VolumeEmbeddings, head_tensors, model_fingerprint, \
    volume_ids
from medvl.eval.metrics import (cosine_distance, localization_metrics, precision_at_r, predict_depth, probe_auc,
                                qc_auc, retrieval_metrics, zero_shot_auc, zero_shot_scores)
from medvl.eval.probe import few_shot, linear_probe

__all__ = [
    "DEFAULT_EVAL_SEED", "EvalSet", "NotEnoughData", "REQUIRED_MR_TAGS", "SEQUENCE_RANGES", "TASKS", "TASK_KINDS",
    "evaluate", "fewshot_task", "find_series_folders", "format_report", "localization_task", "metadata_issues",
    "parse_tasks", "precision_task", "probe_task", "qc_dicom", "qc_task", "retrieval_task", "sequence_family",
    "task_requirement", "zeroshot_task",
]

# The held-out phantoms (training runs use small seeds).
DEFAULT_EVAL_SEED = HELD_OUT_SEED
DEFAULT_N = 256
RETRIEVAL_KS = (1, 5, 10, 50, 100)
PRECISION_RS = (1, 10, 20, 50)
FEWSHOT_KS = (1, 2, 5, 10)
FEWSHOT_SEEDS = (0, 1, 2, 3, 4)
QC_RATES = (0.1, 0.5)


class NotEnoughData(ValueError):
    """The evaluation set is too small (or too uniform) for a task; :func:`evaluate` records the reason."""


# ------------------------------------------------------------------------------------------------------
# The evaluation set: the dataset and what each sample says, read without loading the volumes
# ------------------------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """A dataset with its per-sample text, labels and metadata, and what the cache keys its volumes by.

    ``labels``: (N, F) bool findings or None; ``label``: (N,) int64 class, -1 when absent; ``metas``:
    each record's ``meta`` (snippets, sequence, seed...); ``metadata``: each record's acquisition
    metadata (MR) or None; ``ids``: :func:`~medvl.eval.cache.volume_ids` descriptors (None entries are
    keyed by content); ``finding_names``: the label columns' names, when known.
    """

    dataset: Any
    kind: str
    source: str
    size: Tuple[int, int, int]
    texts: List[str]
    labels: Optional[np.ndarray]
    label: np.ndarray
    metas: List[Dict[str, Any]]
    metadata: List[Optional[dict]]
    ids: List[Optional[Dict[str, Any]]]
    finding_names: Optional[List[str]] = None
    _encoded: Dict[int, VolumeEmbeddings] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_dataset(cls, dataset, kind: str, *, source: Optional[str] = None,
                     size: Optional[Sequence[int]] = None) -> "EvalSet":
        """Wrap a :class:`medvl.data.VolumeTextDataset`. With ``source`` (the name given to
        ``build_dataset``) volumes are keyed by source, index and record; without, by content."""
        if kind not in ("ct", "mr"):
            raise ValueError(f"kind: expected 'ct' or 'mr', got {kind!r}")
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset: empty; nothing to evaluate")
        texts, labels, label, metas, metadata = [], [], [], [], []
        records = getattr(dataset, "records", None)
        for i in range(n):
            if records is not None and hasattr(dataset, "text_fn"):
                info = _record_info(dataset, records[i], i)
            else:
                info = _sample_info(dataset[i])
            texts.append(info[0])
            labels.append(info[1])
            label.append(info[2])
            metas.append(info[3])
            metadata.append(info[4])
        have = [x is not None for x in labels]
        if any(have) and not all(have):
            raise ValueError(f"dataset: samples {[i for i, h in enumerate(have) if not h][:5]} have no findings "
                             "labels while others do")
        label_arr = np.stack(labels).astype(bool) if all(have) else None
        if size is None:
            first = dataset[0].volume
            size = tuple(int(s) for s in first.shape[-3:])
        size = tuple(int(s) for s in size)
        ids = volume_ids(dataset, source, size, kind) if source is not None else [None] * n
        names = _finding_names(source, label_arr)
        return cls(dataset, kind, source or "dataset", size, texts, label_arr, np.asarray(label, dtype=np.int64),
                   metas, metadata, ids, names)

    def volumes(self, encoder: CachedEncoder) -> VolumeEmbeddings:
        """Every volume encoded (once per encoder; the encoder's cache serves later runs)."""
        key = id(encoder)
        if key not in self._encoded:
            self._encoded[key] = encoder.encode_volumes(self.dataset, self.ids)
        return self._encoded[key]


def _record_info(dataset, record: Mapping[str, Any], index: int):
    """(text, findings, label, meta, metadata) of a record, as VolumeTextDataset would make them."""
    metadata = record.get("metadata")
    if dataset.text_fn is not None and "metadata" in record:
        text = dataset.text_fn(metadata)
    else:
        text = record.get("text")
    if not isinstance(text, str):
        raise TypeError(f"record {index}: text must be a str, got {type(text).__name__}")
    if dataset.label_fn is not None and "metadata" in record:
        label = dataset.label_fn(metadata)
    else:
        label = record.get("label", -1)
    label = -1 if label is None else int(label)
    findings = record.get("labels")
    findings = None if findings is None else np.asarray(findings).astype(bool).reshape(-1)
    return text, findings, label, dict(record.get("meta") or {}), metadata


def _sample_info(sample):
    labels = None if sample.labels is None else sample.labels.detach().cpu().numpy().astype(bool)
    return sample.text, labels, int(sample.label), dict(sample.meta or {}), (sample.meta or {}).get("metadata")


def _finding_names(source: Optional[str], labels: Optional[np.ndarray]) -> Optional[List[str]]:
    from medvl.data import CT_FINDINGS, CT_RATE_FINDINGS

    if labels is None:
        return None
    if source == "synthetic-ct" and labels.shape[1] == len(CT_FINDINGS):
        return list(CT_FINDINGS)
    if labels.shape[1] == len(CT_RATE_FINDINGS):
        return list(CT_RATE_FINDINGS)
    return None


# ------------------------------------------------------------------------------------------------------
# Which task applies to which data
# ------------------------------------------------------------------------------------------------------

TASK_KINDS: Dict[str, Tuple[str, ...]] = {
    "zeroshot": ("ct",), "retrieval": ("ct", "mr"), "precision": ("ct", "mr"), "probe": ("mr", "ct"),
    "fewshot": ("mr", "ct"), "qc": ("mr",), "localization": ("ct",), "collapse": ("ct", "mr"),
}
_NEEDS = {
    "zeroshot": "CT volumes with findings labels whose names are known (synthetic-ct, CT-RATE)",
    "retrieval": "CT or MR volume-text pairs",
    "precision": "findings labels (CT) or contrast categories (MR)",
    "probe": "single-label classes: MR sequence or contrast category (synthetic-mr, an MR folder), or a CT "
             "manifest with an integer 'label' column",
    "fewshot": "single-label classes: MR sequence or contrast category (synthetic-mr, an MR folder), or a CT "
               "manifest with an integer 'label' column",
    "qc": "MR series with acquisition metadata (synthetic-mr, an MR NIfTI folder with sidecars)",
    "localization": "CT report snippets with their depth (synthetic-ct)",
    "collapse": "CT or MR volume-text pairs (at least two)",
}


def _class_target(data: EvalSet) -> Tuple[Optional[np.ndarray], Optional[List[Any]], str]:
    """(int labels, class names, what they are) of the probes, or (None, None, why not)."""
    sequences = [m.get("sequence") for m in data.metas]
    if all(isinstance(s, str) and s for s in sequences):
        names = sorted(set(sequences))
        return np.asarray([names.index(s) for s in sequences], dtype=np.int64), names, "sequence"
    if (data.label >= 0).all():
        what = "contrast category" if data.kind == "mr" else "label"
        return data.label.copy(), None, what
    return None, None, "no single-label class on every sample"


def task_requirement(task: str, data: EvalSet) -> Optional[str]:
    """None when ``task`` can run on ``data``, else why not (what it needs)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if data.kind not in TASK_KINDS[task]:
        return (f"task {task!r} applies to {' or '.join(k.upper() for k in TASK_KINDS[task])} data "
                f"({_NEEDS[task]}); {data.source} is {data.kind.upper()}")
    missing = None
    if task == "zeroshot" and (data.labels is None or data.finding_names is None):
        missing = "no findings labels with known names"
    elif task == "precision" and data.kind == "ct" and data.labels is None:
        missing = "no findings labels"
    elif task == "precision" and data.kind == "mr" and not (data.label >= 0).all():
        missing = "no contrast category on every sample"
    elif task in ("probe", "fewshot"):
        target, _, why = _class_target(data)
        if target is None:
            missing = why
    elif task == "qc" and any(m is None for m in data.metadata):
        missing = "no acquisition metadata on every sample"
    elif task == "localization" and not any(m.get("snippets") for m in data.metas):
        missing = "no report snippets with depth indices"
    elif task == "collapse" and len(data) < 2:
        missing = "fewer than two samples"
    if missing is not None:
        return f"task {task!r} needs {_NEEDS[task]}; {data.source} has {missing}"
    return None


def parse_tasks(tasks: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    """A list of task names from "a,b" or a sequence (order kept, duplicates dropped); None stays None."""
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    names = [str(t).strip().lower() for t in tasks if str(t).strip()]
    if not names:
        raise ValueError(f"tasks: expected at least one of {', '.join(TASKS)}, got {tasks!r}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(repr(t) for t in unknown)}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------

def _prepare(encoder, data) -> Tuple[CachedEncoder, EvalSet]:
    if not isinstance(encoder, CachedEncoder):
        encoder = CachedEncoder(encoder)
    if not isinstance(data, EvalSet):
        kind = "ct" if getattr(data[0], "labels", None) is not None else "mr"
        data = EvalSet.from_dataset(data, kind)
    return encoder, data


def _cutoffs(values: Sequence[int], n: int) -> List[int]:
    kept = [k for k in values if k <= n]
    return kept or [1]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def zeroshot_task(encoder, data, *, templates=None, seed: int = 0) -> Dict[str, Any]:
    """Zero-shot finding classification with prompt pairs; ``{"macro", "per_class", "probe", ...}``.

    ``probe``: the supervised ceiling beside it, per finding: the AUC of a logistic regression trained on
    labelled folds of the same held-out volumes' pooled features (:func:`~medvl.eval.metrics.probe_auc`):
    what the image tower encodes of a finding, of which zero-shot reaches what is aligned with text."""
    from medvl.data.prompts import disease_prompts

    encoder, data = _prepare(encoder, data)
    reason = task_requirement("zeroshot", data)
    if reason:
        raise ValueError(reason)
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
    scores = zero_shot_scores(_np(side), _np(positive), _np(negative))
    labels = data.labels.astype(np.int64)
    metrics = zero_shot_auc(scores, labels, class_names=names)
    macro = metrics.pop("macro")
    ceiling = probe_auc(_np(volumes.pooled), labels, names, seed=seed)
    return {"macro": macro, "per_class": metrics, "n": len(data), "n_templates": n_templates,
            "probe": {"macro": ceiling.pop("macro"), "per_class": ceiling,
                      "note": "supervised ceiling: cross-validated logistic regression on the same held-out volumes' "
                              "pooled features (4 stratified folds)"},
            "volume_side": "prompt head" if encoder.has_prompt_head else "image projection",
            "data": {"class_names": list(names), "scores": scores.round(6).tolist(), "labels": labels.tolist()}}


def retrieval_task(encoder, data, *, ks: Sequence[int] = RETRIEVAL_KS) -> Dict[str, Any]:
    """Volume<->text retrieval, pair level (identical texts match) and class level."""
    encoder, data = _prepare(encoder, data)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    similarity = _np(volumes.image_features @ texts.t())
    n = len(data)
    cut = _cutoffs(ks, n)
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


def precision_task(encoder, data, *, rs: Sequence[int] = PRECISION_RS) -> Dict[str, Any]:
    """MedTrim's P@R volume->report with label-defined relevance, and its chance level.

    CT (findings): the top level is "share a finding" relevance (MedTrim's); ``by_relevance`` adds the
    stricter "identical" finding sets and the graded "jaccard" relevance (an item counts by the Jaccard
    index of the two finding sets), each with its chance level (the mean relevance of the gallery: the
    P@R of a random ranking). When most phantom pairs share some finding, "shared" is near 1 by chance
    and cannot tell methods apart; the other two can.
    """
    from medvl.eval.metrics import RELEVANCE_MODES

    encoder, data = _prepare(encoder, data)
    reason = task_requirement("precision", data)
    if reason:
        raise ValueError(reason)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    similarity = _np(volumes.image_features @ texts.t())
    cut = _cutoffs(rs, len(data))
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


def _stratified_halves(y: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: each class permuted with ``seed``, floor(n/2) to test, the rest to train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        k = len(members) // 2
        test.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def _probe_split(encoder: CachedEncoder, data: EvalSet, task: str, seed: int):
    reason = task_requirement(task, data)
    if reason:
        raise ValueError(reason)
    y, names, what = _class_target(data)
    train, test = _stratified_halves(y, seed)
    if np.unique(y[train]).size < 2 or test.size == 0:
        raise NotEnoughData(f"task {task!r}: the {len(data)} samples hold {np.unique(y).size} {what} class(es); "
                            "the stratified half split needs at least two classes with two samples each "
                            "(raise n)")
    x = _np(data.volumes(encoder).pooled)
    info = {"target": what, "n_classes": int(np.unique(y).size),
            "split": f"evaluation set, stratified halves (seed {seed})"}
    if names is not None:
        info["classes"] = names
    return x, y, train, test, info


def probe_task(encoder, data, *, seed: int = 0) -> Dict[str, Any]:
    """Linear probe on the frozen pooled volume features, with a majority-class baseline."""
    encoder, data = _prepare(encoder, data)
    x, y, train, test, info = _probe_split(encoder, data, "probe", seed)
    result = linear_probe(x[train], y[train], x[test], y[test], seed=seed)
    values, counts = np.unique(y[train], return_counts=True)
    majority = values[np.argmax(counts)]
    result["majority_accuracy"] = float(np.mean(y[test] == majority))
    return {**result, **info}


def fewshot_task(encoder, data, *, ks: Sequence[int] = FEWSHOT_KS, seeds: Sequence[int] = FEWSHOT_SEEDS,
                 seed: int = 0) -> Dict[str, Any]:
    """Few-shot linear probes: accuracy over k shots per class and several draws."""
    encoder, data = _prepare(encoder, data)
    x, y, train, test, info = _probe_split(encoder, data, "fewshot", seed)
    largest = int(np.unique(y[train], return_counts=True)[1].max())
    shots = _cutoffs(ks, largest)
    return {"by_k": few_shot(x[train], y[train], x[test], y[test], ks=shots, seeds=seeds),
            "n_train": int(train.size), "n_test": int(test.size), **info}


def _changed_tag(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """The tag a corruption changed (corrupt_metadata changes exactly one)."""
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    return changed[0] if len(changed) == 1 else "+".join(sorted(changed))


def _auc_or_none(clean: np.ndarray, corrupted: Sequence[float]) -> Optional[float]:
    return qc_auc(clean, np.asarray(corrupted, dtype=np.float64)) if len(corrupted) else None


def qc_task(encoder, data, *, rates: Sequence[float] = QC_RATES, kinds: Optional[Sequence[str]] = None,
            seed: int = 0) -> Dict[str, Any]:
    """Metadata QC: AUC of the volume-sentence cosine distance, corrupted vs clean, per kind and rate, and
    within each, per corrupted tag and split by whether the image determines the tag.

    A corruption that leaves the sentence unchanged (e.g. an inversion time moved within its sentence bin)
    cannot be seen by any sentence-based score: it is counted (``n_text_unchanged``) and left out of the
    AUCs. ``image_determined`` / ``image_independent`` split the corruptions by the tag they touch:
    the phantom's image does not depend on :data:`~medvl.data.synthetic.MR_IMAGE_INDEPENDENT_TAGS` (the
    scanner's maker and model), so no image-text model can notice them; MR-CLIP's claim is about the
    others.
    """
    from medvl.data.metadata import CORRUPTION_KINDS, corrupt_metadata, metadata_to_text
    from medvl.data.synthetic import MR_IMAGE_INDEPENDENT_TAGS

    encoder, data = _prepare(encoder, data)
    reason = task_requirement("qc", data)
    if reason:
        raise ValueError(reason)
    kinds = list(CORRUPTION_KINDS if kinds is None else kinds)
    for rate in rates:
        if not (isinstance(rate, numbers.Real) and 0 < rate < 1):
            raise ValueError(f"rates: each rate must be a share in (0, 1), got {rate!r}")
    n = len(data)
    if n < 2:
        raise NotEnoughData("task 'qc' needs at least two series (one corrupted, one clean)")
    image = data.volumes(encoder).image_features
    clean_text = [metadata_to_text(m) for m in data.metadata]
    clean_scores = cosine_distance(_np(image), _np(encoder.encode_texts(clean_text)))
    by_case: Dict[str, Any] = {}
    scores: Dict[str, Dict[str, List[float]]] = {}
    for k, kind in enumerate(kinds):
        for rate in rates:
            rng = np.random.default_rng([int(seed), k, int(round(rate * 1000))])
            wanted = min(n - 1, max(1, int(round(rate * n))))
            chosen, texts, tags = [], [], []
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
            key = f"{kind}@{rate:g}"
            if not chosen:
                by_case[key] = {"auc": None, "n_clean": n, "n_corrupted": 0}
                continue
            corrupted_scores = cosine_distance(_np(image[chosen]), _np(encoder.encode_texts(texts)))
            clean = np.delete(clean_scores, chosen)
            changed = [t != clean_text[i] for t, i in zip(texts, chosen)]
            seen = [float(s) for s, c in zip(corrupted_scores, changed) if c]
            by_tag: Dict[str, List[float]] = {}
            split: Dict[str, List[float]] = {"image_determined": [], "image_independent": []}
            for score, tag, c in zip(corrupted_scores, tags, changed):
                if c:
                    by_tag.setdefault(tag, []).append(float(score))
                    split["image_independent" if tag in MR_IMAGE_INDEPENDENT_TAGS else "image_determined"].append(
                        float(score))
            by_case[key] = {"auc": _auc_or_none(clean, seen), "n_clean": int(clean.size),
                            "n_corrupted": len(chosen), "n_text_unchanged": int(len(chosen) - len(seen)),
                            **{group: {"auc": _auc_or_none(clean, v), "n": len(v)} for group, v in split.items()},
                            "by_tag": {tag: {"auc": _auc_or_none(clean, v), "n": len(v)}
                                       for tag, v in sorted(by_tag.items())}}
            scores[key] = {"clean": clean.round(6).tolist(), "corrupted": corrupted_scores.round(6).tolist()}
    aucs = [v["auc"] for v in by_case.values() if v["auc"] is not None]
    return {"by_case": by_case, "mean_auc": float(np.mean(aucs)) if aucs else None,
            "clean_score_mean": float(clean_scores.mean()), "n": n, "score": "cosine distance volume-sentence",
            "image_independent_tags": list(MR_IMAGE_INDEPENDENT_TAGS), "data": scores}


def _slice_thickness_mm(data: EvalSet, index: int) -> float:
    """mm per index along Z of the transformed volume: the norm of the affine's Z column."""
    meta = data.dataset[index].meta
    affine = meta.get("affine")
    if affine is not None:
        return float(np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, 2]))
    records = getattr(data.dataset, "records", None)
    spacing = None if records is None else records[index].get("spacing")
    if spacing is None:
        raise ValueError("localization: the volumes carry neither an affine nor a spacing, so depth bins "
                         "cannot be turned into millimetres")
    return float(spacing[0])  # (z, y, x) spacing of an untransformed phantom


def localization_task(encoder, data, *, seed: int = 0) -> Dict[str, Any]:
    """Depth localization of report snippets against three baselines, errors in mm."""
    encoder, data = _prepare(encoder, data)
    reason = task_requirement("localization", data)
    if reason:
        raise ValueError(reason)
    patch_z = encoder.patch_size[2]
    rows = [(i, s) for i, m in enumerate(data.metas) for s in (m.get("snippets") or [])]
    depth = encoder.project(data.volumes(encoder).depth, normalize=False)  # (N, n_z, D)
    if encoder.model_standardizes:
        depth = depth - depth.mean(1, keepdim=True)  # as in training (medvl.train.losses.center_depth)
    n_z = int(depth.shape[1])
    if n_z < 2:
        raise NotEnoughData(f"task 'localization': the volumes have {n_z} depth bin (Z {data.size[2]} / patch_z "
                            f"{patch_z}); there is nothing to localize")
    sample = np.asarray([i for i, _ in rows], dtype=np.int64)
    finding = [s["finding"] for _, s in rows]
    target = np.asarray([min(int(s["depth_index"]) // patch_z, n_z - 1) for _, s in rows], dtype=np.int64)
    snippets = encoder.encode_texts([s["text"] for _, s in rows], kind="snippet")
    predicted = predict_depth(_np(snippets), _np(depth[torch.as_tensor(sample)]))
    bin_mm = patch_z * _slice_thickness_mm(data, int(sample[0]))

    middle = np.full_like(target, (n_z - 1) // 2)
    random = np.random.default_rng(seed).integers(0, n_z, size=target.size).astype(np.int64)
    prior = np.empty_like(target)
    finding_arr = np.asarray(finding, dtype=object)
    for r in range(target.size):
        others = (finding_arr == finding[r]) & (sample != sample[r])
        prior[r] = int(np.floor(target[others].mean() + 0.5)) if others.any() else middle[r]
    predictions = {"model": predicted, "middle": middle, "random": random, "finding_mean": prior}
    by_depth: Dict[str, Dict[str, Any]] = {}
    for b in np.unique(target).tolist():
        at = target == b
        by_depth[str(b)] = {"n": int(at.sum()), **{name: float(np.abs(p[at] - b).mean() * bin_mm)
                                                    for name, p in predictions.items()}}
    return {"model": localization_metrics(predicted, target, bin_mm),
            "baselines": {name: localization_metrics(p, target, bin_mm) for name, p in predictions.items()
                          if name != "model"},
            "bin_mm": bin_mm, "n_bins": n_z, "patch_z": patch_z, "n_snippets": int(target.size),
            "depth_features": "prompt head" if encoder.has_prompt_head else "image projection",
            "baseline_note": "middle bin; uniform random bin (seeded); mean true bin of the same finding over the "
                             "other samples of the evaluation set (leave-one-out)",
            "data": {"by_depth": by_depth}}


def collapse_task(encoder, data) -> Dict[str, Any]:
    """Is the embedding space collapsed on these held-out samples? :func:`medvl.models.diagnostics.embedding_spread`
    of the volumes and their own texts (mean cosine between two different samples, volume with own text
    against the others), with a warning when collapsed."""
    from medvl.models.diagnostics import COLLAPSE_COSINE, embedding_spread

    encoder, data = _prepare(encoder, data)
    volumes = data.volumes(encoder)
    texts = encoder.encode_texts(data.texts)
    return {**embedding_spread(volumes.image_features, texts, data.texts), "threshold": COLLAPSE_COSINE}


TASKS: Dict[str, Callable[..., Dict[str, Any]]] = {
    "zeroshot": zeroshot_task, "retrieval": retrieval_task, "precision": precision_task, "probe": probe_task,
    "fewshot": fewshot_task, "qc": qc_task, "localization": localization_task, "collapse": collapse_task,
}
# Tasks with random draws (split, shots, corruptions, the random baseline): evaluate() passes them its seed.
_SEEDED_TASKS = ("zeroshot", "probe", "fewshot", "qc", "localization")


# ------------------------------------------------------------------------------------------------------
# evaluate()
# ------------------------------------------------------------------------------------------------------

def _prompt_head_of(checkpoint: Path) -> Optional[torch.nn.Linear]:
    """RadFinder's prompt head of a checkpoint, with the stored standardisation of its output folded in as a
    bias (when the checkpoint has one); None without a head."""
    from safetensors import safe_open

    from medvl.nn.standardize import FeatureStandardizer

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        if "loss.prompts.head.weight" not in keys:
            return None
        weight = f.get_tensor("loss.prompts.head.weight").float()
        prefix = "loss.prompt_standardizer."
        standardizer = None
        if f"{prefix}mean" in keys:
            standardizer = FeatureStandardizer(weight.shape[0])
            standardizer.load_state_dict({k: f.get_tensor(prefix + k) for k in ("mean", "var", "num_samples")})
    bias = None
    if standardizer is not None and int(standardizer.num_samples) > 0:
        weight, bias = standardizer.fold(weight)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def _check_device(device: Union[str, torch.device]) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available here; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    return device


def _load_model(checkpoint_or_model, device, prompt_head):
    """(model, run_config, prompt head weight or None, model key, checkpoint dir or None)."""
    from medvl.models.checkpoint import checkpoint_dir, checkpoint_hash, load_checkpoint

    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        path = checkpoint_dir(checkpoint_or_model)
        model, run_config = load_checkpoint(path, device)
        head = _prompt_head_of(path) if prompt_head is None else prompt_head
        return model, run_config, head, checkpoint_hash(path), path
    if isinstance(checkpoint_or_model, (tuple, list)) and len(checkpoint_or_model) == 2:
        model, run_config = checkpoint_or_model
        if not isinstance(run_config, Mapping):
            raise TypeError(f"checkpoint_or_model: the second item must be the run config dict, got "
                            f"{type(run_config).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"checkpoint_or_model: the first item must be the CLIPModel, got {type(model).__name__}")
        return model, dict(run_config), prompt_head, None, None
    raise TypeError("checkpoint_or_model: expected a checkpoint path (a checkpoint-<step> or run directory of "
                    f"`medvl train`) or a (model, run_config) pair, got {type(checkpoint_or_model).__name__}")


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _data_kind(data: Any, run_config: Mapping[str, Any]) -> str:
    from medvl.train.data import SYNTHETIC_SOURCES

    model_kind = run_config.get("data_kind")
    if isinstance(data, str) and data in SYNTHETIC_SOURCES:
        kind = SYNTHETIC_SOURCES[data]
        if model_kind is not None and kind != model_kind:
            raise ValueError(f"data {data!r} is {kind.upper()} but the checkpoint was trained on "
                             f"{str(model_kind).upper()} data ({run_config.get('data')}); evaluate it on "
                             f"'synthetic-{model_kind}' or a {str(model_kind).upper()} source")
        return kind
    if model_kind not in ("ct", "mr"):
        raise ValueError("the run config has no data_kind ('ct' or 'mr'); add it to the (model, run_config) pair")
    return model_kind


def _check_size(size, run_config: Mapping[str, Any], patch_size: Sequence[int], log) -> Tuple[int, int, int]:
    from medvl.train.data import parse_size

    trained = run_config.get("size")
    if size is None:
        if trained is None:
            raise ValueError("size: the run config has no 'size'; pass size=(X, Y, Z)")
        size = trained
    size = parse_size(size)
    bad = [f"{axis} {s} (patch {p})" for axis, s, p in zip("XYZ", size, patch_size) if s < p or s % p]
    if bad:
        raise ValueError(f"size {size} does not fit the checkpoint's patch size {tuple(patch_size)}: "
                         f"{', '.join(bad)} is not a multiple of the patch; the checkpoint was trained at "
                         f"{tuple(trained) if trained else '?'}; use that size or another multiple of the patch")
    if trained is not None and tuple(size) != tuple(int(s) for s in trained):
        log(f"size {size} differs from the training size {tuple(trained)}: the position table is resampled")
    return size


def evaluate(checkpoint_or_model, *, data: Any = None, tasks: Union[None, str, Sequence[str]] = None,
             out: Union[str, os.PathLike, None] = None, n: Optional[int] = None, seed: int = DEFAULT_EVAL_SEED,
             size: Optional[Sequence[int]] = None, device: Union[str, torch.device] = "cpu",
             cache_dir: Union[str, os.PathLike, None] = None, log: Optional[Callable[[str], None]] = None,
             prompt_head: Any = None, batch_size: int = 8, split: str = "valid", plots: bool = True) -> Dict[str, Any]:
    """Run evaluation tasks on held-out data and (with ``out``) write results.json, report.md and plots.

    Args:
        checkpoint_or_model: a checkpoint directory (or run directory) of ``medvl train``, or an
            in-memory ``(model, run_config)`` pair (e.g. right after training; the model's train/eval
            mode is restored afterwards).
        data: "synthetic-ct" / "synthetic-mr", a manifest, a CT-RATE root or MR NIfTI folder (as in
            ``medvl train``), or a ``VolumeTextDataset``; default the checkpoint's training source.
        tasks: names from ``TASKS`` ("a,b" or a list); default every task that applies to the data.
            A task asked for explicitly that does not apply raises ValueError naming what it needs.
        out: the folder for results.json, report.md and the PNGs; None writes nothing.
        n: phantoms to generate (default 256), or at most this many rows of a file source (default all).
        seed: the phantoms' seed (default 100000, far from training seeds) and the seed of every draw.
        size: (X, Y, Z) of the volumes; default the training size. Must be a multiple of the patch size.
        device: "cpu" or "cuda".
        cache_dir: the embedding cache folder; default ``out/cache`` (memory only when out is None).
        log: called with progress lines; None for quiet.
        prompt_head: RadFinder's prompt projection for a (model, run_config) pair (a (D, W) tensor,
            nn.Linear or the recipe loss); a checkpoint's is read from its weights file.
        batch_size: volumes per forward pass. split: the CT-RATE split ("valid" by default).
        plots: draw the PNGs when writing to ``out``.

    Returns ``{"checkpoint", "model_key", "data", "kind", "n", "seed", "size", "device", "tasks",
    "results": {task: dict}, "skipped": {task: reason}, "encoding": counters, "timing_s", "files"}``.
    """
    emit = log if log is not None else (lambda _line: None)
    if log is not None and not callable(log):
        raise TypeError(f"log: expected a callable taking one str, or None; got {type(log).__name__}")
    device = _check_device(device)
    requested = parse_tasks(tasks)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise ValueError(f"n: expected an int >= 1 (or None), got {n!r}")

    model, run_config, head, model_key, checkpoint = _load_model(checkpoint_or_model, device, prompt_head)
    # A model handed in is given back as it came: same train/eval mode, same device.
    was_training, home = model.training, _device_of(model)
    try:
        patch_size = tuple(int(p) for p in model.visual.patch_size)
        data = run_config.get("data") if data is None else data
        if data is None:
            raise ValueError("data: the run config names no data source; pass data=")
        if isinstance(data, os.PathLike):
            data = os.fspath(data)
        if isinstance(data, str):
            from medvl.train.data import build_dataset

            kind = _data_kind(data, run_config)
            size = _check_size(size, run_config, patch_size, emit)
            count = (DEFAULT_N if n is None else int(n)) if data.startswith("synthetic-") else n
            dataset, _ = build_dataset(data, kind, n=count, seed=int(seed), size=size, split=split, log=emit)
            eval_set = EvalSet.from_dataset(dataset, kind, source=data, size=size)
        else:
            kind = _data_kind(None, run_config)
            eval_set = EvalSet.from_dataset(data, kind)
            size = _check_size(eval_set.size, run_config, patch_size, emit)
        data_name = eval_set.source

        skipped: Dict[str, str] = {}
        if requested is None:
            chosen = []
            for task in TASKS:
                reason = task_requirement(task, eval_set)
                if reason is None:
                    chosen.append(task)
                elif kind in TASK_KINDS[task]:
                    skipped[task] = reason  # applies to the kind but not to this source: say why
        else:
            for task in requested:
                reason = task_requirement(task, eval_set)
                if reason is not None:
                    valid = [t for t in TASKS if task_requirement(t, eval_set) is None]
                    raise ValueError(f"{reason}. Tasks that apply to {data_name}: {', '.join(valid) or 'none'}")
            chosen = requested

        if cache_dir is None and out is not None:
            cache_dir = Path(out) / "cache"
        if model_key is None:
            model_key = model_fingerprint(model, head_tensors(head))
        cache = EmbeddingCache(cache_dir, model_key)
        encoder = CachedEncoder(model, cache, device=device, batch_size=batch_size, prompt_head=head)
        emit(f"evaluating on {len(eval_set)} {kind.upper()} samples of {data_name} (seed {seed}, size {size}): "
             f"{', '.join(chosen)}")

        results: Dict[str, Any] = {}
        timing: Dict[str, float] = {}
        start = time.perf_counter()
        eval_set.volumes(encoder)
        timing["encode_volumes"] = time.perf_counter() - start
        for task in chosen:
            start = time.perf_counter()
            try:
                options = {"seed": int(seed)} if task in _SEEDED_TASKS else {}
                results[task] = TASKS[task](encoder, eval_set, **options)
            except NotEnoughData as e:
                skipped[task] = str(e)
                emit(f"{task}: skipped: {e}")
            timing[task] = time.perf_counter() - start
            if task in results:
                emit(f"{task}: done in {timing[task]:.1f} s")
    finally:
        model.to(home).train(was_training)

    summary: Dict[str, Any] = {
        "training_diagnostics": _training_diagnostics(checkpoint),
        "checkpoint": None if checkpoint is None else str(checkpoint), "model_key": model_key,
        "recipe": run_config.get("recipe"), "data": data_name, "kind": kind, "n": len(eval_set), "seed": int(seed),
        "size": list(size), "device": str(device), "tasks": list(results), "results": results, "skipped": skipped,
        "encoding": encoder.stats(), "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "cache_dir": None if cache_dir is None else os.path.abspath(os.fspath(cache_dir)), "files": {},
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"results": str(out / "results.json"), "report": str(out / "report.md")}
        if plots:
            from medvl.eval.plots import draw_plots

            colour, colour_name = _pca_colours(eval_set)
            files.update(draw_plots(results, out, embeddings=_np(eval_set.volumes(encoder).image_features),
                                    colours=colour, colour_name=colour_name))
        summary["files"] = files
        (out / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
        (out / "report.md").write_text(format_report(summary))
        emit(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return summary


def _training_diagnostics(checkpoint: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The collapse diagnostics ``medvl train`` wrote beside the checkpoint (``diagnostics.json`` of the run
    folder), or None."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).parent / "diagnostics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _pca_colours(data: EvalSet) -> Tuple[List[str], str]:
    """A category per sample for the embedding map: the MR sequence or contrast category; for CT the
    single finding, "normal" or "several findings"."""
    if data.kind == "mr" or data.labels is None:
        target, names, what = _class_target(data)
        if target is None:
            return ["all"] * len(data), "none"
        return [str(names[t]) if names else str(t) for t in target.tolist()], what
    names = data.finding_names or [str(j) for j in range(data.labels.shape[1])]
    colours = []
    for row in data.labels:
        hits = np.flatnonzero(row)
        colours.append("normal" if hits.size == 0 else names[hits[0]] if hits.size == 1 else "several findings")
    return colours, "finding"


# ------------------------------------------------------------------------------------------------------
# The report: one markdown table (or two) per task
# ------------------------------------------------------------------------------------------------------

_MAX_CLASS_ROWS = 20  # longer per-class tables stay in results.json only
_RELEVANCE_WORDS = {"shared": "shares a finding (or both normal)", "identical": "identical finding sets",
                    "jaccard": "Jaccard index of the finding sets (graded)", "equal labels": "same contrast category"}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _auc_n(entry: Optional[Mapping[str, Any]]) -> str:
    if not entry:
        return "-"
    return f"{_fmt(entry['auc'])} ({entry['n']})"


def _report_task(task: str, r: Mapping[str, Any]) -> str:
    if task == "zeroshot":
        keys = ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity", "n_pos", "n_neg")
        probe = r.get("probe") or {"per_class": {}, "macro": {}}
        rows = [[name, m.get("auc"), (probe["per_class"].get(name) or {}).get("auc")] + [m.get(k) for k in keys[1:]]
                for name, m in r["per_class"].items()]
        rows.append(["macro", r["macro"].get("auc"), probe["macro"].get("auc")] + [r["macro"].get(k) for k in keys[1:5]]
                    + [None, None])
        note = (f"{r['n']} volumes, {r['n_templates']} templates per finding, volume side: {r['volume_side']}. "
                "Chance AUC 0.5. probe AUC: the supervised ceiling, a linear probe on the same volumes' features "
                "(4-fold cross-validated).")
        return note + "\n\n" + _table(("finding", "zero-shot AUC", "probe AUC") + keys[1:], rows)
    if task == "retrieval":
        directions = [d for d in ("volume_to_text", "text_to_volume", "volume_to_text_class", "text_to_volume_class")
                      if d in r]
        keys = [k for k in r["volume_to_text"] if k.startswith("R@")] + ["MedR", "mAP", "n_queries"]
        rows = [[d] + [r[d].get(k) for k in keys] for d in directions]
        chance = ", ".join(f"{k} {v:.3f}" for k, v in r["chance_R@1"].items())
        note = (f"{r['n']} pairs, {r['n_distinct_texts']} distinct texts; identical texts match"
                + (f"; class level: {r['class_relevance']}" if "class_relevance" in r else "")
                + f". Chance R@1: {chance}.")
        return note + "\n\n" + _table(["direction"] + keys, rows)
    if task == "precision":
        keys = [k for k in r if k.startswith("P@")]
        rows = [["all"] + [r[k] for k in keys] + [r["n_queries"]], ["macro"] + [r["macro"][k] for k in keys] + [None]]
        note = f"Relevance: {_RELEVANCE_WORDS.get(r['relevance'], r['relevance'])}; chance {_fmt(r['chance'])}."
        if "by_relevance" in r:
            graded = [[_RELEVANCE_WORDS[m]] + [v[k] for k in keys] + [v["chance"]] for m, v in r["by_relevance"].items()]
            note += (" Each relevance, with the P@R of a random ranking (chance):\n\n"
                     + _table(["relevance"] + keys + ["chance"], graded) + "\n\nPer class (shares a finding):")
        if len(r["per_class"]) <= _MAX_CLASS_ROWS:
            rows += [[str(c)] + [v[k] for k in keys] + [v["n_queries"]] for c, v in r["per_class"].items()]
        else:
            note += f" {len(r['per_class'])} classes: the per-class values are in results.json."
        return note + "\n\n" + _table(["queries"] + keys + ["n"], rows)
    if task == "probe":
        keys = ("accuracy", "balanced_accuracy", "macro_f1", "majority_accuracy", "n_train", "n_test")
        note = f"Target: {r['target']} ({r['n_classes']} classes); split: {r['split']}."
        return note + "\n\n" + _table(keys, [[r[k] for k in keys]])
    if task == "fewshot":
        rows = [[k, v["mean"], v["std"], v["k_effective"]] for k, v in r["by_k"].items()]
        note = f"Target: {r['target']}; {r['n_train']} training / {r['n_test']} test samples; {r['split']}."
        return note + "\n\n" + _table(("shots per class", "accuracy mean", "std", "k effective"), rows)
    if task == "qc":
        rows = [[case, v["auc"], (v.get("image_determined") or {}).get("auc"),
                 (v.get("image_independent") or {}).get("auc"), v["n_clean"], v["n_corrupted"],
                 v.get("n_text_unchanged")] for case, v in r["by_case"].items()]
        tags = sorted({t for v in r["by_case"].values() for t in v.get("by_tag", {})})
        cases = [c for c, v in r["by_case"].items() if v.get("by_tag")]
        tag_rows = [[t] + [_auc_n(r["by_case"][c]["by_tag"].get(t)) for c in cases] for t in tags]
        note = (f"Score: {r['score']} (corrupted = positive); mean AUC {_fmt(r['mean_auc'])}. Corruptions that leave "
                f"the sentence unchanged are left out of the AUCs (n unchanged). Image-independent tags (the image "
                f"cannot show them): {', '.join(r.get('image_independent_tags', []))}.")
        return (note + "\n\n" + _table(("corruption@rate", "AUC", "image-determined", "image-independent", "n clean",
                                        "n corrupted", "n unchanged"), rows)
                + "\n\nAUC (n) by corrupted tag:\n\n" + _table(["tag"] + cases, tag_rows))
    if task == "localization":
        keys = ("mae_mm", "median_mm", "within_one_bin", "n")
        rows = [["model"] + [r["model"][k] for k in keys]]
        rows += [[name] + [m[k] for k in keys] for name, m in r["baselines"].items()]
        note = (f"{r['n_snippets']} snippets, {r['n_bins']} depth bins of {r['bin_mm']:g} mm (patch_z "
                f"{r['patch_z']}); depth features through the {r['depth_features']}. Baselines: {r['baseline_note']}.")
        return note + "\n\n" + _table(("predictor",) + keys, rows)
    return "```\n" + json.dumps(r, indent=1, default=_json_default) + "\n```"


def _collapse_lines(summary: Mapping[str, Any]) -> List[str]:
    """The report's collapse section: this evaluation's held-out measures, the training run's diagnostics, and
    a warning line for each sign of collapse."""
    spread, training = summary["results"].get("collapse"), summary.get("training_diagnostics")
    if spread is None and training is None:
        return []
    lines, warnings = ["## collapse diagnostics", ""], []
    if spread is not None:
        text = spread.get("text_offdiagonal_cosine") or {}
        lines.append(f"- these {spread['n']} samples: mean cosine between two volumes "
                     f"{_fmt(spread['image_offdiagonal_cosine']['mean'])}, between two different texts "
                     f"{_fmt(text.get('mean'))} (collapsed above {spread['threshold']}); a volume with its own text "
                     f"{_fmt(spread.get('matched_cosine'))}, with the others {_fmt(spread.get('unmatched_cosine'))}")
        if spread["collapsed"]:
            warnings.append("collapsed embeddings: " + "; ".join(spread["reasons"]))
    if training is not None:
        loss = training.get("loss") or {}
        if loss.get("final") is not None and loss.get("collapsed_level") is not None:
            lines.append(f"- training: final contrastive loss {_fmt(loss['final'])} against the collapsed solution's "
                         f"{_fmt(loss['collapsed_level'])} (global batch {loss.get('global_batch')})")
        if training.get("gap") is not None:
            lines.append(f"- training run's R@5: train {_fmt(training['train']['R@5'])}, held-out "
                         f"{_fmt(training['held_out']['R@5'])} (gap {training['gap']['R@5']:+.3f}; chance "
                         f"{_fmt(training['held_out']['chance_R@5'])})")
        warnings += [w for w in training.get("warnings", []) if not w.startswith("collapsed embeddings")
                     or spread is None]
    lines += [f"- **WARNING**: {w}" for w in warnings] or ["- no sign of collapse"]
    return lines + [""]


def format_report(summary: Mapping[str, Any]) -> str:
    """The markdown report of :func:`evaluate`'s result: a header, then a section per task."""
    lines = ["# medvl evaluation", "",
             f"- checkpoint: {summary.get('checkpoint') or 'in-memory model'} (recipe {summary.get('recipe')})",
             f"- data: {summary['data']} ({str(summary['kind']).upper()}), {summary['n']} samples, seed "
             f"{summary['seed']}, size {tuple(summary['size'])}, device {summary['device']}",
             "- encoding: " + ", ".join(f"{k} {v}" for k, v in summary["encoding"].items()), ""]
    lines += _collapse_lines(summary)
    for task, result in summary["results"].items():
        if task == "collapse":
            continue
        lines += [f"## {task}", "", _report_task(task, result), ""]
    for task, reason in summary.get("skipped", {}).items():
        lines += [f"## {task} (skipped)", "", reason, ""]
    plots = {k: v for k, v in summary.get("files", {}).items() if str(v).endswith(".png")}
    if plots:
        lines += ["## plots", ""] + [f"- {k}: {os.path.basename(v)}" for k, v in plots.items()] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# DICOM metadata QC: `medvl qc`
# ------------------------------------------------------------------------------------------------------

# Tags every MR series header should carry (mr_metadata keys; "Plane" comes from ImageOrientationPatient).
# ContrastBolusAgent, ScanOptions and InversionTime are legitimately absent, so they are not required.
REQUIRED_MR_TAGS = ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer",
                    "ManufacturerModelName", "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "Plane")

# Usual ranges (ms, degrees) by sequence family, wide enough for clinical 1.5 T / 3 T brain protocols
# (MR physics textbooks; the phantoms' MR_SEQUENCES sit well inside them). A value outside is suspect,
# not impossible.
SEQUENCE_RANGES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "T1 spin echo": {"EchoTime": (5, 35), "RepetitionTime": (250, 1000), "FlipAngle": (60, 180)},
    "T2/PD spin echo": {"EchoTime": (6, 200), "RepetitionTime": (1200, 10000), "FlipAngle": (60, 180)},
    "FLAIR": {"EchoTime": (60, 200), "RepetitionTime": (5000, 14000), "InversionTime": (1500, 3200)},
    "T1 FLAIR": {"EchoTime": (5, 35), "RepetitionTime": (1200, 4000), "InversionTime": (300, 1500)},
    "STIR": {"EchoTime": (15, 120), "RepetitionTime": (2000, 9000), "InversionTime": (100, 300)},
    "IR gradient echo (MPRAGE)": {"EchoTime": (1, 8), "RepetitionTime": (5, 3500), "InversionTime": (400, 1600),
                                  "FlipAngle": (4, 20)},
    "gradient echo": {"EchoTime": (1, 60), "RepetitionTime": (2, 1500), "FlipAngle": (3, 90)},
    "echo planar": {"EchoTime": (15, 150), "RepetitionTime": (500, 15000)},
}
# Scanner model names by vendor (first word of Manufacturer, lower case).
_VENDOR_MODELS = {
    "siemens": ("avanto", "aera", "skyra", "prisma", "verio", "trio", "vida", "sola", "espree", "symphony",
                "sonata", "magnetom", "biograph", "lumina", "altea", "amira", "essenza"),
    "ge": ("signa", "discovery", "optima", "genesis", "brivo"),
    "philips": ("achieva", "ingenia", "intera", "panorama", "gyroscan", "elition", "multiva"),
    "canon": ("vantage", "titan", "galan", "orian", "excelart"),
    "toshiba": ("vantage", "titan", "galan", "orian", "excelart"),
}
# Series-description words naming a family (checked in order), for headers without ScanningSequence.
_DESCRIPTION_FAMILIES = (
    (("FLAIR",), "FLAIR"), (("STIR", "TIRM"), "STIR"),
    (("MPRAGE", "BRAVO", "TFE", "SPGR"), "IR gradient echo (MPRAGE)"),
    (("GRE", "FFE", "SWI"), "gradient echo"), (("EPI", "DWI"), "echo planar"),
)
_PLANE_WORDS = {"ax": "axial", "axial": "axial", "tra": "axial", "sag": "sagittal", "sagittal": "sagittal",
                "cor": "coronal", "coronal": "coronal"}


def _terms(value: Any) -> Tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split("\\")
    return tuple(str(v).strip().upper() for v in value if str(v).strip())


def _number(value: Any) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def sequence_family(metadata: Mapping[str, Any]) -> Optional[str]:
    """The key of :data:`SEQUENCE_RANGES` a header describes, from ScanningSequence, TI and the description."""
    seq = set(_terms(metadata.get("ScanningSequence")))
    ti = _number(metadata.get("InversionTime"))
    words = str(metadata.get("SeriesDescription") or "").upper().replace("*", " ").split()
    if "EP" in seq:
        return "echo planar"
    if "IR" in seq and "GR" in seq:
        return "IR gradient echo (MPRAGE)"
    if "IR" in seq:
        if ti is None or ti <= 0:
            return None
        return "STIR" if ti < 300 else "T1 FLAIR" if ti < 1500 else "FLAIR"
    if "SE" in seq:
        if "T1" in words:
            return "T1 spin echo"
        if "T2" in words or "PD" in words:
            return "T2/PD spin echo"
        tr = _number(metadata.get("RepetitionTime"))
        return None if tr is None else ("T1 spin echo" if tr < 1000 else "T2/PD spin echo")
    if "GR" in seq:
        return "gradient echo"
    if not seq:  # ScanningSequence missing: the description's usual names, so the ranges still apply
        for names, family in _DESCRIPTION_FAMILIES:
            if any(name in words for name in names):
                return family
        if {"SE", "TSE", "FSE"} & set(words):
            return "T1 spin echo" if "T1" in words else "T2/PD spin echo" if {"T2", "PD"} & set(words) else None
    return None


def metadata_issues(metadata: Mapping[str, Any]) -> List[str]:
    """What looks wrong in an MR series header, by simple rules (empty list: nothing found).

    Rules: a tag of :data:`REQUIRED_MR_TAGS` is missing; TE / TR / TI / flip angle outside the
    :data:`SEQUENCE_RANGES` of the sequence family (:func:`sequence_family`); IR in ScanningSequence
    without an InversionTime, or an InversionTime without IR; a field strength outside 0.1-7 T; a
    scanner model that belongs to another vendor; a plane word in SeriesDescription (AX, SAG, COR)
    that disagrees with ImageOrientationPatient; a description saying contrast (+C, GD, POST) with no
    ContrastBolusAgent; an IR gradient echo (MPRAGE) that is not 3D.
    """
    issues = [f"missing {tag}" for tag in REQUIRED_MR_TAGS if metadata.get(tag) in (None, "", ())]
    seq = set(_terms(metadata.get("ScanningSequence")))
    ti = _number(metadata.get("InversionTime"))
    if "IR" in seq and (ti is None or ti <= 0):
        issues.append("IR in ScanningSequence but no InversionTime")
    if "IR" not in seq and seq and ti is not None and ti > 0:
        issues.append(f"InversionTime {ti:g} ms but no IR in ScanningSequence {'/'.join(sorted(seq))}")
    family = sequence_family(metadata)
    for tag, (low, high) in SEQUENCE_RANGES.get(family, {}).items():
        value = _number(metadata.get(tag))
        if value is not None and not low <= value <= high:
            unit = "degrees" if tag == "FlipAngle" else "ms"
            issues.append(f"{tag} {value:g} {unit} outside the usual {low:g}-{high:g} for {family}")
    b0 = _number(metadata.get("MagneticFieldStrength"))
    if b0 is not None and not 0.1 <= b0 <= 7.0:
        issues.append(f"MagneticFieldStrength {b0:g} T outside 0.1-7 T")
    maker = str(metadata.get("Manufacturer") or "").strip().split()
    model = str(metadata.get("ManufacturerModelName") or "").strip().lower()
    if maker and model:
        vendor = maker[0].lower()
        owners = [v for v, models in _VENDOR_MODELS.items() if any(model.startswith(m) for m in models)]
        if owners and vendor in _VENDOR_MODELS and vendor not in owners:
            issues.append(f"ManufacturerModelName {metadata.get('ManufacturerModelName')!r} is a "
                          f"{'/'.join(o.capitalize() for o in owners)} scanner, Manufacturer says "
                          f"{metadata.get('Manufacturer')!r}")
    words = str(metadata.get("SeriesDescription") or "").lower().replace("+", " + ").split()
    planes = {_PLANE_WORDS[w] for w in words if w in _PLANE_WORDS}
    plane = metadata.get("Plane")
    if plane and len(planes) == 1 and plane not in planes:
        issues.append(f"SeriesDescription says {planes.pop()} but the orientation is {plane}")
    description = str(metadata.get("SeriesDescription") or "").upper()
    if any(w in description.replace("+", " +").split() for w in ("+C", "GD", "POST", "+GD")) \
            and not metadata.get("ContrastBolusAgent"):
        issues.append("SeriesDescription says contrast but ContrastBolusAgent is empty")
    if family == "IR gradient echo (MPRAGE)" and metadata.get("MRAcquisitionType") not in (None, "3D"):
        issues.append(f"IR gradient echo (MPRAGE) acquired {metadata.get('MRAcquisitionType')}, normally 3D")
    return issues


def find_series_folders(root: Union[str, os.PathLike]) -> List[str]:
    """Every folder under ``root`` (itself included) that directly holds at least one DICOM file
    (a Part 10 preamble), sorted."""
    from pydicom.misc import is_dicom

    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DICOM folder {root!r} does not exist (or is not a folder)")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not name.startswith(".") and os.path.isfile(path) and is_dicom(path):
                found.append(folder)
                break
    return sorted(found)


def qc_dicom(checkpoint_or_model, folder: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
             cache_dir: Union[str, os.PathLike, None] = None, rank_by: str = "issues", batch_size: int = 8,
             log: Optional[Callable[[str], None]] = None, prompt_head: Any = None) -> Dict[str, Any]:
    """Score every DICOM series under ``folder`` against its metadata sentence, most suspect first.

    Each series folder's headers give the metadata (``read_series_metadata``) and the sentence
    (``metadata_to_text``); its pixels go through the training preprocessing of MR files (RAS,
    resampled to fit 240 mm into the checkpoint's size, z-scored). Score = cosine distance between
    volume and sentence (higher = more suspect); ``issues`` = :func:`metadata_issues`.

    rank_by: "issues" (default): series with rule-based issues first (more issues first), then by
    score, since a missing tag or an impossible value is certain while the learned score is graded;
    "score": by score alone.

    A series that cannot be read (its headers, or its pixels: a truncated slice) is not scored: it is
    listed in ``unreadable`` with the reason and the others go on, as ``medvl train --skip-bad`` leaves a
    bad volume out (both through :func:`medvl.train.data.readable_records`). With ``cache_dir`` the
    preprocessed volumes are kept under ``cache_dir/volumes``, so a second run reads no pixels twice.

    Returns ``{"series": [{"rank", "series", "score", "issues", "sentence", "description",
    "series_uid", "n_slices"}...], "unreadable": [{"series", "reason"}], "checkpoint", "model_key"}``.
    """
    from medvl.data.dicom import read_series_metadata
    from medvl.data.metadata import contrast_category, metadata_to_text
    from medvl.train.data import FileVolumeDataset, _file_transform, readable_records

    emit = log if log is not None else (lambda _line: None)
    if rank_by not in ("issues", "score"):
        raise ValueError(f"rank_by: expected 'issues' or 'score', got {rank_by!r}")
    device = _check_device(device)
    folders = find_series_folders(folder)
    root = os.path.abspath(os.fspath(folder))
    model, run_config, head, model_key, checkpoint = _load_model(checkpoint_or_model, device, prompt_head)
    if run_config.get("data_kind") != "mr":
        raise ValueError(f"qc scores MR series against their metadata sentences and needs a checkpoint trained on "
                         f"MR data (data_kind 'mr', e.g. recipe mrclip); this one was trained on "
                         f"{run_config.get('data_kind')!r} data ({run_config.get('data')})")
    if not folders:
        raise FileNotFoundError(f"no DICOM files under {root}; give the folder holding the series folders")
    size = _check_size(None, run_config, tuple(int(p) for p in model.visual.patch_size), emit)

    records, unreadable = [], []
    for path in folders:
        rel = os.path.relpath(path, root)
        try:
            metadata = read_series_metadata(path)
        except ValueError as e:
            unreadable.append({"series": rel, "reason": str(e)})
            emit(f"{rel}: unreadable: {e}")
            continue
        records.append({"image": path, "metadata": metadata, "volume_loader": "file",
                        "meta": {"row": len(records) + 1, "series": rel}})
    transform, description = _file_transform("mr", size, None)
    volume_cache = None if cache_dir is None else os.path.join(os.fspath(cache_dir), "volumes")

    def make(recs):
        return FileVolumeDataset(recs, transform, description, cache_dir=volume_cache, text_fn=metadata_to_text,
                                 label_fn=contrast_category)

    records, unloadable = readable_records(records, make)
    for record, reason in unloadable:
        unreadable.append({"series": record["meta"]["series"], "reason": reason})
        emit(f"{record['meta']['series']}: unreadable: {reason}")
    unreadable.sort(key=lambda u: u["series"])
    if not records:
        raise ValueError(f"none of the {len(folders)} DICOM folders under {root} could be read: "
                         + "; ".join(f"{u['series']}: {u['reason']}" for u in unreadable[:5]))
    dataset = make(records)
    if model_key is None:
        model_key = model_fingerprint(model, head_tensors(head))
    was_training, home = model.training, _device_of(model)
    try:
        encoder = CachedEncoder(model, EmbeddingCache(cache_dir, model_key), device=device, batch_size=batch_size,
                                prompt_head=head)
        volumes = encoder.encode_volumes(dataset, volume_ids(dataset, "dicom", size, "mr"))
        sentences = [metadata_to_text(r["metadata"]) for r in records]
        scores = cosine_distance(_np(volumes.image_features), _np(encoder.encode_texts(sentences)))
    finally:
        model.to(home).train(was_training)
    rows = []
    for record, sentence, score in zip(records, sentences, scores.tolist()):
        metadata = record["metadata"]
        rows.append({"series": record["meta"]["series"], "score": float(score), "issues": metadata_issues(metadata),
                     "sentence": sentence, "description": metadata.get("SeriesDescription"),
                     "series_uid": metadata.get("SeriesInstanceUID"), "n_slices": metadata.get("NumberOfSlices")})
    if rank_by == "issues":
        rows.sort(key=lambda r: (-len(r["issues"]), -r["score"], r["series"]))
    else:
        rows.sort(key=lambda r: (-r["score"], r["series"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return {"series": rows, "unreadable": unreadable, "checkpoint": None if checkpoint is None else str(checkpoint),
            "model_key": model_key, "rank_by": rank_by}
