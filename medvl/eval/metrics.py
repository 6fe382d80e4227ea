"""Evaluation metrics: retrieval, precision@R, zero-shot AUC, depth localization, quality control.

Pure functions on arrays: each accepts torch tensors (any device, any float dtype) or numpy arrays,
works in numpy float64 on the CPU, and returns plain Python floats / ints / dicts / lists, so a
result goes straight into ``json.dumps``.

One ranking rule everywhere: a row of a similarity matrix is sorted by descending similarity, and
equal similarities keep the lower gallery index first (``np.argsort(-s, kind="stable")``). A model
that scores everything the same therefore gets a deterministic, index-order ranking, not an
optimistic or pessimistic one that depends on the sort implementation.

* :func:`retrieval_metrics` - R@k, median rank and mAP (MR-CLIP, CT-CLIP style retrieval).
* :func:`precision_at_r` - MedTrim's P@R with label-defined relevance, per class and macro.
* :func:`zero_shot_scores`, :func:`zero_shot_auc` - RadFinder's prompt-pair zero-shot classification.
* :func:`predict_depth`, :func:`localization_metrics` - RadFinder's intra-scan localization.
* :func:`cosine_distance`, :func:`qc_auc` - embedding-based quality control (corrupted = positive).
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from medvl.options import look_up_option

__all__ = [
    "RELEVANCE_MODES", "retrieval_metrics", "precision_at_r", "zero_shot_scores", "zero_shot_auc", "probe_auc",
    "prompt_separation", "predict_depth", "localization_metrics", "qc_auc", "cosine_distance",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]

# Rows of a (Q, G) problem handled at once: bounds the (rows, G) int64 / float64 temporaries of
# the ranking to a few hundred MiB for galleries up to ~30k, whatever Q is.
_ROW_CHUNK = 1024
# Same floor as torch.nn.functional.normalize, so scores here match the training losses exactly.
_NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Any tensor / array / nested sequence as a numpy array on the CPU (dtype kept where numpy has it)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"{name}: complex tensors are not supported, got dtype {x.dtype}")
        if x.dtype.is_floating_point and x.dtype not in (torch.float32, torch.float64):
            x = x.double()  # numpy has no bfloat16 (and no float8)
        return x.numpy()
    if x is None:
        raise TypeError(f"{name}: expected a torch tensor or numpy array, got None")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise TypeError(f"{name}: could not be read as an array ({err}); pass a torch tensor or numpy array") from None
    if arr.dtype == object or arr.dtype.kind in "USVMmc":
        raise TypeError(f"{name}: expected a numeric tensor or array, got dtype {arr.dtype}")
    return arr


def _shape(arr: np.ndarray) -> str:
    return str(tuple(arr.shape))


def _check_ndim(arr: np.ndarray, name: str, ndims: Iterable[int], expected: str) -> None:
    ndims = tuple(ndims)
    if arr.ndim not in ndims:
        raise ValueError(f"{name}: expected {expected}, got shape {_shape(arr)} ({arr.ndim}-D)")
    if arr.size == 0:
        raise ValueError(f"{name}: empty input, shape {_shape(arr)}; expected {expected} with every size >= 1")


def _as_float(x: ArrayLike, name: str, ndims: Iterable[int], expected: str) -> np.ndarray:
    """A finite float64 array with one of the given ndims and no empty axis."""
    arr = _to_numpy(x, name)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected a real-valued tensor or array, got dtype {arr.dtype}")
    _check_ndim(arr, name, ndims, expected)
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} NaN/inf value(s) (first at index {where}); "
                         "scores and similarities must be finite - check the model output for overflow")
    return arr


def _as_int_labels(x: ArrayLike, name: str, expected: str) -> np.ndarray:
    """1-D integer class labels (bool is refused: it is almost always a multi-hot row by mistake)."""
    arr = _to_numpy(x, name)
    _check_ndim(arr, name, (1,), expected)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}; "
                        "cast with .long() / .astype(int) (multi-hot labels must be 2-D)")
    return arr.astype(np.int64, copy=False)


def _as_binary(x: ArrayLike, name: str, ndims: Iterable[int], expected: str) -> np.ndarray:
    """A bool array from bool or 0/1 numeric input."""
    arr = _to_numpy(x, name)
    _check_ndim(arr, name, ndims, expected)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected bool or 0/1 values, got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        values = np.unique(arr[bad])[:5].tolist()
        raise ValueError(f"{name}: expected bool or 0/1 values, found {values}")
    return arr.astype(bool)


def _as_cutoffs(values: Union[int, Iterable[int]], name: str) -> List[int]:
    """Cut-offs such as ks=(1, 5, 10): positive ints, duplicates dropped, order kept."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = (values,)
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of positive ints such as (1, 5, 10), got {values!r}") from None
    if not values:
        raise ValueError(f"{name}: expected at least one cut-off, got an empty sequence")
    out: List[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}: every cut-off must be an int >= 1, got {v!r} in {values!r}")
        if int(v) not in out:
            out.append(int(v))
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis with torch's eps floor (a zero vector stays zero, cos 0)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def _ranked_relevance(similarity: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """``relevance`` with each row permuted into rank order (descending similarity, ties: lower index first)."""
    order = np.argsort(-similarity, axis=1, kind="stable")
    return np.take_along_axis(relevance, order, axis=1)


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------

