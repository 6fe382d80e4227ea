import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from medvl.eval import draw_shots, few_shot, linear_probe, stratified_halves


def _blobs(n_per_class, n_classes=3, dim=4, seed=0, shift=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = np.eye(n_classes, dim) * 3.0
    x = np.concatenate([centres[c] + spread * rng.standard_normal((n_per_class, dim)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return x + shift, y


# --------------------------------------------------------------------------------------------
# linear_probe
# --------------------------------------------------------------------------------------------

def test_linear_probe_separable_data_is_perfect():
    train_x, train_y = _blobs(10, spread=0.1)
    test_x, test_y = _blobs(5, spread=0.1, seed=1)
    result = linear_probe(torch.from_numpy(train_x).float(), torch.from_numpy(train_y), test_x, test_y)
    assert result == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "n_train": 30, "n_test": 15}


def test_linear_probe_matches_sklearn_pipeline_with_train_only_scaling():
    # Test data shifted and rescaled: a scaler fit on the test set (or on both) predicts differently.
    train_x, train_y = _blobs(12, spread=1.5)
    test_x, test_y = _blobs(9, spread=1.5, seed=1, shift=1.0)
    test_x = test_x * np.array([1.0, 3.0, 0.5, 2.0])
    scaler = StandardScaler().fit(train_x)
    predicted = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(
        scaler.transform(train_x), train_y).predict(scaler.transform(test_x))
    result = linear_probe(train_x, train_y, test_x, test_y, C=0.5)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == test_y))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(test_y, predicted))
    assert result["macro_f1"] == pytest.approx(f1_score(test_y, predicted, average="macro"))
    assert 0.0 < result["accuracy"] < 1.0  # the case is not trivially separable
    test_scaler = StandardScaler().fit(test_x)
    predicted_if_leaked = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(
        test_scaler.transform(train_x), train_y).predict(test_scaler.transform(test_x))
    assert not np.array_equal(predicted, predicted_if_leaked)
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"train_y": np.array([0.0, 1.0, 0.0, 1.0])}, TypeError, "train_y: expected integer class labels"),
    ({"train_y": np.array([1, 1, 1, 1])}, ValueError, r"train_y: .* at least two classes, got only \[1\]"),
    ({"train_y": np.array([0, 1, 0])}, ValueError, r"train_y: expected 4 labels .*\(4, 2\)"),
    ({"test_x": np.ones((2, 3))}, ValueError, r"test_x: expected embedding size D = 2"),
    ({"test_y": np.array([0, 1, 1])}, ValueError, "test_y: expected 2 labels"),
    ({"train_x": np.ones(4)}, ValueError, r"train_x: expected \(N, D\)"),
    ({"C": 0.0}, ValueError, "C: expected a regularisation strength > 0"),
    ({"train_x": np.array([[np.inf, 0.0], [0, 1], [1, 0], [1, 1]])}, ValueError, "train_x: 1 NaN/inf"),
])
def test_linear_probe_errors(kwargs, error, match):
    args = {"train_x": np.array([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.1]]), "train_y": np.array([0, 1, 0, 1]),
            "test_x": np.array([[0.0, 1.0], [1.0, 0.0]]), "test_y": np.array([0, 1])}
    args.update(kwargs)
    C = args.pop("C", 1.0)
    with pytest.raises(error, match=match):
        linear_probe(args["train_x"], args["train_y"], args["test_x"], args["test_y"], C=C)


# --------------------------------------------------------------------------------------------
# draw_shots
# --------------------------------------------------------------------------------------------

def test_draw_shots_k_per_class_without_replacement_and_nested():
    labels = np.array([0, 1, 2, 0, 1, 0, 1, 0, 2, 1, 0])  # class sizes 5, 4, 2
    shots = draw_shots(labels, 3, seed=7)
    assert np.bincount(labels[shots]).tolist() == [3, 3, 2]  # class 2 has only two: all of them
    assert len(set(shots.tolist())) == shots.size
    assert np.array_equal(shots, draw_shots(torch.from_numpy(labels), 3, seed=7))  # deterministic
    assert not np.array_equal(shots, draw_shots(labels, 3, seed=8))
    smaller = draw_shots(labels, 2, seed=7)
    assert set(smaller.tolist()) <= set(shots.tolist())  # same permutations for every k


def test_draw_shots_errors():
    with pytest.raises(ValueError, match="k: expected one int >= 1"):
        draw_shots(np.array([0, 1]), 0, seed=0)
    with pytest.raises(ValueError, match="seed: expected an int >= 0"):
        draw_shots(np.array([0, 1]), 1, seed=-1)


# --------------------------------------------------------------------------------------------
# few_shot
# --------------------------------------------------------------------------------------------

