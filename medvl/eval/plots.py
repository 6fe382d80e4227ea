"""The evaluation figures, drawn with matplotlib's Agg backend (no display needed) as PNGs.

* :func:`plot_zeroshot_roc`: one ROC curve per finding (zero-shot scores), AUC in the legend.
* :func:`plot_embedding_map`: the volume embeddings on their first two principal components, coloured by
  category (MR sequence / contrast category) or finding (CT).
* :func:`plot_qc_histograms`: the QC score (volume-sentence cosine distance) of clean and corrupted series,
  one panel per corruption kind at the highest rate.
* :func:`plot_localization`: the mean localization error (mm) per true depth bin, model vs baselines.

Each task's figure takes the task's result dict (its ``"data"``) and a path, and returns the path written
(the file names are the tasks' :class:`~medvl.eval.tasks.task.Plot` records).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["plot_embedding_map", "plot_localization", "plot_qc_histograms", "plot_zeroshot_roc"]

PathLike = Union[str, os.PathLike]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike) -> str:
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    _pyplot().close(fig)
    return os.fspath(path)


def plot_zeroshot_roc(result: Mapping[str, Any], path: PathLike) -> Optional[str]:
    """ROC curve per finding of a ``zeroshot`` result; None when no finding has both label values."""
    from sklearn.metrics import roc_curve

    data = result["data"]
    scores, labels = np.asarray(data["scores"], dtype=np.float64), np.asarray(data["labels"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    drawn = 0
    for j, name in enumerate(data["class_names"]):
        known = labels[:, j] >= 0
        y = labels[known, j]
        if y.size == 0 or (y == 1).all() or (y == 0).all():  # no curve without both classes
            continue
        fpr, tpr, _ = roc_curve(y, scores[known, j])
        auc = result["per_class"][name]["auc"]
        ax.plot(fpr, tpr, lw=1.3, label=f"{name} ({auc:.2f})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    macro = result["macro"].get("auc")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"zero-shot ROC (macro AUC {macro:.3f})" if macro is not None else "zero-shot ROC")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_embedding_map(embeddings: np.ndarray, colours: Sequence[str], path: PathLike,
                       colour_name: str = "category") -> str:
    """The (N, D) embeddings on their first two principal components (centred SVD), one colour per value."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    coords = x @ vt[:2].T if vt.shape[0] >= 2 else np.hstack([x @ vt[:1].T, np.zeros((len(x), 1))])
    variance = singular ** 2 / max(float((singular ** 2).sum()), 1e-30)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    values = list(dict.fromkeys(str(c) for c in colours))
    cmap = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
    labels = np.asarray([str(c) for c in colours], dtype=object)
    for k, value in enumerate(values):
        at = labels == value
        ax.scatter(coords[at, 0], coords[at, 1], s=18, color=cmap(k % cmap.N), label=f"{value} ({int(at.sum())})")
    pcs = [f"PC{i + 1} ({100 * v:.0f}%)" for i, v in enumerate(variance[:2])] + ["PC2"]
    ax.set(xlabel=pcs[0], ylabel=pcs[1], title=f"volume embeddings, coloured by {colour_name}")
    if len(values) <= 20:
        ax.legend(fontsize=7, loc="best", markerscale=0.8)
    return _save(fig, path)


def plot_qc_histograms(result: Mapping[str, Any], path: PathLike) -> Optional[str]:
    """Clean vs corrupted score histograms of a ``qc`` result, one panel per kind at its highest rate."""
    data = result["data"]
    if not data:
        return None
    best: Dict[str, str] = {}
    for case in data:
        kind, rate = case.rsplit("@", 1)
        if kind not in best or float(rate) > float(best[kind].rsplit("@", 1)[1]):
            best[kind] = case
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(best), figsize=(4.2 * len(best), 3.6), squeeze=False)
    for ax, (kind, case) in zip(axes[0], best.items()):
        clean, corrupted = np.asarray(data[case]["clean"]), np.asarray(data[case]["corrupted"])
        both = np.concatenate([clean, corrupted])
        bins = np.linspace(both.min(), both.max() + 1e-9, 16)
        ax.hist(clean, bins=bins, alpha=0.6, label=f"clean ({clean.size})", color="tab:blue")
        ax.hist(corrupted, bins=bins, alpha=0.6, label=f"corrupted ({corrupted.size})", color="tab:red")
        auc = result["by_case"][case]["auc"]
        ax.set(title=f"{case}  AUC {auc:.2f}" if auc is not None else case, xlabel="cosine distance",
               ylabel="series")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_localization(result: Mapping[str, Any], path: PathLike) -> Optional[str]:
    """Mean error (mm) per true depth bin of a ``localization`` result, model and baselines."""
    by_depth = result["data"]["by_depth"]
    if not by_depth:
        return None
    bins = sorted(by_depth, key=int)
    names = [k for k in by_depth[bins[0]] if k != "n"]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / len(names)
    x = np.arange(len(bins))
    for k, name in enumerate(names):
        ax.bar(x + (k - (len(names) - 1) / 2) * width, [by_depth[b][name] for b in bins], width, label=name)
    ax.set_xticks(x, [f"{b}\n(n={by_depth[b]['n']})" for b in bins])
    ax.set(xlabel=f"true depth bin ({result['bin_mm']:g} mm each)", ylabel="mean absolute error (mm)",
           title="localization error by depth")
    ax.legend(fontsize=8)
    return _save(fig, path)