def retrieval_metrics(similarity: ArrayLike, relevance: Optional[ArrayLike] = None,
                      ks: Union[int, Sequence[int]] = (1, 5, 10, 50, 100)) -> Dict[str, Union[float, int]]:
    """Recall@k, median rank and mAP of a query-by-gallery similarity matrix.

    Args:
        similarity: (Q, G), higher is closer (cosine similarities, logits, ...). Must be finite.
        relevance: None means query i's only match is gallery item i (needs Q <= G; the extra
            gallery items are distractors). Otherwise a (Q, G) bool (or 0/1) matrix.
        ks: cut-offs for R@k. A k larger than G is clipped to G but keeps its key ("R@100").

    Returns:
        ``{"R@k": ... for each k, "MedR": ..., "mAP": ..., "n_queries": ..., "n_excluded": ...}``.

        * Ranking: each row sorted by descending similarity, ties broken by the lower gallery
          index first, identical for every metric.
        * R@k: fraction of queries with at least one relevant item among the top k.
        * MedR: ``np.median`` of the 1-based rank of each query's first relevant item (the mean of
          the two middle ranks for an even number of queries, so it can be x.5).
        * mAP: mean over queries of the average precision (precision at the rank of each relevant
          item, averaged over that query's relevant items), from the same tie-broken ranking.
          It differs from ``sklearn.metrics.average_precision_score`` when scores tie, since
          sklearn pools tied items into one threshold.

        Rule for queries with no relevant gallery item: they are excluded from every metric
        (they have no rank and no AP) and counted in ``"n_excluded"``; ``"n_queries"`` is the
        number of queries the metrics average over. If every query is excluded, ValueError.

    Example:
        >>> retrieval_metrics(torch.eye(3), ks=(1,))["R@1"]
        1.0
    """
    sim = _as_float(similarity, "similarity", (2,), "a (Q, G) similarity matrix")
    n_query, n_gallery = sim.shape
    cutoffs = _as_cutoffs(ks, "ks")
    if relevance is None:
        if n_query > n_gallery:
            raise ValueError(f"relevance=None pairs query i with gallery item i, which needs Q <= G; got similarity "
                             f"of shape {_shape(sim)}. Pass a (Q, G) bool relevance matrix instead.")
        rel = np.zeros((n_query, n_gallery), dtype=bool)
        rel[np.arange(n_query), np.arange(n_query)] = True
    else:
        rel = _as_binary(relevance, "relevance", (2,), f"a (Q, G) = {_shape(sim)} bool matrix")
        if rel.shape != sim.shape:
            raise ValueError(f"relevance: expected the shape of similarity {_shape(sim)}, got {_shape(rel)}")

    first_ranks, average_precisions = [], []
    ranks_1based = np.arange(1, n_gallery + 1, dtype=np.float64)
    for start in range(0, n_query, _ROW_CHUNK):
        ranked = _ranked_relevance(sim[start:start + _ROW_CHUNK], rel[start:start + _ROW_CHUNK])
        n_relevant = ranked.sum(axis=1)
        ranked = ranked[n_relevant > 0]
        n_relevant = n_relevant[n_relevant > 0]
        first_ranks.append(ranked.argmax(axis=1) + 1)
        precision = np.cumsum(ranked, axis=1) / ranks_1based
        average_precisions.append((precision * ranked).sum(axis=1) / n_relevant)
    first_rank = np.concatenate(first_ranks)
    ap = np.concatenate(average_precisions)
    if first_rank.size == 0:
        raise ValueError(f"relevance: none of the {n_query} queries has a relevant gallery item, so no retrieval "
                         "metric is defined; check that relevance is not transposed or all False")

    result: Dict[str, Union[float, int]] = {}
    for k in cutoffs:
        result[f"R@{k}"] = float(np.mean(first_rank <= min(k, n_gallery)))
    result["MedR"] = float(np.median(first_rank))
    result["mAP"] = float(np.mean(ap))
    result["n_queries"] = int(first_rank.size)
    result["n_excluded"] = int(n_query - first_rank.size)
    return result


