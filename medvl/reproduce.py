"""``medvl reproduce mrclip|medtrim|radfinder``: train each seed's tiny model on the phantoms, evaluate it,
and make the comparison the seed's paper makes, in one run (``OUT/results.json``, ``OUT/report.md``).

* ``mrclip`` (MR-CLIP): metadata QC ROC AUC for missing tags and numeric errors at 50 % corruption,
  linear-probe accuracy of the sequence type, and the few-shot curve of the frozen embeddings against
  a small supervised 3D CNN trained from scratch on exactly the same shots.
* ``medtrim`` (MedTrim): Precision@R of the same model trained with entity-score mining, with
  batch-hard mining (positives = identical disease sets) and with plain SigLIP.
* ``radfinder`` (RadFinder): localization MAE with and without the localization term, against the
  middle-bin, random-bin and mean-depth baselines; retrieval and zero-shot AUC with and without it.

Every model of a run shares the seed, data, steps, batch and learning rate; only the compared
ingredient changes. The held-out phantoms are generated from seed 100000 (training uses 0..n-1).
The figures are whatever the run gives: nothing here is tuned until a paper's answer appears.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from medvl.eval.evaluation import DEFAULT_EVAL_SEED
from medvl.options import look_up_option

__all__ = ["reproduce", "main", "floors", "format_summary", "SEEDS", "SETTINGS"]

SEEDS = ("mrclip", "medtrim", "radfinder")

# Shared training settings of every model of a run (tiny model, 2 CPU cores, < 5 minutes a seed). n_train None:
# a new phantom for every sample trained on (256 phantoms were memorised: train R@5 1.0, held-out 0.13). lr 5e-4:
# on new phantoms, 2e-3 left the siglip recipe's contrastive loss at the collapsed level (3.75 after 400 steps)
# where 5e-4 reached 3.47 in 300 steps and 3.17 in 600 (2-core EPYC, 2026-12-04).
# jobs: how many of a seed's jobs (its trainings; MR-CLIP's supervised CNN baseline) run at once, each in its own
# process with an equal share of torch's threads (None: all of them, on a machine with at least two threads; 1: one
# after the other in this process). The phantom generator is single-threaded Python and numpy, about 40 % of a step,
# and leaves the second core idle while it runs: 80 steps of RadFinder's model took 36 s in one process with 2
# threads, and two such trainings side by side with one thread each 45 s for both (1.6x the throughput); two gloo
# ranks (DDP) of one training took 36 s (2-core EPYC, 2026-12-06). The numbers a training gives depend on its thread
# count only in rounding.
SETTINGS: Dict[str, Any] = {"model": "vit3d-tiny", "size": (64, 64, 32), "n_train": None, "batch_size": 16,
                            "lr": 5e-4, "seed": 0, "vision": {}, "jobs": None}
# What a seed changes of SETTINGS. radfinder: 8 x 8 x 8 patches (256 tokens, not 64), a convolutional stem of width 8
# before them (VolumeEncoder's stem) and lr 1e-3. Its findings are local: a 14-36 mm nodule fills under 2 % of a
# 16 x 16 x 8 patch of the 64 x 64 x 32 input, and a patch embedding, linear in the voxels, cannot tell a small blob
# from an edge. Measured on held-out phantoms, 2-core EPYC, training seed 0 (2026-12-05, one after the other):
#   16x16x8 patches, 500 steps:           R@5 0.16, R@10 0.25, zero-shot macro AUC 0.62
#   8x8x8, 500 steps:                     R@5 0.32-0.34, R@10 0.48, zero-shot 0.64, 329 s the whole seed
#   8x8x8 + stem (8,), 500 steps:         R@5 0.61, R@10 0.81, zero-shot 0.71, 418 s (over the 5 minutes a seed)
#   8x8x8 + stem (8,), 400 steps:         R@5 0.32, R@10 0.56, zero-shot 0.68, probe 0.75 (was 0.69), 295 s
# lr 2e-3 with 8x8x8 patches fell back to R@5 0.13. With its two trainings side by side (SETTINGS' jobs), 500 steps
# fit: 252 s (2026-12-06). Tried there and not kept (zero-shot, seeds 0 / 1 / 2 against 0.68 / 0.64 / 0.65 for
# the settings above at 400 steps): the prompt term weighted 3 (0.71 / 0.63 / 0.71); max pooling (0.64, seed 0);
# four CT windows into the stem (0.67 / 0.66; emphysema 0.88 but lymph nodes and calcification still at chance); a
# second stem layer (8, 16) (0.67 / 0.65); a stem of three (16, 32, 64), 500 steps, mean or max pooling (0.71 / 0.71
# against 0.71 for width 8 at 500 steps, seed 0; 30 % slower); at 500 steps, seeds 0 / 1: mean plus max pooling
# (0.70 / 0.66 against 0.71 / 0.64, before the CT phantom change of 51eca80), a CLS token (0.74 / 0.62 against
# 0.70 / 0.63, after it). The text side's changes (the report prompt term and the prompt terms' own scale, 2026-12-06)
# are the recipe's: medvl.train.recipes.
# mrclip: the same stem before its 16 x 16 x 8 patches. The contrast that TR, TE and TI set is a local intensity
# relation between tissues; at 500 steps the stem took QC AUC for missing image-determined tags from 0.91 to 0.96 and
# for numeric errors from 0.72 to 0.87 (TR 0.56 -> 0.81), few-shot k = 1 from 0.62 to 0.81, in 303 s against 268 s
# without it (2-core EPYC, 2026-12-05, a slow day for that machine). 550 steps: its supervised CNN baseline (about a
# third of the seed's time) runs beside the training (SETTINGS' jobs), 237 s (2026-12-06).
SEED_SETTINGS: Dict[str, Dict[str, Any]] = {
    "radfinder": {"vision": {"patch_size": (8, 8, 8), "stem": (8,)}, "lr": 1e-3},
    "mrclip": {"vision": {"stem": (8,)}}}
STEPS = {"mrclip": 550, "medtrim": 300, "radfinder": 500}
# Held-out phantoms each seed is evaluated on. The probes fit on folds of them and QC's AUC counts a few dozen
# corruptions per group, so a small set measures the set: one RadFinder checkpoint's linear probe read 0.75 on 128
# phantoms and 0.84 on 512 (lymph nodes 0.45 -> 0.78, calcification 0.54 -> 0.71), one MR-CLIP checkpoint's QC AUC
# 0.954 / 0.876 on 160 and 0.920 / 0.808 on 480 (2026-12-06). Evaluation is a few seconds per hundred phantoms.
EVAL_N = {"mrclip": 480, "medtrim": 512, "radfinder": 512}


def _train(name: str, out: Path, recipe: str, run: Dict[str, Any], *, log, loss_weights=None,
           loss_options=None) -> Path:
    from medvl.train.trainer import TrainConfig, train

    steps = run["steps"]
    log(f"[{name}] training recipe {recipe!r} for {steps} steps ({out})")
    start = time.perf_counter()
    result = train(TrainConfig(recipe=recipe, model=run["model"], steps=steps, batch_size=run["batch_size"],
                               lr=run["lr"], seed=run["seed"], n_train=run["n_train"],
                               size=run["size"], vision=dict(run["vision"]), out=str(out),
                               loss_weights=loss_weights, loss_options=loss_options,
                               log_every=max(1, steps // 4), log_fn=log,
                               overwrite=True))  # each reproduction trains afresh in its own folder
    log(f"[{name}] loss {result['first_loss']:.3f} -> {result['loss']:.3f} in {time.perf_counter() - start:.0f} s")
    return Path(result["checkpoint"])


def _evaluate(checkpoint: Path, out: Path, tasks: Sequence[str], n: int, log) -> Dict[str, Any]:
    from medvl.eval.evaluation import evaluate

    summary = evaluate(checkpoint, tasks=list(tasks), out=out, n=n, log=None)
    log(f"  evaluated {', '.join(tasks)} on {n} held-out phantoms -> {out}")
    return summary["results"]


@dataclass(frozen=True)
class _Training:
    """One model of a comparison: trained in ``folder``, then evaluated on ``tasks`` in ``folder / "eval"``."""
    name: str
    folder: Path
    recipe: str
    tasks: Tuple[str, ...]
    loss_weights: Optional[Dict[str, float]] = None
    loss_options: Optional[Dict[str, Any]] = None


def _train_and_evaluate(job: _Training, run: Dict[str, Any], *, log) -> Tuple[Path, Dict[str, Any]]:
    checkpoint = _train(job.name, job.folder, job.recipe, run, log=log, loss_weights=job.loss_weights,
                        loss_options=job.loss_options)
    return checkpoint, _evaluate(checkpoint, job.folder / "eval", job.tasks, run["eval_n"], log)


def _check_jobs(jobs: Optional[int]) -> None:
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be a positive integer or None (as many as the machine's threads allow), "
                         f"got {jobs!r}")


def _jobs_at_once(n_jobs: int, jobs: Optional[int]) -> int:
    wanted = n_jobs if jobs is None else jobs
    if jobs is None and torch.get_num_threads() < 2:
        wanted = 1
    return max(1, min(n_jobs, wanted))


def _side_by_side(calls: Sequence[Tuple[str, Callable[..., Any], tuple]], jobs: Optional[int],
                  log) -> Tuple[List[Any], int]:
    """(``fn(*args, log=...)`` of every ``(name, fn, args)`` in ``calls``, in order; how many ran at once):
    ``jobs`` at a time (SETTINGS). ``fn`` is a function of this module and ``args`` pickle: side by side, each
    call runs in a fresh Python process (``python -c``, not multiprocessing, which would import the caller's main
    script again in every worker) with an equal share of torch's threads; its log lines come back through its
    stdout, prefixed with its name, its result through a pickle."""
    at_once = _jobs_at_once(len(calls), jobs)
    if at_once == 1:
        return [fn(*args, log=log) for _, fn, args in calls], at_once
    threads = max(1, torch.get_num_threads() // at_once)
    log(f"running {', '.join(name for name, _, _ in calls)}: {at_once} at a time, {threads} thread(s) each")
    lock = threading.Lock()

    def locked_log(message: str) -> None:
        with lock:
            log(message)

    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda call: _call_in_process(*call, threads=threads, log=locked_log), calls)), at_once


def _call_in_process(name: str, fn: Callable[..., Any], args: tuple, *, threads: int, log) -> Any:
    with tempfile.TemporaryDirectory(prefix="medvl-reproduce-") as folder:
        spec, result, errors = (Path(folder) / f for f in ("call.pkl", "result.pkl", "stderr.txt"))
        spec.write_bytes(pickle.dumps((name, fn, args, threads, str(result))))
        command = [sys.executable, "-c", f"import medvl.reproduce as r; r._call_main({str(spec)!r})"]
        # the child imports this very medvl, wherever the caller found it
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
        with open(errors, "w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1, env=env)
            for line in process.stdout:
                log(line.rstrip("\n"))
            code = process.wait()
        written = errors.read_text()
        sys.stderr.write(written)  # its warnings, or its traceback, as the caller's own would appear
        if code != 0 or not result.is_file():
            tail = "\n".join(written.splitlines()[-25:])
            raise RuntimeError(f"{name}: its process exited with code {code}; the end of its stderr:\n{tail}")
        return pickle.loads(result.read_bytes())


def _call_main(spec: str) -> None:
    """The body of one side-by-side process (see :func:`_side_by_side`)."""
    name, fn, args, threads, result = pickle.loads(Path(spec).read_bytes())
    torch.set_num_threads(threads)
    tag = f"[{name}]"
    done = fn(*args, log=lambda m: print(m if m.startswith(tag) else f"{tag} {m}", flush=True))
    Path(result).write_bytes(pickle.dumps(done))


# ----------------------------------------------------------------------------------------------------------
# MR-CLIP


class _SmallCNN(torch.nn.Module):
    """The supervised baseline: three strided 3D convolutions, global pooling, a linear classifier."""

    def __init__(self, n_classes: int):
        super().__init__()
        layers, width = [], 1
        for out in (8, 16, 32):
            layers += [torch.nn.Conv3d(width, out, 3, stride=2, padding=1), torch.nn.GroupNorm(4, out),
                       torch.nn.GELU()]
            width = out
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def cnn_fit(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y, seed: int, *, epochs: int = 40) -> float:
    """Accuracy of a :class:`_SmallCNN` trained from scratch on (train_x, train_y) (full batch, Adam)."""
    torch.manual_seed(int(seed))
    classes = np.unique(np.concatenate([np.asarray(train_y), np.asarray(test_y)]))
    index = {c: i for i, c in enumerate(classes.tolist())}
    y = torch.tensor([index[int(c)] for c in np.asarray(train_y)])
    model = _SmallCNN(len(classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x.float()), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(chunk.float()).argmax(1) for chunk in test_x.split(32)])
    truth = torch.tensor([index[int(c)] for c in np.asarray(test_y)])
    return float((predicted == truth).float().mean())


def _supervised_cnn(run: Dict[str, Any], *, log) -> Dict[str, Any]:
    """MR-CLIP's few-shot baseline: a :class:`_SmallCNN` from scratch on the very volumes, split and shots of the
    ``fewshot`` task (its halves split with DEFAULT_EVAL_SEED, the seed evaluate() uses; its draws FEWSHOT_SEEDS;
    its shot counts those the split allows). Needs no checkpoint, so it runs beside the training."""
    from medvl.data.sources import build_dataset, synthetic_source
    from medvl.eval.eval_set import EvalSet, class_target
    from medvl.eval.probe import few_shot, stratified_halves
    from medvl.eval.tasks.fewshot import FEWSHOT_KS, FEWSHOT_SEEDS
    from medvl.eval.tasks.task import cutoffs

    source = synthetic_source("mr")
    dataset, _ = build_dataset(source, "mr", n=run["eval_n"], seed=DEFAULT_EVAL_SEED, size=run["size"])
    data = EvalSet.from_dataset(dataset, "mr", source=source, size=run["size"])
    y, _, _ = class_target(data)
    train, test = stratified_halves(y, DEFAULT_EVAL_SEED)
    ks = cutoffs(FEWSHOT_KS, int(np.unique(y[train], return_counts=True)[1].max()))
    volumes = torch.stack([dataset[i].volume for i in range(len(dataset))])
    log(f"[mrclip] supervised 3D CNN on the same shots (k = {ks}, {len(FEWSHOT_SEEDS)} draws each)")
    by_k = few_shot(volumes[train], y[train], volumes[test], y[test], ks=ks, seeds=FEWSHOT_SEEDS,
                    fit=lambda *a: cnn_fit(*a, epochs=run["cnn_epochs"]))
    return {"ks": ks, "by_k": by_k}


def _mrclip(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    job = _Training("mrclip", out / "mrclip", "mrclip", ("qc", "probe", "fewshot", "collapse"))
    ((checkpoint, results), cnn), at_once = _side_by_side(
        [(job.name, _train_and_evaluate, (job, run)), ("mrclip/supervised_cnn", _supervised_cnn, (run,))],
        run["jobs"], log)
    ks = [int(k) for k in results["fewshot"]["by_k"]]
    if ks != cnn["ks"]:  # the two sides derive the shot counts from the same split: a mismatch is a bug
        raise RuntimeError(f"mrclip: the few-shot probe ran k = {ks}, the supervised CNN k = {cnn['ks']}")
    cnn = cnn["by_k"]
    qc = results["qc"]["by_case"]

    def split(case):
        entry = qc[case]
        return {"all": entry["auc"], "image_determined": (entry.get("image_determined") or {}).get("auc"),
                "image_independent": (entry.get("image_independent") or {}).get("auc"),
                "n_corrupted": entry["n_corrupted"], "n_text_unchanged": entry.get("n_text_unchanged"),
                "by_tag": entry.get("by_tag", {})}

    return {
        "qc_auc": {"missing_tag": split("missing_tag@0.5"), "numeric_error": split("numeric_error@0.5"),
                   "wrong_tag": split("wrong_tag@0.5")},
        "probe_accuracy": results["probe"]["accuracy"],
        "probe_majority_accuracy": results["probe"]["majority_accuracy"],
        "fewshot": {"clip_linear_probe": results["fewshot"]["by_k"], "supervised_cnn": cnn,
                    "split": results["fewshot"]["split"], "cnn_split_seed": DEFAULT_EVAL_SEED},
        "collapse": _spread(results), "diagnostics": _diagnostics(checkpoint),
        "checkpoint": str(checkpoint), "eval": str(out / "mrclip" / "eval"),
        "side_by_side": at_once,
    }


def _spread(results: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    c = results.get("collapse")
    if c is None:
        return None
    return {"image_offdiagonal_cosine": c["image_offdiagonal_cosine"]["mean"],
            "text_offdiagonal_cosine": (c.get("text_offdiagonal_cosine") or {}).get("mean"),
            "matched_cosine": c.get("matched_cosine"), "unmatched_cosine": c.get("unmatched_cosine"),
            "collapsed": c["collapsed"]}


def _diagnostics(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """The training run's collapse diagnostics (``diagnostics.json`` beside the checkpoint), condensed."""
    path = Path(checkpoint).parent / "diagnostics.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return {"loss": d.get("loss"), "train_R@5": (d.get("train") or {}).get("R@5"),
            "held_out_R@5": (d.get("held_out") or {}).get("R@5"), "gap_R@5": (d.get("gap") or {}).get("R@5"),
            "collapsed": d.get("collapsed"), "not_learned": d.get("not_learned"), "warnings": d.get("warnings", [])}


