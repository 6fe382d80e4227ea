import json
import statistics
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score

import medvl.eval.metrics as metrics_module
from medvl.eval import (cosine_distance, localization_metrics, precision_at_r, predict_depth, prompt_separation,
                        qc_auc, retrieval_metrics, zero_shot_auc, zero_shot_scores)


# --------------------------------------------------------------------------------------------
# Slow references: plain loops, the tie rule spelled out as a sort key (-similarity, index).
# --------------------------------------------------------------------------------------------

def _ranking(row):
    return sorted(range(len(row)), key=lambda j: (-float(row[j]), j))


def slow_retrieval(sim, rel, ks):
    sim, rel = np.asarray(sim, dtype=float).tolist(), np.asarray(rel, dtype=bool).tolist()
    n_gallery = len(sim[0])
    first_ranks, aps = [], []
    for row, rel_row in zip(sim, rel):
        hits = [rel_row[j] for j in _ranking(row)]
        if not any(hits):
            continue
        first_ranks.append(hits.index(True) + 1)
        found, precisions = 0, []
        for position, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / position)
        aps.append(sum(precisions) / len(precisions))
    out = {f"R@{k}": sum(r <= min(k, n_gallery) for r in first_ranks) / len(first_ranks) for k in ks}
    out.update({"MedR": statistics.median(first_ranks), "mAP": sum(aps) / len(aps),
                "n_queries": len(first_ranks), "n_excluded": len(sim) - len(first_ranks)})
    return out


def _relevant(q, g):
    if np.ndim(q) == 0:
        return q == g
    q, g = np.asarray(q, bool), np.asarray(g, bool)
    return bool((q & g).any()) or (not q.any() and not g.any())


def slow_precision_at_r(sim, q_labels, g_labels, rs):
    sim = np.asarray(sim, dtype=float)
    n_gallery = sim.shape[1]
    per_query = []
    for i, row in enumerate(sim):
        order = _ranking(row)
        values = {}
        for r in rs:
            top = order[:min(r, n_gallery)]
            values[f"P@{r}"] = sum(_relevant(q_labels[i], g_labels[j]) for j in top) / min(r, n_gallery)
        per_query.append(values)
    return per_query


def _close(actual, expected):
    assert set(actual) == set(expected), (actual, expected)
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-12), key


# --------------------------------------------------------------------------------------------
# retrieval_metrics
# --------------------------------------------------------------------------------------------

def test_retrieval_hand_case_with_ties_even_median_and_clipped_k():
    sim = np.array([[0.9, 0.9, 0.1, 0.0],   # tie g0/g1: g0 (its match) first -> rank 1
                    [0.5, 0.5, 0.5, 0.5],   # all tied: index order, g1 at rank 2
                    [0.8, 0.1, 0.2, 0.3],   # g0, g3, g2 -> rank 3
                    [0.0, 0.0, 0.0, 1.0]])  # rank 1
    result = retrieval_metrics(sim, ks=(1, 2, 10))
    assert result == {"R@1": 0.5, "R@2": 0.75, "R@10": 1.0, "MedR": 1.5,
                      "mAP": pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4), "n_queries": 4, "n_excluded": 0}


def test_retrieval_tie_goes_to_lower_gallery_index():
    # The relevant item ties with an earlier one: it ranks second, never first.
    result = retrieval_metrics([[0.7, 0.7]], relevance=[[False, True]], ks=(1,))
    assert result["R@1"] == 0.0 and result["MedR"] == 2.0 and result["mAP"] == 0.5


def test_retrieval_fewer_queries_than_gallery_items():
    sim = np.array([[0.1, 0.9, 0.0], [0.0, 0.9, 0.2]])  # query 0 matches g0 (rank 2), query 1 g1 (rank 1)
    result = retrieval_metrics(sim, ks=(1, 5))
    assert result["R@1"] == 0.5 and result["R@5"] == 1.0 and result["MedR"] == 1.5