def test_few_shot_any_fit_sees_the_same_shots():
    train_x, train_y = _blobs(6, spread=2.0)
    test_x, test_y = _blobs(4, spread=2.0, seed=1)
    seen = {"a": [], "b": []}

    def recording_fit(tag):
        def fit(x, y, x_test, y_test, seed):
            seen[tag].append((np.asarray(x).copy(), np.asarray(y).copy(), seed))
            return 0.25 if tag == "a" else 0.75
        return fit

    ks, seeds = (1, 3, 10), (0, 4)
    result_a = few_shot(train_x, train_y, test_x, test_y, ks=ks, seeds=seeds, fit=recording_fit("a"))
    few_shot(train_x, train_y, test_x, test_y, ks=ks, seeds=seeds, fit=recording_fit("b"))
    assert len(seen["a"]) == len(ks) * len(seeds)
    for (xa, ya, sa), (xb, yb, sb), (k, seed) in zip(seen["a"], seen["b"], [(k, s) for k in ks for s in seeds]):
        indices = draw_shots(train_y, k, seed)
        assert sa == sb == seed
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa, train_x[indices]) and np.array_equal(ya, train_y[indices])
    assert result_a["1"] == {"mean": 0.25, "std": 0.0, "values": [0.25, 0.25], "k_effective": 1}
    assert result_a["10"]["k_effective"] == 6  # every class has 6 examples


def test_few_shot_default_fit_is_the_linear_probe_on_the_drawn_shots():
    train_x, train_y = _blobs(8, spread=2.5)
    test_x, test_y = _blobs(6, spread=2.5, seed=1)
    ks, seeds = (1, 3), (0, 1, 2)
    result = few_shot(train_x, train_y, test_x, test_y, ks=ks, seeds=seeds)
    assert list(result) == ["1", "3"]
    for k in ks:
        expected = [linear_probe(train_x[idx], train_y[idx], test_x, test_y, seed=s)["accuracy"]
                    for s in seeds for idx in [draw_shots(train_y, k, s)]]
        entry = result[str(k)]
        assert entry["values"] == pytest.approx(expected)
        assert entry["mean"] == pytest.approx(np.mean(expected))
        assert entry["std"] == pytest.approx(np.std(expected))  # ddof = 0
        assert entry["k_effective"] == k
    json.dumps(result, allow_nan=False)


def test_few_shot_passes_torch_inputs_through_as_tensors():
    train_x = torch.arange(12, dtype=torch.float32).reshape(6, 1, 2)  # (N, C, ...) like volumes
    train_y = torch.tensor([0, 1, 0, 1, 0, 1])
    kinds = []

    def fit(x, y, x_test, y_test, seed):
        kinds.append((type(x), type(y), tuple(x.shape)))
        return torch.tensor(0.5)  # a 0-d tensor is accepted

    result = few_shot(train_x, train_y, train_x, train_y, ks=(2,), seeds=(0,), fit=fit)
    assert kinds == [(torch.Tensor, torch.Tensor, (4, 1, 2))]
    assert result["2"]["values"] == [0.5]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"fit": lambda *a: "high"}, TypeError, "fit: expected a finite float accuracy for k=1, seed=0"),
    ({"fit": lambda *a: float("nan")}, TypeError, "fit: expected a finite float accuracy"),
    ({"fit": 3}, TypeError, "fit: expected a callable"),
    ({"ks": (0,)}, ValueError, "ks: every cut-off must be an int >= 1"),
    ({"seeds": ()}, ValueError, "seeds: expected at least one seed"),
    ({"seeds": (-1,)}, ValueError, "seeds: expected an int >= 0"),
])
def test_few_shot_errors(kwargs, error, match):
    x, y = np.array([[0.0], [1.0], [0.1], [0.9]]), np.array([0, 1, 0, 1])
    kwargs = {"ks": (1,), "seeds": (0,), **kwargs}
    with pytest.raises(error, match=match):
        few_shot(x, y, x, y, **kwargs)


def test_few_shot_rejects_mismatched_train_sizes():
    with pytest.raises(ValueError, match=r"train_x: expected shape \(N, \.\.\.\) with N = 3"):
        few_shot(np.ones((4, 2)), np.array([0, 1, 0]), np.ones((2, 2)), np.array([0, 1]))


# --------------------------------------------------------------------------------------------
# stratified_halves
# --------------------------------------------------------------------------------------------

def test_stratified_halves_split_each_class_in_two():
    y = np.array([0] * 5 + [1] * 4 + [2])
    train, test = stratified_halves(y, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10)) and not set(train) & set(test)
    assert [int((y[test] == c).sum()) for c in range(3)] == [2, 2, 0]  # the odd one and a class of one: training
    assert (np.diff(train) > 0).all() and train.dtype == np.int64
    again = stratified_halves(y, seed=3)
    assert all((a == b).all() for a, b in zip(again, (train, test)))