#: How a gallery item counts for a query in :func:`precision_at_r` (multi-hot findings; int labels are
#: relevant when equal, whatever the mode):
#: "shared": 1 when the two share a positive finding (or both are normal), else 0;
#: "identical": 1 when their finding sets are identical (two normals included), else 0;
#: "jaccard": the Jaccard index of the two finding sets, |a & b| / |a | b| (1 for two normals): graded.
RELEVANCE_MODES = ("shared", "identical", "jaccard")


def _label_relevance(query: np.ndarray, gallery: np.ndarray, mode: str = "shared") -> np.ndarray:
    """(q, G) relevance in [0, 1] (see :data:`RELEVANCE_MODES`)."""
    if query.ndim == 1:
        return (query[:, None] == gallery[None, :]).astype(np.float64)
    q, g = query.astype(np.float64), gallery.astype(np.float64)
    both = q @ g.T
    both_normal = (~query.any(axis=1))[:, None] & (~gallery.any(axis=1))[None, :]
    if mode == "shared":
        return ((both > 0) | both_normal).astype(np.float64)
    either = q.sum(1)[:, None] + g.sum(1)[None, :] - both
    if mode == "identical":
        return ((both == either) | both_normal).astype(np.float64)
    return np.where(both_normal, 1.0, both / np.maximum(either, 1.0))