def test_retrieval_map_matches_sklearn_without_ties():
    # sklearn's average_precision_score pools tied scores into one threshold, so it only agrees
    # with the rank-based AP when no two similarities in a row are equal (continuous random data).
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((7, 11))
    rel = rng.random((7, 11)) < 0.3
    rel[:, 0] = True  # every query has a relevant item
    expected = np.mean([average_precision_score(rel[i], sim[i]) for i in range(7)])
    assert retrieval_metrics(sim, rel)["mAP"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_slow_reference_with_ties(seed):
    rng = np.random.default_rng(seed)
    sim = rng.integers(0, 3, size=(9, 8)).astype(float)  # three levels: many ties
    rel = rng.random((9, 8)) < 0.3
    rel[0] = False  # no relevant item: excluded
    rel[1] = True   # every item relevant: AP 1, rank 1
    ks = (1, 3, 8, 20)
    result = retrieval_metrics(sim, rel, ks=ks)
    _close(result, slow_retrieval(sim, rel, ks))
    assert result["n_excluded"] >= 1


def test_retrieval_excludes_queries_without_relevant_items():
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4]])
    rel = np.array([[False, False], [False, True], [True, True]])
    result = retrieval_metrics(sim, rel, ks=(1,))
    assert result == {"R@1": 1.0, "MedR": 1.0, "mAP": 1.0, "n_queries": 2, "n_excluded": 1}


def test_retrieval_all_queries_excluded_raises():
    with pytest.raises(ValueError, match="none of the 2 queries"):
        retrieval_metrics(np.ones((2, 3)), np.zeros((2, 3), dtype=bool))


def test_retrieval_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(3)
    sim = rng.integers(0, 4, size=(7, 6)).astype(float)
    rel = rng.random((7, 6)) < 0.4
    rel[:, 2] = True
    whole = retrieval_metrics(sim, rel)
    monkeypatch.setattr(metrics_module, "_ROW_CHUNK", 2)
    assert retrieval_metrics(sim, rel) == whole


def test_retrieval_accepts_torch_and_is_json_serialisable():
    sim = torch.randn(5, 5, dtype=torch.float64)
    from_torch = retrieval_metrics(sim, ks=(1, 2))
    assert from_torch == retrieval_metrics(sim.numpy(), ks=(1, 2))
    assert retrieval_metrics(sim.bfloat16(), relevance=torch.eye(5, dtype=torch.bool))["n_queries"] == 5
    json.dumps(from_torch, allow_nan=False)
    assert all(type(v) in (float, int) for v in from_torch.values())


