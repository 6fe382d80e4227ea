"""``localization`` (CT with report snippets, i.e. the phantoms): each snippet picks the depth bin of its own
volume (``predict_depth`` on the depth features through the prompt head, else through ``visual.proj``); true
bin ``depth_index // patch_z``; error in mm (bin = patch_z x the slice thickness read from the volume's
affine). Baselines in the same run: the middle bin, a random bin (seeded), and the mean true bin of the same
finding over the *other* samples of the evaluation set (leave-one-out: a prior from the same distribution as
the training phantoms, without generating or encoding a second set, and never using the sample's own
position)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from medvl.eval.eval_set import EvalSet
from medvl.eval.markdown import table
from medvl.eval.metrics import localization_metrics, predict_depth
from medvl.eval.plots import plot_localization
from medvl.eval.tasks.task import NotEnoughData, Plot, Task, as_numpy
from medvl.nn.localization_loss import center_depth

__all__ = ["TASK", "localization_task"]


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
    encoder, data = TASK.prepare(encoder, data)
    patch_z = encoder.patch_size[2]
    rows = [(i, s) for i, m in enumerate(data.metas) for s in (m.get("snippets") or [])]
    depth = encoder.project(data.volumes(encoder).depth, normalize=False)  # (N, n_z, D)
    if encoder.model_standardizes:
        depth = center_depth(depth)  # as in training
    n_z = int(depth.shape[1])
    if n_z < 2:
        raise NotEnoughData(f"task 'localization': the volumes have {n_z} depth bin (Z {data.size[2]} / patch_z "
                            f"{patch_z}); there is nothing to localize")
    sample = np.asarray([i for i, _ in rows], dtype=np.int64)
    finding = [s["finding"] for _, s in rows]
    target = np.asarray([min(int(s["depth_index"]) // patch_z, n_z - 1) for _, s in rows], dtype=np.int64)
    snippets = encoder.encode_texts([s["text"] for _, s in rows], kind="snippet")
    predicted = predict_depth(as_numpy(snippets), as_numpy(depth[torch.as_tensor(sample)]))
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


def _missing(data: EvalSet) -> Optional[str]:
    if not any(m.get("snippets") for m in data.metas):
        return "no report snippets with depth indices"
    return None


def _report(r: Mapping[str, Any]) -> str:
    keys = ("mae_mm", "median_mm", "within_one_bin", "n")
    rows = [["model"] + [r["model"][k] for k in keys]]
    rows += [[name] + [m[k] for k in keys] for name, m in r["baselines"].items()]
    note = (f"{r['n_snippets']} snippets, {r['n_bins']} depth bins of {r['bin_mm']:g} mm (patch_z "
            f"{r['patch_z']}); depth features through the {r['depth_features']}. Baselines: {r['baseline_note']}.")
    return note + "\n\n" + table(("predictor",) + keys, rows)


TASK = Task(
    name="localization",
    help="depth of report snippets (mm), beside three baselines",
    kinds=("ct",),
    needs="CT report snippets with their depth (synthetic-ct)",
    run=localization_task,
    missing=_missing,
    seeded=True,
    report=_report,
    plot=Plot("localization", "localization_by_depth.png", plot_localization),
)