def precision_at_r(similarity: ArrayLike, query_labels: ArrayLike, gallery_labels: ArrayLike,
                   rs: Union[int, Sequence[int]] = (1, 10, 20, 50), *,
                   class_names: Optional[Sequence[Any]] = None, relevance: str = "shared") -> Dict[str, Any]:
    """MedTrim's precision@R: the (mean) relevance of the top R items of each query's ranking.

    Args:
        similarity: (Q, G), higher is closer; finite. Query i and gallery i are usually a
            cross-modal pair; nothing is excluded.
        query_labels, gallery_labels: either int class labels, shapes (Q,) and (G,), relevant when
            equal; or multi-hot findings, shapes (Q, F) and (G, F), bool or 0/1, relevant when they
            share at least one positive finding, and two all-negative ("normal") rows are relevant
            to each other.
        rs: cut-offs. An R larger than G is clipped to G (the denominator is the clipped R) but
            keeps its key name.
        class_names: optional names. Int labels: indexed by the label value (labels must lie in
            ``[0, len(class_names))``). Multi-hot: one name per column (F of them). The key
            ``"normal"`` is reserved for all-negative multi-hot queries.
        relevance: for multi-hot labels, one of :data:`RELEVANCE_MODES`: "shared" (share a finding, the
            relevance above), "identical" (identical finding sets) or "jaccard" (graded: an item
            counts by the Jaccard index of the two finding sets, so P@R is the mean Jaccard index of
            the top R). Int labels: relevant when equal, whatever the mode.

    Returns:
        ``{"P@R": mean over all queries, ..., "n_queries": Q, "relevance": mode,
        "chance": mean relevance of the gallery to a query, averaged over the queries (the expected
        P@R of a random ranking, for every R), "per_class": {class: {"P@R": ..., "n_queries": ...}},
        "macro": {"P@R": ...}}``.

        ``per_class`` groups the queries that have the class: int labels, the queries with that
        label; multi-hot, the queries positive for that finding, plus ``"normal"`` for the
        all-negative queries when there are any. A class is keyed by its name when
        ``class_names`` is given, else by its index (an int: the label value or the column).
        Classes with no query are skipped (not reported as 0). ``macro`` is the unweighted mean
        of the per-class values. Ranking and ties as in :func:`retrieval_metrics`.
    """
    sim = _as_float(similarity, "similarity", (2,), "a (Q, G) similarity matrix")
    n_query, n_gallery = sim.shape
    cutoffs = _as_cutoffs(rs, "rs")
    look_up_option(relevance, RELEVANCE_MODES, name="relevance")
    q_raw, g_raw = _to_numpy(query_labels, "query_labels"), _to_numpy(gallery_labels, "gallery_labels")
    if q_raw.ndim != g_raw.ndim or q_raw.ndim not in (1, 2):
        raise ValueError(f"query_labels and gallery_labels: expected both 1-D int labels ((Q,), (G,)) or both 2-D "
                         f"multi-hot ((Q, F), (G, F)), got shapes {_shape(q_raw)} and {_shape(g_raw)}")
    multi_hot = q_raw.ndim == 2
    if multi_hot:
        q_lab = _as_binary(q_raw, "query_labels", (2,), "(Q, F) multi-hot labels")
        g_lab = _as_binary(g_raw, "gallery_labels", (2,), "(G, F) multi-hot labels")
        if q_lab.shape[1] != g_lab.shape[1]:
            raise ValueError(f"query_labels {_shape(q_lab)} and gallery_labels {_shape(g_lab)}: "
                             "the number of findings F must match")
    else:
        q_lab = _as_int_labels(q_raw, "query_labels", "(Q,) int labels")
        g_lab = _as_int_labels(g_raw, "gallery_labels", "(G,) int labels")
    if q_lab.shape[0] != n_query:
        raise ValueError(f"query_labels: expected {n_query} rows (the Q of similarity {_shape(sim)}), "
                         f"got shape {_shape(q_lab)}")
    if g_lab.shape[0] != n_gallery:
        raise ValueError(f"gallery_labels: expected {n_gallery} rows (the G of similarity {_shape(sim)}), "
                         f"got shape {_shape(g_lab)}")

    # Per query: the summed relevance of the top R (clipped) for each R, and of the whole gallery.
    clipped = [min(r, n_gallery) for r in cutoffs]
    hits = np.empty((n_query, len(cutoffs)), dtype=np.float64)
    chance = np.empty(n_query, dtype=np.float64)
    for start in range(0, n_query, _ROW_CHUNK):
        stop = start + _ROW_CHUNK
        rel = _label_relevance(q_lab[start:stop], g_lab, relevance)
        cum = np.cumsum(_ranked_relevance(sim[start:stop], rel), axis=1)
        hits[start:stop] = cum[:, [c - 1 for c in clipped]]
        chance[start:stop] = rel.mean(axis=1)
    precision = hits / np.asarray(clipped, dtype=np.float64)

    # Query groups for the per-class breakdown.
    groups: Dict[Any, np.ndarray] = {}
    if multi_hot:
        n_findings = q_lab.shape[1]
        names = _class_names(class_names, n_findings, "columns of query_labels")
        if names is not None and "normal" in names:
            raise ValueError("class_names: 'normal' is reserved for the all-negative multi-hot queries; "
                             "rename that column (e.g. 'no finding')")
        for j in range(n_findings):
            if q_lab[:, j].any():
                groups[names[j] if names is not None else j] = q_lab[:, j]
        normal = ~q_lab.any(axis=1)
        if normal.any():
            groups["normal"] = normal
    else:
        present = np.unique(q_lab)
        names = None
        if class_names is not None:
            names = list(class_names)
            outside = present[(present < 0) | (present >= len(names))]
            if outside.size:
                raise ValueError(f"query_labels: labels {outside[:5].tolist()} have no entry in class_names "
                                 f"(length {len(names)}); class_names is indexed by the label value")
            _class_names(names, len(names), "class_names")
        for label in present.tolist():
            groups[names[label] if names is not None else int(label)] = q_lab == label

    def by_cutoff(values: np.ndarray) -> Dict[str, float]:
        return {f"P@{r}": float(v) for r, v in zip(cutoffs, values)}

    per_class = {}
    for key, members in groups.items():
        per_class[key] = {**by_cutoff(precision[members].mean(axis=0)), "n_queries": int(members.sum())}
    macro_values = np.mean([[per_class[key][f"P@{r}"] for r in cutoffs] for key in per_class], axis=0)
    return {**by_cutoff(precision.mean(axis=0)), "n_queries": int(n_query),
            "relevance": relevance if multi_hot else "equal labels", "chance": float(chance.mean()),
            "per_class": per_class, "macro": by_cutoff(macro_values)}