# ----------------------------------------------------------------------------------------------------------
# MedTrim


def _medtrim(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    variants = {
        "entities": ("medtrim", None, None),
        "batch_hard": ("medtrim", None, {"mining": "batch_hard"}),
        "siglip": ("siglip", {"prompts": 0.0, "report_prompts": 0.0, "localization": 0.0}, None),
    }
    precision: Dict[str, Any] = {}
    collapse: Dict[str, Any] = {}
    jobs = [_Training(f"medtrim/{name}", out / "medtrim" / name, recipe, ("precision", "collapse"), weights, options)
            for name, (recipe, weights, options) in variants.items()]
    trained, at_once = _side_by_side([(job.name, _train_and_evaluate, (job, run)) for job in jobs], run["jobs"], log)
    for name, (checkpoint, results) in zip(variants, trained):
        by_relevance = results["precision"]["by_relevance"]
        precision[name] = {mode: {k: v for k, v in values.items() if k.startswith("P@") or k == "chance"}
                           for mode, values in by_relevance.items()}
        collapse[name] = {"held_out": _spread(results), "training": _diagnostics(checkpoint)}
    return {"precision_at_r": precision, "collapse": collapse,
            "side_by_side": at_once}


# ----------------------------------------------------------------------------------------------------------
# RadFinder


def _radfinder(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    variants = {"with_localization": 1.0, "without_localization": 0.0}
    jobs = [_Training(f"radfinder/{name}", out / "radfinder" / name, "siglip",
                      ("localization", "retrieval", "zeroshot", "collapse"), {"localization": weight})
            for name, weight in variants.items()]
    checkpoints, runs = {}, {}
    trained, at_once = _side_by_side([(job.name, _train_and_evaluate, (job, run)) for job in jobs], run["jobs"], log)
    for name, (checkpoint, results) in zip(variants, trained):
        checkpoints[name], runs[name] = checkpoint, results
    with_term = runs["with_localization"]["localization"]
    baselines = with_term["baselines"]

    def summary(name):
        r = runs[name]
        retrieval = r["retrieval"]["volume_to_text"]
        n = r["retrieval"]["n"]
        zeroshot = r["zeroshot"]
        return {"localization_mae_mm": r["localization"]["model"]["mae_mm"],
                "within_one_bin": r["localization"]["model"]["within_one_bin"],
                "zeroshot_macro_auc": zeroshot["macro"]["auc"],
                "zeroshot_auc": {k: v["auc"] for k, v in zeroshot["per_class"].items()},
                "probe_macro_auc": zeroshot["probe"]["macro"]["auc"],
                "probe_auc": {k: v["auc"] for k, v in zeroshot["probe"]["per_class"].items()},
                "prompt_direction_cosine": zeroshot["prompt_separation"]["mean_offdiagonal_cosine"],
                "retrieval_volume_to_text": {k: retrieval[k] for k in ("R@1", "R@5", "R@10")},
                "retrieval_chance": {f"R@{k}": min(1.0, k / n) for k in (1, 5, 10)},
                "retrieval_volume_to_text_R@1": retrieval["R@1"],
                "retrieval_volume_to_text_class_R@1": r["retrieval"].get("volume_to_text_class", {}).get("R@1"),
                "collapse": _spread(r), "diagnostics": _diagnostics(checkpoints[name])}

    names = {"centre_mae_mm": "middle", "random_mae_mm": "random", "mean_depth_mae_mm": "finding_mean"}
    base = {key: (baselines.get(label) or {}).get("mae_mm") for key, label in names.items()}
    return {"localization_mae_mm": with_term["model"]["mae_mm"], **base,
            "with_localization": summary("with_localization"),
            "without_localization": summary("without_localization"),
            "baseline_names": sorted(baselines), "side_by_side": at_once}


# ----------------------------------------------------------------------------------------------------------
# The floors of issue 17, checked on a run's results


def _floor(text: str, value: Optional[float], threshold: Optional[float], met: Optional[bool]) -> Dict[str, Any]:
    return {"floor": text, "value": value, "threshold": threshold, "met": bool(met) if met is not None else False}


def floors(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The floors a seed's run is held to (what issue 17 asks of ``medvl reproduce``), each with its value, its
    threshold and whether it is met. Chance levels are part of the thresholds."""
    seed, out = results["seed"], []
    if seed == "radfinder":
        r = results["with_localization"]
        out.append(_floor("zero-shot macro AUC over all findings >= 0.80 (chance 0.5)", r["zeroshot_macro_auc"], 0.80,
                          (r["zeroshot_macro_auc"] or 0) >= 0.80))
        for k in ("R@5", "R@10"):
            chance = r["retrieval_chance"][k]
            value = r["retrieval_volume_to_text"][k]
            out.append(_floor(f"volume->text {k} >= 3 x chance ({chance:.3f})", value, 3 * chance, value >= 3 * chance))
        mae, middle, prior = results["localization_mae_mm"], results["centre_mae_mm"], results["mean_depth_mae_mm"]
        out.append(_floor("localization MAE <= half the middle-of-range guess", mae, None if middle is None else middle / 2,
                          middle is not None and mae <= middle / 2))
        out.append(_floor("localization MAE < the per-finding mean-depth baseline", mae, prior,
                          prior is not None and mae < prior))
        collapsed = [name for name in ("with_localization", "without_localization")
                     if (results[name]["collapse"] or {}).get("collapsed")
                     or (results[name]["diagnostics"] or {}).get("warnings")]
        out.append(_floor("no collapse (held-out embeddings, training loss)", float(len(collapsed)), 0.0, not collapsed))
    elif seed == "medtrim":
        p = results["precision_at_r"]
        for mode in ("jaccard", "identical", "shared"):
            if mode not in p["entities"]:
                continue
            entities, others = p["entities"][mode]["P@10"], [p[v][mode]["P@10"] for v in ("batch_hard", "siglip")]
            out.append(_floor(f"entity mining P@10 above batch-hard and SigLIP ({mode} relevance, chance "
                              f"{p['entities'][mode]['chance']:.3f})", entities, max(others), entities > max(others)))
    elif seed == "mrclip":
        qc = results["qc_auc"]
        missing = qc["missing_tag"]["image_determined"]
        numeric = qc["numeric_error"]["all"]
        out.append(_floor("QC AUC, missing image-determined tags >= 0.97 (chance 0.5)", missing, 0.97,
                          missing is not None and missing >= 0.97))
        out.append(_floor("QC AUC, numeric errors >= 0.90 (chance 0.5)", numeric, 0.90,
                          numeric is not None and numeric >= 0.90))
    return out


def format_summary(results: Mapping[str, Any]) -> str:
    """The human-readable summary of a seed's run (what bench/results/reproduce-*.txt records)."""
    seed, run = results["seed"], results["settings"]
    phantoms = f"{run['n_train']} training phantoms" if run["n_train"] else "a new phantom for every sample"
    at_once = results.get("side_by_side", 1)
    side_by_side = f", {at_once} jobs side by side" if at_once > 1 else ""
    lines = [f"{seed} ({run['steps']} steps of {run['batch_size']}, {phantoms}, eval n={run['eval_n']}, "
             f"{results['wall_s']:.0f} s{side_by_side}):"]
    if seed == "radfinder":
        r, w = results["with_localization"], results["without_localization"]
        lines.append(f"  zero-shot macro AUC {r['zeroshot_macro_auc']:.3f} (without the localization term "
                     f"{w['zeroshot_macro_auc']:.3f}); supervised ceiling (linear probe) {r['probe_macro_auc']:.3f}; "
                     "chance 0.5")
        lines.append("    per finding, zero-shot / probe: " + ", ".join(
            f"{k} {v:.2f}/{(r['probe_auc'].get(k) or float('nan')):.2f}" for k, v in r["zeroshot_auc"].items()
            if v is not None))
        lines.append(f"    mean cosine between two findings' prompt directions {r['prompt_direction_cosine']:.2f} "
                     "(near 1: the text side ranks the volumes alike for every finding)")
        chance = r["retrieval_chance"]
        lines.append("  volume->text retrieval: " + ", ".join(
            f"{k} {r['retrieval_volume_to_text'][k]:.3f} (chance {chance[k]:.3f})" for k in ("R@1", "R@5", "R@10")))
        lines.append(f"  localization MAE (mm): with the term {results['localization_mae_mm']:.1f}, without "
                     f"{w['localization_mae_mm']:.1f}; middle of the range {results['centre_mae_mm']:.1f}, random "
                     f"{results['random_mae_mm']:.1f}, finding's mean depth {results['mean_depth_mae_mm']:.1f}")
        for name in ("with_localization", "without_localization"):
            lines.append(f"  collapse ({name}): " + _collapse_text(results[name]["collapse"],
                                                                   results[name]["diagnostics"]))
    elif seed == "medtrim":
        p = results["precision_at_r"]
        for mode in ("jaccard", "identical", "shared"):
            first = next(iter(p.values()))[mode]
            cut = [k for k in first if k.startswith("P@")]
            lines.append(f"  Precision@R, {mode} relevance (chance {first['chance']:.3f}):")
            for name, values in p.items():
                lines.append(f"    {name:<10} " + "  ".join(f"{k} {values[mode][k]:.3f}" for k in cut))
        for name, c in results["collapse"].items():
            lines.append(f"  collapse ({name}): " + _collapse_text(c["held_out"], c["training"]))
    elif seed == "mrclip":
        qc = results["qc_auc"]
        for kind, entry in qc.items():
            tags = ", ".join(f"{t} {v['auc']:.2f} ({v['n']})" for t, v in entry["by_tag"].items()
                             if v["auc"] is not None)
            lines.append(f"  QC AUC {kind} at 50 %: all {_num(entry['all'])}, image-determined "
                         f"{_num(entry['image_determined'])}, image-independent {_num(entry['image_independent'])}; "
                         f"{entry['n_text_unchanged']} of {entry['n_corrupted']} left the sentence unchanged; by tag: "
                         f"{tags}")
        lines.append(f"  linear probe (sequence): {results['probe_accuracy']:.3f} (majority class "
                     f"{results['probe_majority_accuracy']:.3f})")
        clip, cnn = results["fewshot"]["clip_linear_probe"], results["fewshot"]["supervised_cnn"]
        for k in clip:
            lines.append(f"    k={k:>2}: CLIP embeddings + logistic regression {clip[k]['mean']:.3f} +- "
                         f"{clip[k]['std']:.3f}   3D CNN from scratch {cnn[k]['mean']:.3f} +- {cnn[k]['std']:.3f}")
        lines.append("  collapse: " + _collapse_text(results["collapse"], results["diagnostics"]))
    lines.append("  floors:")
    for f in results.get("floors", []):
        lines.append(f"    [{'met' if f['met'] else 'NOT MET'}] {f['floor']}: {_num(f['value'])}"
                     + ("" if f["threshold"] is None else f" (threshold {_num(f['threshold'])})"))
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _collapse_text(spread: Optional[Mapping[str, Any]], training: Optional[Mapping[str, Any]]) -> str:
    parts = []
    if spread:
        parts.append(f"held-out cosine between two volumes {spread['image_offdiagonal_cosine']:.3f}, own text "
                     f"{_num(spread['matched_cosine'])} vs others {_num(spread['unmatched_cosine'])}")
    if training and training.get("loss") and training["loss"].get("final") is not None:
        loss = training["loss"]
        parts.append(f"final contrastive loss {loss['final']:.3f} vs collapsed {_num(loss['collapsed_level'])}")
    if training and training.get("gap_R@5") is not None:
        parts.append(f"R@5 train {training['train_R@5']:.3f} / held-out {training['held_out_R@5']:.3f}")
    warned = bool(spread and spread.get("collapsed")) or bool(training and training.get("warnings"))
    return "; ".join(parts) + ("; WARNING" if warned else "; no warning")


# ----------------------------------------------------------------------------------------------------------


def reproduce(seed: str, /, out="runs/reproduce", log: Optional[Callable[[str], None]] = print,
              **overrides: Any) -> Dict[str, Any]:
    """Train and evaluate ``seed`` ("mrclip", "medtrim" or "radfinder"); writes ``out/results.json``.

    ``seed`` is positional only, so that ``seed=`` stays free for the training seed (a setting like the others).

    ``overrides`` replace :data:`SETTINGS` (with the seed's :data:`SEED_SETTINGS`) and its ``steps`` / ``eval_n`` / ``cnn_epochs``
    (the tests run a seed in seconds this way; the recorded figures use the defaults)."""
    look_up_option(seed, SEEDS, name="seed")
    run = {**SETTINGS, **SEED_SETTINGS.get(seed, {}), "steps": STEPS[seed], "eval_n": EVAL_N[seed], "cnn_epochs": 40}
    unknown = sorted(set(overrides) - set(run))
    if unknown:
        raise TypeError(f"reproduce: unknown setting(s) {unknown}; valid: {sorted(run)}")
    run.update(overrides)
    _check_jobs(run["jobs"])
    log = log or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"mrclip": _mrclip, "medtrim": _medtrim, "radfinder": _radfinder}[seed](out, run, log)
    results = {"seed": seed, "settings": {**run, "eval_seed": DEFAULT_EVAL_SEED}, **results,
               "wall_s": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    results["floors"] = floors(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "summary.txt").write_text(format_summary(results) + "\n")
    log(f"[{seed}] done in {results['wall_s']:.0f} s: {out / 'results.json'}, {out / 'summary.txt'}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="medvl reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("seed", choices=SEEDS)
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce-<seed>)")
    args = parser.parse_args(argv)
    results = reproduce(args.seed, args.out or f"runs/reproduce-{args.seed}", log=lambda m: print(m, flush=True))
    print(format_summary(results))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