@pytest.mark.parametrize("similarity, relevance, ks, error, match", [
    (np.ones(3), None, (1,), ValueError, r"similarity: expected a \(Q, G\).*\(3,\)"),
    (np.ones((0, 3)), None, (1,), ValueError, "similarity: empty input"),
    (np.array([[0.1, np.nan]]), None, (1,), ValueError, "similarity: 1 NaN/inf"),
    (np.array([[0.1, np.inf]]), None, (1,), ValueError, "NaN/inf"),
    (np.ones((3, 2)), None, (1,), ValueError, "needs Q <= G"),
    (np.ones((2, 2)), np.ones((2, 3), dtype=bool), (1,), ValueError, r"relevance: expected the shape .*\(2, 3\)"),
    (np.ones((2, 2)), np.array([[0, 2], [1, 0]]), (1,), ValueError, r"relevance: .* 0/1 values, found \[2\]"),
    (np.ones((2, 2)), None, (0,), ValueError, "ks: every cut-off must be an int >= 1"),
    (np.ones((2, 2)), None, (1.5,), ValueError, "ks: every cut-off"),
    (np.ones((2, 2)), None, (), ValueError, "ks: expected at least one"),
    (np.array([["a", "b"]]), None, (1,), TypeError, "similarity: expected a numeric"),
])
def test_retrieval_errors(similarity, relevance, ks, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(similarity, relevance, ks=ks)


# --------------------------------------------------------------------------------------------
# precision_at_r
# --------------------------------------------------------------------------------------------

def test_precision_at_r_int_labels_hand_case_with_ties_and_clipped_r():
    sim = np.array([[0.9, 0.9, 0.1],    # ranking g0, g1, g2
                    [0.2, 0.2, 0.2],    # all tied: g0, g1, g2
                    [0.0, 0.5, 1.0]])   # g2, g1, g0
    q = np.array([0, 1, 0])
    g = np.array([0, 1, 0])
    result = precision_at_r(sim, q, g, rs=(1, 2, 10))
    # query 0: [T, F, T]; query 1: [F, T, F]; query 2: [T, F, T]
    assert result["P@1"] == pytest.approx(2 / 3)
    assert result["P@2"] == pytest.approx(0.5)
    assert result["P@10"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)  # R clipped to G = 3
    assert result["n_queries"] == 3
    assert result["per_class"] == {0: {"P@1": 1.0, "P@2": 0.5, "P@10": pytest.approx(2 / 3), "n_queries": 2},
                                   1: {"P@1": 0.0, "P@2": 0.5, "P@10": pytest.approx(1 / 3), "n_queries": 1}}
    assert result["macro"] == {"P@1": 0.5, "P@2": 0.5, "P@10": pytest.approx(0.5)}


def test_precision_at_r_multi_hot_normal_matches_normal():
    q = np.array([[1, 0], [0, 0], [0, 1]])
    g = np.array([[1, 1], [0, 0], [0, 1], [0, 0]])
    sim = np.array([[0.0, 1.0, 0.5, 0.2],   # g1, g2, g3, g0 -> relevant only g0 (shares finding 0)
                    [0.9, 0.1, 0.1, 0.0],   # g0, g1, g2, g3 -> normal matches g1 and g3
                    [0.3, 0.3, 0.9, 0.3]])  # g2, g0, g1, g3 -> g2 and g0 share finding 1
    result = precision_at_r(sim, q, g, rs=(1, 2, 4), class_names=["effusion", "nodule"])
    assert result["P@1"] == pytest.approx((0 + 0 + 1) / 3)
    assert result["P@2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result["P@4"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert set(result["per_class"]) == {"effusion", "nodule", "normal"}
    assert result["per_class"]["normal"] == {"P@1": 0.0, "P@2": 0.5, "P@4": 0.5, "n_queries": 1}
    assert result["per_class"]["nodule"]["P@2"] == 1.0


def test_precision_at_r_multi_hot_keys_are_column_indices_and_empty_classes_are_skipped():
    q = np.array([[1, 0, 0], [1, 0, 0]], dtype=bool)  # no query has findings 1, 2 nor is normal
    g = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    result = precision_at_r(np.eye(2), q, g, rs=(1,))
    assert list(result["per_class"]) == [0]
    assert result["macro"] == {"P@1": 0.5}


def test_precision_at_r_int_class_names_and_skipped_classes():
    sim = np.eye(3)
    result = precision_at_r(sim, [2, 0, 2], [2, 0, 1], rs=(1,), class_names=["a", "b", "c"])
    assert set(result["per_class"]) == {"a", "c"}  # "b" (label 1) has no query
    assert result["per_class"]["c"] == {"P@1": 0.5, "n_queries": 2}
    assert result["macro"]["P@1"] == pytest.approx(0.75)


@pytest.mark.parametrize("multi_hot", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_precision_at_r_matches_slow_reference_with_ties(multi_hot, seed):
    rng = np.random.default_rng(seed)
    n_query, n_gallery = 8, 10
    sim = rng.integers(0, 3, size=(n_query, n_gallery)).astype(float)
    if multi_hot:
        q, g = rng.random((n_query, 3)) < 0.3, rng.random((n_gallery, 3)) < 0.3
        q[0] = False  # at least one normal query
        groups = {j: q[:, j] for j in range(3) if q[:, j].any()}
        groups["normal"] = ~q.any(axis=1)
    else:
        q, g = rng.integers(0, 4, n_query), rng.integers(0, 4, n_gallery)
        groups = {int(c): q == c for c in np.unique(q)}
    rs = (1, 3, 5, 50)
    per_query = slow_precision_at_r(sim, q, g, rs)
    result = precision_at_r(torch.from_numpy(sim), torch.from_numpy(q), torch.from_numpy(g), rs=rs)
    keys = [f"P@{r}" for r in rs]
    for key in keys:
        assert result[key] == pytest.approx(np.mean([p[key] for p in per_query]), abs=1e-12)
    assert set(result["per_class"]) == set(groups)
    for name, members in groups.items():
        for key in keys:
            expected = np.mean([p[key] for p, m in zip(per_query, members) if m])
            assert result["per_class"][name][key] == pytest.approx(expected, abs=1e-12)
    for key in keys:
        assert result["macro"][key] == pytest.approx(np.mean([v[key] for v in result["per_class"].values()]))
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("q, g, kwargs, error, match", [
    (np.array([0.0, 1.0]), np.array([0.0, 1.0]), {}, TypeError, "query_labels: expected integer class labels"),
    (np.array([0, 1]), np.array([[0, 1], [1, 0]]), {}, ValueError, "both 1-D int labels .* or both 2-D"),
    (np.array([0, 1, 1]), np.array([0, 1]), {}, ValueError, r"query_labels: expected 2 rows .*\(3,\)"),
    (np.array([0, 1]), np.array([0, 1, 2]), {}, ValueError, "gallery_labels: expected 2 rows"),
    (np.array([[0, 2], [1, 0]]), np.eye(2), {}, ValueError, r"query_labels: expected bool or 0/1 values, found \[2\]"),
    (np.eye(2), np.ones((2, 3)), {}, ValueError, "number of findings F must match"),
    (np.array([0, 3]), np.array([0, 1]), {"class_names": ["a", "b"]}, ValueError, r"labels \[3\] have no entry"),
    (np.array([[0, 0], [1, 0]]), np.eye(2), {"class_names": ["normal", "x"]}, ValueError, "'normal' is reserved"),
    (np.eye(2), np.eye(2), {"class_names": ["a"]}, ValueError, "expected 2 names"),
    (np.eye(2), np.eye(2), {"class_names": ["a", "a"]}, ValueError, "must be unique"),
    (np.array([0, 1]), np.array([0, 1]), {"rs": (0,)}, ValueError, "rs: every cut-off"),
])
def test_precision_at_r_errors(q, g, kwargs, error, match):
    with pytest.raises(error, match=match):
        precision_at_r(np.eye(2), q, g, **kwargs)


def test_precision_at_r_rejects_nan_similarity():
    with pytest.raises(ValueError, match="similarity: 1 NaN/inf"):
        precision_at_r(np.array([[np.nan, 0.0], [0.0, 1.0]]), [0, 1], [0, 1])


# --------------------------------------------------------------------------------------------
# zero_shot_auc, zero_shot_scores
# --------------------------------------------------------------------------------------------

def brute_force_youden(y, s):
    """Highest threshold with the largest exact J over the distinct score values."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    best, best_j = None, None
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        j = Fraction(int((pred & (y == 1)).sum()), n_pos) - Fraction(int((pred & (y == 0)).sum()), n_neg)
        if best_j is None or j > best_j:
            best, best_j = t, j
    pred = s >= best
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = n_pos - tp, n_neg - fp
    return {"threshold": best, "sensitivity": tp / n_pos, "specificity": tn / n_neg,
            "balanced_accuracy": (tp / n_pos + tn / n_neg) / 2, "f1": 2 * tp / (2 * tp + fp + fn)}


@pytest.mark.parametrize("tied", [False, True])
def test_zero_shot_auc_matches_sklearn_and_brute_force(tied):
    rng = np.random.default_rng(4)
    n, n_classes = 40, 4
    scores = rng.random((n, n_classes))
    if tied:
        scores = np.round(scores * 4) / 4  # five distinct values: ties within and across labels
    labels = rng.integers(-1, 2, size=(n, n_classes))
    labels[:3] = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    result = zero_shot_auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert set(result) == {"0", "1", "2", "3", "macro"}
    for j in range(n_classes):
        known = labels[:, j] >= 0
        y, s = labels[known, j], scores[known, j]
        entry = result[str(j)]
        assert entry["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert entry["n_pos"] == int((y == 1).sum()) and entry["n_neg"] == int((y == 0).sum())
        for key, value in brute_force_youden(y, s).items():
            assert entry[key] == pytest.approx(value, abs=1e-12), (j, key)
    for key in ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity"):
        assert result["macro"][key] == pytest.approx(np.mean([result[str(j)][key] for j in range(n_classes)]))
    assert result["macro"]["n_classes"] == n_classes


def test_zero_shot_auc_perfect_separation_hand_case():
    scores = np.array([[0.1], [0.4], [0.35], [0.8]])
    labels = np.array([[0], [0], [1], [1]])
    entry = zero_shot_auc(scores, labels, class_names=["effusion"])["effusion"]
    assert entry["auc"] == 0.75  # 0.35 (pos) < 0.4 (neg): one of four pairs misordered
    assert entry["threshold"] == 0.8  # J = 0.5 at 0.8 and at 0.35; the higher threshold wins the tie
    assert entry["sensitivity"] == 0.5 and entry["specificity"] == 1.0 and entry["f1"] == pytest.approx(2 / 3)


def test_zero_shot_auc_single_label_class_is_none_and_left_out_of_macro():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.7, 0.6, 0.1]])
    labels = np.array([[1, 1, -1], [0, 1, -1], [1, -1, -1]])  # class 1: positives only; class 2: all unknown
    result = zero_shot_auc(scores, labels, class_names=["a", "b", "c"])
    assert result["b"] == {"auc": None, "f1": None, "balanced_accuracy": None, "sensitivity": None,
                           "specificity": None, "threshold": None, "n_pos": 2, "n_neg": 0}
    assert result["c"]["auc"] is None and result["c"]["n_pos"] == 0 and result["c"]["n_neg"] == 0
    assert result["a"]["auc"] == 1.0
    assert result["macro"]["auc"] == 1.0 and result["macro"]["n_classes"] == 1
    json.dumps(result, allow_nan=False)


def test_zero_shot_auc_no_defined_class_gives_none_macro():
    result = zero_shot_auc(np.array([[0.2], [0.4]]), np.array([[1], [1]]))
    assert result["macro"] == {"auc": None, "f1": None, "balanced_accuracy": None, "sensitivity": None,
                               "specificity": None, "n_classes": 0}


@pytest.mark.parametrize("scores, labels, names, error, match", [
    (np.ones((2, 2)), np.array([[0, 1], [2, 0]]), None, ValueError, r"labels: values must be 1 .* found \[2\]"),
    (np.ones((2, 2)), np.array([0, 1]), None, ValueError, r"labels: expected \(N, F\)"),
    (np.ones((2, 2)), np.zeros((3, 2)), None, ValueError, r"labels: expected the shape of scores \(2, 2\)"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), np.zeros((2, 2)), None, ValueError, "scores: 1 NaN/inf"),
    (np.ones((2, 2)), np.zeros((2, 2)), ["a"], ValueError, "class_names: expected 2 names"),
    (np.ones((2, 2)), np.zeros((2, 2)), ["macro", "a"], ValueError, "'macro' is reserved"),
    (np.ones((0, 2)), np.zeros((0, 2)), None, ValueError, "scores: empty input"),
])
def test_zero_shot_auc_errors(scores, labels, names, error, match):
    with pytest.raises(error, match=match):
        zero_shot_auc(scores, labels, class_names=names)


def test_zero_shot_scores_hand_case_and_template_averaging():
    volumes = np.array([[2.0, 0.0], [0.0, 3.0]])
    positive = np.array([[[2.0, 0.0], [0.0, 5.0]]])  # normalised then averaged: direction (1, 1)
    negative = np.array([[[0.0, 1.0]]])
    scores = zero_shot_scores(volumes, positive, negative)
    cos_pos = 1 / np.sqrt(2)
    expected = 1 / (1 + np.exp(-np.array([[cos_pos - 0.0], [cos_pos - 1.0]])))
    assert isinstance(scores, np.ndarray) and scores.shape == (2, 1)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    # (F, D) is the T = 1 case
    np.testing.assert_allclose(zero_shot_scores(volumes, positive[:, :1], negative),
                               zero_shot_scores(volumes, positive[:, 0], negative[:, 0]), atol=1e-12)


def test_zero_shot_scores_match_torch():
    g = torch.Generator().manual_seed(0)
    v, pos, neg = torch.randn(5, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    p = F.normalize(F.normalize(pos.double(), dim=-1).mean(1), dim=-1)
    n = F.normalize(F.normalize(neg.double(), dim=-1).mean(1), dim=-1)
    vn = F.normalize(v.double(), dim=-1)
    expected = torch.sigmoid(vn @ p.T - vn @ n.T).numpy()
    np.testing.assert_allclose(zero_shot_scores(v, pos, neg), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("v, pos, neg, match", [
    (np.ones((2, 3)), np.ones((1, 4)), np.ones((1, 3)), "positive_prompts: embedding size 4"),
    (np.ones((2, 3)), np.ones((2, 3)), np.ones((1, 3)), "number of findings F must match"),
    (np.ones((2, 3)), np.ones((1, 1, 1, 3)), np.ones((1, 3)), r"positive_prompts: expected \(F, T, D\)"),
    (np.ones(3), np.ones((1, 3)), np.ones((1, 3)), r"volume_embeddings: expected \(N, D\)"),
])
def test_zero_shot_scores_errors(v, pos, neg, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_scores(v, pos, neg)


def test_prompt_separation_hand_case():
    """Findings a and b get parallel directions from different prompts, c an orthogonal one: a and b rank every
    set of volumes alike, which is what the diagnostic flags."""
    e = np.eye(4)
    pos = np.stack([e[0], e[0] + e[2], e[2]])
    neg = np.stack([e[1], e[1] + e[2], e[3]])   # d_a = e0 - e1, d_b = (e0 - e1) / sqrt 2, d_c = e2 - e3
    out = prompt_separation(pos, neg, class_names=["a", "b", "c"])
    assert out["per_class"]["a"] == {"closest": "b", "cosine": pytest.approx(1.0),
                                     "direction_norm": pytest.approx(2 ** 0.5)}
    assert out["per_class"]["b"]["closest"] == "a" and out["per_class"]["b"]["direction_norm"] == pytest.approx(1.0)
    assert out["per_class"]["c"]["cosine"] == pytest.approx(0.0)
    assert out["mean_offdiagonal_cosine"] == pytest.approx(1 / 3)
    scores = zero_shot_scores(np.random.default_rng(0).normal(size=(7, 4)), pos, neg)
    assert (np.argsort(scores[:, 0]) == np.argsort(scores[:, 1])).all()  # parallel: the same ranking
    with pytest.raises(ValueError, match="at least two findings"):
        prompt_separation(pos[:1], neg[:1])
    with pytest.raises(ValueError, match="number of findings F must match"):
        prompt_separation(pos, neg[:2])


# --------------------------------------------------------------------------------------------
# predict_depth, localization_metrics
# --------------------------------------------------------------------------------------------

def test_predict_depth_mask_and_ties_to_lowest_bin():
    snippets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    depth = torch.tensor([[[0.0, 1.0], [5.0, 0.0], [1.0, 1.0]],     # best: bin 1
                          [[0.0, 1.0], [1.0, 0.0], [0.0, 7.0]],     # bins 0 and 2 tie (same direction) -> 0
                          [[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])    # bin 0 best but masked -> 1 / 2 tie -> 1
    mask = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    predicted = predict_depth(snippets, depth, mask)
    assert predicted.dtype == np.int64 and predicted.tolist() == [1, 0, 1]
    assert predict_depth(snippets, depth).tolist() == [1, 0, 0]


def test_predict_depth_errors():
    with pytest.raises(ValueError, match=r"mask: rows \[1\] have no valid depth bin"):
        predict_depth(np.ones((2, 2)), np.ones((2, 3, 2)), np.array([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match=r"snippet_features: expected shape \(N=2, D=2\)"):
        predict_depth(np.ones((2, 3)), np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match=r"mask: expected shape \(N, n_z\) = \(2, 3\)"):
        predict_depth(np.ones((2, 2)), np.ones((2, 3, 2)), np.ones((2, 2), dtype=bool))


def test_localization_metrics_hand_case_excludes_missing_targets():
    predicted = np.array([3, 5, 0, 7, 2])
    target = torch.tensor([3, 2, -1, 8, 4])  # diffs 0, 3, (excluded), 1, 2
    result = localization_metrics(predicted, target, bin_mm=2.5)
    assert result == {"mae_mm": pytest.approx(1.5 * 2.5), "median_mm": 1.5 * 2.5,  # even count: mean of 1 and 2
                      "within_one_bin": 0.5, "n": 4, "n_excluded": 1}
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("predicted, target, bin_mm, error, match", [
    (np.array([1, 2]), np.array([-1, -1]), 1.0, ValueError, "all 2 targets are -1"),
    (np.array([1, 2]), np.array([-2, 1]), 1.0, ValueError, r"target: bins must be >= 0, or -1 .* \[-2\]"),
    (np.array([-1, 2]), np.array([1, 1]), 1.0, ValueError, r"predicted: bins must be >= 0"),
    (np.array([1, 2]), np.array([1, 1]), 0.0, ValueError, "bin_mm: expected a finite bin thickness > 0"),
    (np.array([1.0, 2.0]), np.array([1, 1]), 1.0, TypeError, "predicted: expected integer class labels"),
    (np.array([1, 2, 3]), np.array([1, 1]), 1.0, ValueError, r"expected the same shape \(N,\), got \(3,\) and \(2,\)"),
    (np.array([[1, 2]]), np.array([1, 1]), 1.0, ValueError, r"predicted: expected \(N,\) int depth bins"),
])
def test_localization_metrics_errors(predicted, target, bin_mm, error, match):
    with pytest.raises(error, match=match):
        localization_metrics(predicted, target, bin_mm)


# --------------------------------------------------------------------------------------------
# cosine_distance, qc_auc
# --------------------------------------------------------------------------------------------

def test_cosine_distance_hand_case_and_torch():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[3.0, 0.0], [-1.0, 0.0], [1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_distance(a, b), [0.0, 2.0, 1.0, 1.0], atol=1e-12)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    np.testing.assert_allclose(cosine_distance(x, y), (1 - F.cosine_similarity(x, y)).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"a and b: expected the same shape \(N, D\), got \(2, 3\) and \(2, 4\)"):
        cosine_distance(np.ones((2, 3)), np.ones((2, 4)))


def test_qc_auc_matches_sklearn_and_orientation():
    rng = np.random.default_rng(5)
    clean, corrupted = rng.normal(0, 1, 30), rng.normal(1, 1, 20)
    expected = roc_auc_score(np.r_[np.zeros(30), np.ones(20)], np.r_[clean, corrupted])
    assert qc_auc(torch.from_numpy(clean), corrupted) == pytest.approx(expected, abs=1e-12)
    assert qc_auc([0.1, 0.2], [0.5, 0.9]) == 1.0  # corrupted scores higher: the positive class
    assert qc_auc([0.5, 0.9], [0.1, 0.2]) == 0.0
    assert isinstance(qc_auc([0.1], [0.2]), float)


def test_qc_auc_errors():
    with pytest.raises(ValueError, match="corrupted_scores: empty input"):
        qc_auc([0.1, 0.2], [])
    with pytest.raises(ValueError, match=r"clean_scores: expected \(N_clean,\)"):
        qc_auc(np.ones((2, 2)), [0.1])
    with pytest.raises(ValueError, match="clean_scores: 1 NaN/inf"):
        qc_auc([np.nan, 0.1], [0.2])