def _class_names(class_names: Optional[Sequence[Any]], n_classes: int, what: str) -> Optional[List[Any]]:
    """Validated class names (one per class, unique, hashable), or None."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)):
        raise TypeError(f"class_names: expected a sequence of names, got the string {class_names!r}")
    names = list(class_names)
    if len(names) != n_classes:
        raise ValueError(f"class_names: expected {n_classes} names (one per {what}), got {len(names)}")
    try:
        unique = len(set(names)) == len(names)
    except TypeError:
        raise TypeError("class_names: names must be hashable (strings or ints)") from None
    if not unique:
        raise ValueError(f"class_names: names must be unique, got {names}")
    return names


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------

def _prompt_embeddings(prompts: ArrayLike, name: str, dim: int) -> np.ndarray:
    """(F, T, D) or (F, D) prompt embeddings -> (F, D): per finding, normalise, average, normalise."""
    arr = _as_float(prompts, name, (2, 3), "(F, T, D) template embeddings or (F, D) prompt embeddings")
    if arr.shape[-1] != dim:
        raise ValueError(f"{name}: embedding size {arr.shape[-1]} (shape {_shape(arr)}) differs from the "
                         f"volume embeddings' D = {dim}")
    if arr.ndim == 3:
        arr = _normalize_rows(arr).mean(axis=1)
    return _normalize_rows(arr)


def _prompt_pair(positive_prompts: ArrayLike, negative_prompts: ArrayLike, dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Both sides' (F, D) template ensembles, with the same F."""
    positive = _prompt_embeddings(positive_prompts, "positive_prompts", dim)
    negative = _prompt_embeddings(negative_prompts, "negative_prompts", dim)
    if positive.shape[0] != negative.shape[0]:
        raise ValueError(f"positive_prompts and negative_prompts: the number of findings F must match, got "
                         f"{positive.shape[0]} and {negative.shape[0]}")
    return positive, negative


def zero_shot_scores(volume_embeddings: ArrayLike, positive_prompts: ArrayLike,
                     negative_prompts: ArrayLike) -> np.ndarray:
    """Per finding, ``sigmoid(cos(v, p+) - cos(v, p-))`` (RadFinder's prompt-pair zero-shot score).

    Args:
        volume_embeddings: (N, D), already through the projection head.
        positive_prompts, negative_prompts: (F, T, D) embeddings of T templates per finding, or
            (F, D) one prompt per finding. Per finding, the template embeddings are L2-normalised,
            averaged and normalised again (the CLIP prompt ensemble). The two sides may use
            different T but share F and D.

    Returns:
        (N, F) numpy float64 scores in (0, 1); 0.5 when the volume is equally close to both.
        A zero vector normalises to zero (the eps floor of ``torch.nn.functional.normalize``).
    """
    volumes = _as_float(volume_embeddings, "volume_embeddings", (2,), "(N, D) volume embeddings")
    positive, negative = _prompt_pair(positive_prompts, negative_prompts, volumes.shape[1])
    volumes = _normalize_rows(volumes)
    margin = volumes @ positive.T - volumes @ negative.T
    return 1.0 / (1.0 + np.exp(-margin))


