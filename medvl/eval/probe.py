"""Linear probing and few-shot evaluation of frozen embeddings.

* :func:`linear_probe` - logistic regression on standardised embeddings (the usual frozen-encoder
  probe), accuracy / balanced accuracy / macro F1.
* :func:`draw_shots` - the k-per-class training subset of one seed; :func:`few_shot` uses it, so
  a caller-supplied ``fit`` (e.g. a 3D CNN trained from scratch) sees exactly the same shots as the
  default probe.
* :func:`few_shot` - accuracy over k shots per class and several seeds, mean and std.
* :func:`stratified_halves` - a training and a test half of one set, stratified by class.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from medvl.eval.metrics import _as_cutoffs, _as_float, _as_int_labels, _shape, _to_numpy

__all__ = ["linear_probe", "draw_shots", "few_shot", "stratified_halves"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]
FitFunction = Callable[[Any, Any, Any, Any, int], float]


def _check_seed(seed: Any, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {seed!r}")
    return int(seed)


def linear_probe(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, *,
                 C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> Dict[str, Union[float, int]]:
    """Logistic regression on frozen embeddings, standardised with statistics of the training set only.

    Args:
        train_x: (N, D) embeddings; train_y: (N,) int class labels (at least two classes).
        test_x: (M, D) embeddings; test_y: (M,) int class labels (a class unseen in training
            simply counts as wrong).
        C: inverse L2 regularisation strength of ``sklearn.linear_model.LogisticRegression``.
        max_iter: lbfgs iterations. seed: the classifier's ``random_state``.

    Returns:
        ``{"accuracy", "balanced_accuracy" (mean recall over the classes in test_y),
        "macro_f1" (over the classes in test_y or the predictions, 0 for an undefined F1),
        "n_train", "n_test"}``.
    """
    x_train = _as_float(train_x, "train_x", (2,), "(N, D) training embeddings")
    x_test = _as_float(test_x, "test_x", (2,), "(M, D) test embeddings")
    y_train = _as_int_labels(train_y, "train_y", "(N,) int class labels")
    y_test = _as_int_labels(test_y, "test_y", "(M,) int class labels")
    if y_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"train_y: expected {x_train.shape[0]} labels (the N of train_x {_shape(x_train)}), "
                         f"got shape {_shape(y_train)}")
    if y_test.shape[0] != x_test.shape[0]:
        raise ValueError(f"test_y: expected {x_test.shape[0]} labels (the M of test_x {_shape(x_test)}), "
                         f"got shape {_shape(y_test)}")
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(f"test_x: expected embedding size D = {x_train.shape[1]} as in train_x, "
                         f"got shape {_shape(x_test)}")
    if np.unique(y_train).size < 2:
        raise ValueError(f"train_y: a classifier needs at least two classes, got only {np.unique(y_train).tolist()}")
    if isinstance(C, bool) or not isinstance(C, numbers.Real) or not C > 0:
        raise ValueError(f"C: expected a regularisation strength > 0, got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter: expected an int >= 1, got {max_iter!r}")
    seed = _check_seed(seed, "seed")

    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(C=float(C), max_iter=int(max_iter), random_state=seed)
    classifier.fit(scaler.transform(x_train), y_train)
    predicted = classifier.predict(scaler.transform(x_test))
    return {"accuracy": float(accuracy_score(y_test, predicted)),
            "balanced_accuracy": float(balanced_accuracy_score(y_test, predicted)),
            "macro_f1": float(f1_score(y_test, predicted, average="macro", zero_division=0)),
            "n_train": int(x_train.shape[0]), "n_test": int(x_test.shape[0])}


def draw_shots(train_y: ArrayLike, k: int, seed: int) -> np.ndarray:
    """Indices into the training set of k examples per class, drawn without replacement.

    Per class (in ascending label order), ``numpy.random.default_rng(seed)`` permutes that class's
    indices and the first k are kept; a class with fewer than k examples contributes all it has.
    One generator per (k, seed) call, so the draw depends only on (train_y, k, seed); and since
    the same permutations are drawn whatever k is, the shots of a smaller k are a subset of those
    of a larger k for the same seed. Returns an int64 array, grouped by class.
    """
    labels = _as_int_labels(train_y, "train_y", "(N,) int class labels")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k: expected one int >= 1 (shots per class), got {k!r}")
    k = int(k)
    rng = np.random.default_rng(_check_seed(seed, "seed"))
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.concatenate(chosen).astype(np.int64)


def stratified_halves(y: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: each class permuted with ``seed``, floor(n/2) to test, the rest to train (the odd
    member of a class goes to training; a class of one is training only). Both sorted, int64."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        k = len(members) // 2
        test.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def _take_rows(x: Any, indices: np.ndarray) -> Any:
    """Rows of x in x's own type (a torch tensor stays a tensor on its device, for a caller's model)."""
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(indices, dtype=torch.long, device=x.device)]
    return np.asarray(x)[indices]


def few_shot(train_x: ArrayLike, train_y: ArrayLike, test_x: ArrayLike, test_y: ArrayLike, *,
             ks: Union[int, Sequence[int]] = (1, 2, 5, 10, 20), seeds: Sequence[int] = (0, 1, 2, 3, 4),
             fit: Optional[FitFunction] = None) -> Dict[str, Dict[str, Any]]:
    """Test accuracy when training on k examples per class, over several seeds.

    Args:
        train_x: (N, ...) training inputs: (N, D) embeddings for the default probe, or whatever
            ``fit`` consumes (e.g. (N, C, D, H, W) volumes). Only the first axis is indexed, and a
            torch tensor is passed on as a torch tensor.
        train_y: (N,) int class labels, indexed like train_x (its type kept).
        test_x, test_y: the full test set, passed to ``fit`` as given.
        ks: shots per class. seeds: one draw per seed (see :func:`draw_shots`).
        fit: ``fit(train_x_subset, train_y_subset, test_x, test_y, seed) -> accuracy``; default the
            :func:`linear_probe` accuracy (with ``seed``). The shots of a (k, seed) pair are the same
            whichever ``fit`` is used.

    Returns:
        ``{str(k): {"mean", "std" (np.std, ddof=0), "values" (one accuracy per seed, in seeds
        order), "k_effective"}}``. ``k_effective`` is the smallest number of shots any class
        actually got (less than k when a class has fewer than k training examples).
    """
    y_train = _as_int_labels(train_y, "train_y", "(N,) int class labels")
    x_shape = tuple(train_x.shape) if isinstance(train_x, torch.Tensor) else _to_numpy(train_x, "train_x").shape
    if len(x_shape) == 0 or x_shape[0] != y_train.shape[0]:
        raise ValueError(f"train_x: expected shape (N, ...) with N = {y_train.shape[0]} as in train_y, "
                         f"got shape {x_shape}")
    _as_int_labels(test_y, "test_y", "(M,) int class labels")
    shots = _as_cutoffs(ks, "ks")
    if isinstance(seeds, numbers.Integral):
        seeds = (seeds,)
    seed_list = [_check_seed(s, "seeds") for s in seeds]
    if not seed_list:
        raise ValueError("seeds: expected at least one seed, got an empty sequence")
    if fit is not None and not callable(fit):
        raise TypeError(f"fit: expected a callable fit(train_x, train_y, test_x, test_y, seed) -> float, got {fit!r}")
    if fit is None:
        def fit(shot_x, shot_y, all_test_x, all_test_y, seed):
            return linear_probe(shot_x, shot_y, all_test_x, all_test_y, seed=seed)["accuracy"]

    class_sizes = np.unique(y_train, return_counts=True)[1]
    result: Dict[str, Dict[str, Any]] = {}
    for k in shots:
        values = []
        for seed in seed_list:
            indices = draw_shots(y_train, k, seed)
            accuracy = fit(_take_rows(train_x, indices), _take_rows(train_y, indices), test_x, test_y, seed)
            if isinstance(accuracy, torch.Tensor) and accuracy.numel() == 1:
                accuracy = accuracy.item()
            if isinstance(accuracy, bool) or not isinstance(accuracy, numbers.Real) or not np.isfinite(accuracy):
                raise TypeError(f"fit: expected a finite float accuracy for k={k}, seed={seed}, got {accuracy!r}")
            values.append(float(accuracy))
        result[str(k)] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values,
                          "k_effective": int(np.minimum(class_sizes, k).min())}
    return result