def prompt_separation(positive_prompts: ArrayLike, negative_prompts: ArrayLike,
                      class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """How far apart the text side puts the findings' zero-shot directions.

    Each finding's score in :func:`zero_shot_scores` is ``v . d_f`` with ``d_f = p+_f - p-_f`` (the two
    template ensembles, each normalised). Two findings whose ``d_f`` are parallel get the same ranking of the
    volumes, whatever the image side encodes: their zero-shot AUCs cannot both be high unless their labels
    agree. ``|d_f|`` (0 to 2) bounds the margin a volume can reach on finding f.

    Returns ``{"mean_offdiagonal_cosine", "per_class": {name: {"closest", "cosine", "direction_norm"}}}``: the
    mean cosine between two findings' directions and, per finding, the other finding nearest to it.
    """
    positive, negative = _prompt_pair(positive_prompts, negative_prompts, np.shape(positive_prompts)[-1])
    n = positive.shape[0]
    if n < 2:
        raise ValueError(f"prompt_separation needs at least two findings, got {n}")
    names = _class_names(class_names, n, "findings") or list(range(n))
    directions = positive - negative
    norms = np.linalg.norm(directions, axis=1)
    unit = _normalize_rows(directions)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    closest = cosine.argmax(axis=1)
    off = cosine[~np.eye(n, dtype=bool)]
    return {"mean_offdiagonal_cosine": float(off.mean()),
            "per_class": {names[i]: {"closest": names[int(closest[i])], "cosine": float(cosine[i, closest[i]]),
                                     "direction_norm": float(norms[i])} for i in range(n)}}


def zero_shot_auc(scores: ArrayLike, labels: ArrayLike,
                  class_names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Per-class ROC AUC and threshold metrics of multi-label scores, with unknown labels masked out.

    Args:
        scores: (N, F) finite, higher = more likely positive.
        labels: (N, F) with 1 = positive, 0 = negative, -1 = unknown (that entry is ignored for
            that class only).
        class_names: F unique names; default ``"0", "1", ...``. ``"macro"`` is reserved.

    Returns:
        ``{name: {"auc", "f1", "balanced_accuracy", "sensitivity", "specificity", "threshold",
        "n_pos", "n_neg"}, ..., "macro": {"auc", "f1", "balanced_accuracy", "sensitivity",
        "specificity", "n_classes"}}``.

        * auc: ``sklearn.metrics.roc_auc_score`` over the known entries.
        * threshold: the Youden-J optimum, max(sensitivity + specificity - 1), over the thresholds
          of ``sklearn.metrics.roc_curve`` (every distinct score; the +inf "predict nothing"
          threshold is not a candidate, so the threshold is always a finite score value). Ties in
          J go to the highest threshold. A score >= threshold predicts positive; f1,
          balanced accuracy, sensitivity and specificity are measured at it.
        * Rule for a class whose known entries hold only one label value (or none): every metric
          but n_pos / n_neg is None (not NaN, so the result stays valid JSON), and the class is
          left out of the macro averages. ``macro["n_classes"]`` counts the classes averaged;
          with none, the macro values are None.
    """
    score = _as_float(scores, "scores", (2,), "(N, F) scores")
    label_arr = _to_numpy(labels, "labels")
    if label_arr.dtype.kind not in "biuf":
        raise TypeError(f"labels: expected numeric values in {{1, 0, -1}}, got dtype {label_arr.dtype}")
    _check_ndim(label_arr, "labels", (2,), "(N, F) labels in {1, 0, -1}")
    if label_arr.shape != score.shape:
        raise ValueError(f"labels: expected the shape of scores {_shape(score)}, got {_shape(label_arr)}")
    bad = ~np.isin(label_arr, (-1, 0, 1))
    if bad.any():
        raise ValueError(f"labels: values must be 1 (positive), 0 (negative) or -1 (unknown), found "
                         f"{np.unique(label_arr[bad])[:5].tolist()}")
    label_arr = label_arr.astype(np.int64)
    n_classes = score.shape[1]
    names = _class_names(class_names, n_classes, "column of scores")
    names = [str(j) for j in range(n_classes)] if names is None else names
    if "macro" in names:
        raise ValueError("class_names: 'macro' is reserved for the averages; rename that class")

    metric_keys = ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity")
    result: Dict[Any, Dict[str, Any]] = {}
    for j, name in enumerate(names):
        known = label_arr[:, j] >= 0
        y, s = label_arr[known, j], score[known, j]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: Dict[str, Any] = {key: None for key in metric_keys}
        entry.update(threshold=None, n_pos=n_pos, n_neg=n_neg)
        if n_pos > 0 and n_neg > 0:
            entry.update(_threshold_metrics(y, s, n_pos, n_neg))
            entry["auc"] = float(roc_auc_score(y, s))
        result[name] = entry

    defined = [entry for entry in result.values() if entry["auc"] is not None]
    macro: Dict[str, Any] = {key: (float(np.mean([e[key] for e in defined])) if defined else None)
                             for key in metric_keys}
    macro["n_classes"] = len(defined)
    result["macro"] = macro
    return result


def _threshold_metrics(y: np.ndarray, s: np.ndarray, n_pos: int, n_neg: int) -> Dict[str, float]:
    """Youden-J threshold of one class and the confusion-matrix metrics at it."""
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    # J compared in exact integers (tp * n_neg - fp * n_pos), so mathematically equal J values tie
    # exactly and the tie rule (highest threshold: roc_curve lists them descending) holds.
    true_pos, false_pos = np.rint(tpr * n_pos), np.rint(fpr * n_neg)
    best = int(np.argmax(true_pos * n_neg - false_pos * n_pos))
    threshold = float(thresholds[best])
    predicted = s >= threshold
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn, tn = n_pos - tp, n_neg - fp
    sensitivity, specificity = tp / n_pos, tn / n_neg
    return {"f1": 2 * tp / (2 * tp + fp + fn), "balanced_accuracy": (sensitivity + specificity) / 2,
            "sensitivity": sensitivity, "specificity": specificity, "threshold": threshold}


def probe_auc(features: ArrayLike, labels: ArrayLike, class_names: Optional[Sequence[str]] = None, *,
              folds: int = 4, seed: int = 0, C: float = 1.0) -> Dict[str, Dict[str, Any]]:
    """The supervised ceiling of zero-shot classification: per class, the cross-validated ROC AUC of a
    logistic regression on the same (frozen) features.

    Args:
        features: (N, W) per-sample features (e.g. the pooled volume features).
        labels: (N, F) in {1, 0, -1}; -1 entries are left out for that class.
        class_names: F names (default "0", "1", ...).
        folds: stratified folds (fewer when a class has fewer members; a class needs at least two
            positives and two negatives, else its values are None).
        seed: the folds' shuffle. C: inverse L2 strength. Features are standardised with the training
            folds' statistics.

    Returns ``{name: {"auc", "n_pos", "n_neg"}, ..., "macro": {"auc", "n_classes"}}``: the AUC of the
    out-of-fold scores (each sample scored by the model that did not see it).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    x = _as_float(features, "features", (2,), "(N, W) features")
    y_all = _to_numpy(labels, "labels")
    _check_ndim(y_all, "labels", (2,), "(N, F) labels in {1, 0, -1}")
    if y_all.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} rows (the N of features), got shape {_shape(y_all)}")
    y_all = y_all.astype(np.int64)
    names = _class_names(class_names, y_all.shape[1], "column of labels")
    names = [str(j) for j in range(y_all.shape[1])] if names is None else names
    if isinstance(folds, bool) or not isinstance(folds, numbers.Integral) or folds < 2:
        raise ValueError(f"folds: expected an int >= 2, got {folds!r}")
    result: Dict[str, Dict[str, Any]] = {}
    for j, name in enumerate(names):
        known = y_all[:, j] >= 0
        y, xs = y_all[known, j], x[known]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: Dict[str, Any] = {"auc": None, "n_pos": n_pos, "n_neg": n_neg}
        k = min(int(folds), n_pos, n_neg)
        if k >= 2:
            scores = np.empty(y.shape[0], dtype=np.float64)
            for train, test in StratifiedKFold(k, shuffle=True, random_state=int(seed)).split(xs, y):
                scaler = StandardScaler().fit(xs[train])
                model = LogisticRegression(C=float(C), max_iter=1000).fit(scaler.transform(xs[train]), y[train])
                scores[test] = model.decision_function(scaler.transform(xs[test]))
            entry["auc"] = float(roc_auc_score(y, scores))
        result[name] = entry
    defined = [e["auc"] for e in result.values() if e["auc"] is not None]
    result["macro"] = {"auc": float(np.mean(defined)) if defined else None, "n_classes": len(defined)}
    return result


# --------------------------------------------------------------------------------------------
# Depth localization
# --------------------------------------------------------------------------------------------

def predict_depth(snippet_features: ArrayLike, depth_features: ArrayLike,
                  mask: Optional[ArrayLike] = None) -> np.ndarray:
    """The depth bin whose feature is most cosine-similar to each report snippet.

    Args:
        snippet_features: (N, D).
        depth_features: (N, n_z, D), one feature per depth bin of the snippet's own volume.
        mask: (N, n_z) bool, True = valid bin; all valid when None. Every row needs a valid bin.

    Returns:
        (N,) numpy int64: the argmax of the cosine over the valid bins; ties go to the lowest bin.
    """
    snippets = _as_float(snippet_features, "snippet_features", (2,), "(N, D) snippet features")
    depth = _as_float(depth_features, "depth_features", (3,), "(N, n_z, D) depth-bin features")
    n, n_bins, dim = depth.shape
    if snippets.shape != (n, dim):
        raise ValueError(f"snippet_features: expected shape (N={n}, D={dim}) to match depth_features "
                         f"{_shape(depth)}, got {_shape(snippets)}")
    if mask is None:
        valid = np.ones((n, n_bins), dtype=bool)
    else:
        valid = _as_binary(mask, "mask", (2,), f"(N, n_z) = ({n}, {n_bins}) bool")
        if valid.shape != (n, n_bins):
            raise ValueError(f"mask: expected shape (N, n_z) = ({n}, {n_bins}), got {_shape(valid)}")
        empty = np.flatnonzero(~valid.any(axis=1))
        if empty.size:
            raise ValueError(f"mask: rows {empty[:5].tolist()} have no valid depth bin, so no prediction exists; "
                             "drop those rows before predicting")
    cosine = np.einsum("nd,nzd->nz", _normalize_rows(snippets), _normalize_rows(depth))
    return np.where(valid, cosine, -np.inf).argmax(axis=1).astype(np.int64)


def localization_metrics(predicted: ArrayLike, target: ArrayLike, bin_mm: float) -> Dict[str, Union[float, int]]:
    """Depth-localization error in millimetres.

    Args:
        predicted: (N,) int predicted bins (>= 0), e.g. from :func:`predict_depth`.
        target: (N,) int true bins; -1 = no target (the row is excluded, as in the training loss).
        bin_mm: the thickness of one depth bin in mm (> 0).

    Returns:
        ``{"mae_mm": mean |pred - target| * bin_mm, "median_mm": median of the same,
        "within_one_bin": fraction with |pred - target| <= 1, "n": rows scored,
        "n_excluded": rows with target -1}``. ValueError when every target is -1.
    """
    pred = _as_int_labels(predicted, "predicted", "(N,) int depth bins")
    true = _as_int_labels(target, "target", "(N,) int depth bins, -1 for none")
    if pred.shape != true.shape:
        raise ValueError(f"predicted and target: expected the same shape (N,), got {_shape(pred)} and {_shape(true)}")
    if isinstance(bin_mm, bool) or not isinstance(bin_mm, numbers.Real) or not np.isfinite(bin_mm) or bin_mm <= 0:
        raise ValueError(f"bin_mm: expected a finite bin thickness > 0 in millimetres, got {bin_mm!r}")
    if (true < -1).any():
        raise ValueError(f"target: bins must be >= 0, or -1 for none; found {np.unique(true[true < -1])[:5].tolist()}")
    if (pred < 0).any():
        raise ValueError(f"predicted: bins must be >= 0, found {np.unique(pred[pred < 0])[:5].tolist()}")
    scored = true >= 0
    if not scored.any():
        raise ValueError(f"target: all {true.size} targets are -1 (none), so no localization error is defined")
    diff = np.abs(pred[scored] - true[scored])
    return {"mae_mm": float(diff.mean() * bin_mm), "median_mm": float(np.median(diff) * bin_mm),
            "within_one_bin": float(np.mean(diff <= 1)), "n": int(scored.sum()),
            "n_excluded": int((~scored).sum())}


# --------------------------------------------------------------------------------------------
# Quality control
# --------------------------------------------------------------------------------------------

def cosine_distance(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Row-wise ``1 - cos(a_i, b_i)`` of two (N, D) arrays, as numpy float64 (N,), in [0, 2].

    A zero row normalises to zero (torch's eps floor), giving distance 1.
    """
    left = _as_float(a, "a", (2,), "(N, D) embeddings")
    right = _as_float(b, "b", (2,), "(N, D) embeddings")
    if left.shape != right.shape:
        raise ValueError(f"a and b: expected the same shape (N, D), got {_shape(left)} and {_shape(right)}")
    return 1.0 - np.einsum("nd,nd->n", _normalize_rows(left), _normalize_rows(right))


def qc_auc(clean_scores: ArrayLike, corrupted_scores: ArrayLike) -> float:
    """ROC AUC of an anomaly score separating corrupted from clean inputs (corrupted = positive).

    Higher score = more suspect; 1.0 means every corrupted input scores above every clean one,
    0.5 is chance. Both inputs are 1-D, non-empty and finite (``sklearn.metrics.roc_auc_score``).
    """
    clean = _as_float(clean_scores, "clean_scores", (1,), "(N_clean,) anomaly scores")
    corrupted = _as_float(corrupted_scores, "corrupted_scores", (1,), "(N_corrupted,) anomaly scores")
    y = np.concatenate([np.zeros(clean.size), np.ones(corrupted.size)])
    return float(roc_auc_score(y, np.concatenate([clean, corrupted])))
