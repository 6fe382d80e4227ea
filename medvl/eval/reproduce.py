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
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["reproduce", "main", "SEEDS", "SETTINGS"]

SEEDS = ("mrclip", "medtrim", "radfinder")

# Shared training settings of every model of a run (tiny model, 2 CPU cores, < 10 minutes a seed).
SETTINGS: Dict[str, Any] = {"model": "vit3d-tiny", "size": (64, 64, 32), "n_train": 256, "batch_size": 16,
                            "lr": 2e-3, "seed": 0}
STEPS = {"mrclip": 300, "medtrim": 150, "radfinder": 200}
EVAL_N = {"mrclip": 160, "medtrim": 128, "radfinder": 128}


def _train(name: str, out: Path, recipe: str, run: Dict[str, Any], *, log, loss_weights=None,
           loss_options=None) -> Path:
    from medvl.train.trainer import TrainConfig, train

    steps = run["steps"]
    log(f"[{name}] training recipe {recipe!r} for {steps} steps ({out})")
    start = time.perf_counter()
    result = train(TrainConfig(recipe=recipe, model=run["model"], steps=steps, batch_size=run["batch_size"],
                               lr=run["lr"], seed=run["seed"], n_train=run["n_train"],
                               size=run["size"], out=str(out), loss_weights=loss_weights,
                               loss_options=loss_options, log_every=max(1, steps // 4), log_fn=log,
                               overwrite=True))  # each reproduction trains afresh in its own folder
    log(f"[{name}] loss {result['first_loss']:.3f} -> {result['loss']:.3f} in {time.perf_counter() - start:.0f} s")
    return Path(result["checkpoint"])


def _evaluate(checkpoint: Path, out: Path, tasks: Sequence[str], n: int, log) -> Dict[str, Any]:
    from medvl.eval.tasks import evaluate

    summary = evaluate(checkpoint, tasks=list(tasks), out=out, n=n, log=None)
    log(f"  evaluated {', '.join(tasks)} on {n} held-out phantoms -> {out}")
    return summary["results"]


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


def _mrclip(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    from medvl.eval.probe import few_shot
    from medvl.eval.tasks import DEFAULT_EVAL_SEED, EvalSet, FEWSHOT_KS, FEWSHOT_SEEDS, _class_target, \
        _stratified_halves
    from medvl.train.data import build_dataset

    checkpoint = _train("mrclip", out / "mrclip", "mrclip", run, log=log)
    results = _evaluate(checkpoint, out / "mrclip" / "eval", ("qc", "probe", "fewshot"), run["eval_n"], log)
    qc = results["qc"]["by_case"]
    # the CNN sees the volumes of the very split and shots the few-shot probe saw
    dataset, _ = build_dataset("synthetic-mr", "mr", n=run["eval_n"], seed=DEFAULT_EVAL_SEED, size=run["size"])
    data = EvalSet.from_dataset(dataset, "mr", source="synthetic-mr", size=run["size"])
    y, _, _ = _class_target(data)
    train, test = _stratified_halves(y, 0)
    volumes = torch.stack([dataset[i].volume for i in range(len(dataset))])
    ks = [int(k) for k in results["fewshot"]["by_k"]]
    log(f"[mrclip] supervised 3D CNN on the same shots (k = {ks}, {len(FEWSHOT_SEEDS)} draws each)")
    cnn = few_shot(volumes[train], y[train], volumes[test], y[test], ks=ks, seeds=FEWSHOT_SEEDS,
                   fit=lambda *a: cnn_fit(*a, epochs=run["cnn_epochs"]))
    return {
        "qc_auc": {"missing_tag": qc["missing_tag@0.5"]["auc"], "numeric_error": qc["numeric_error@0.5"]["auc"]},
        "probe_accuracy": results["probe"]["accuracy"],
        "probe_majority_accuracy": results["probe"]["majority_accuracy"],
        "fewshot": {"clip_linear_probe": results["fewshot"]["by_k"], "supervised_cnn": cnn},
        "checkpoint": str(checkpoint), "eval": str(out / "mrclip" / "eval"),
    }


# ----------------------------------------------------------------------------------------------------------
# MedTrim


def _medtrim(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    variants = {
        "entities": ("medtrim", None, None),
        "batch_hard": ("medtrim", None, {"mining": "batch_hard"}),
        "siglip": ("siglip", {"prompts": 0.0, "localization": 0.0}, None),
    }
    precision: Dict[str, Any] = {}
    for name, (recipe, weights, options) in variants.items():
        checkpoint = _train(f"medtrim/{name}", out / "medtrim" / name, recipe, run, log=log,
                            loss_weights=weights, loss_options=options)
        results = _evaluate(checkpoint, out / "medtrim" / name / "eval", ("precision",), run["eval_n"], log)
        precision[name] = {k: v for k, v in results["precision"].items() if k.startswith("P@")}
        precision[name]["macro"] = results["precision"].get("macro")
    return {"precision_at_r": precision}


# ----------------------------------------------------------------------------------------------------------
# RadFinder


def _radfinder(out: Path, run: Dict[str, Any], log) -> Dict[str, Any]:
    runs = {}
    for name, weight in (("with_localization", 1.0), ("without_localization", 0.0)):
        checkpoint = _train(f"radfinder/{name}", out / "radfinder" / name, "siglip", run, log=log,
                            loss_weights={"localization": weight})
        runs[name] = _evaluate(checkpoint, out / "radfinder" / name / "eval",
                               ("localization", "retrieval", "zeroshot"), run["eval_n"], log)
    with_term = runs["with_localization"]["localization"]
    baselines = with_term["baselines"]

    def summary(r):
        return {"localization_mae_mm": r["localization"]["model"]["mae_mm"],
                "within_one_bin": r["localization"]["model"]["within_one_bin"],
                "zeroshot_macro_auc": r["zeroshot"]["macro"]["auc"],
                "retrieval_volume_to_text_R@1": r["retrieval"]["volume_to_text"]["R@1"],
                "retrieval_volume_to_text_class_R@1": r["retrieval"].get("volume_to_text_class", {}).get("R@1")}

    names = {"centre_mae_mm": "middle", "random_mae_mm": "random", "mean_depth_mae_mm": "finding_mean"}
    base = {}
    for key, label in names.items():
        match = [v for k, v in baselines.items() if label in k]
        base[key] = match[0]["mae_mm"] if match else None
    return {"localization_mae_mm": with_term["model"]["mae_mm"], **base,
            "with_localization": summary(runs["with_localization"]),
            "without_localization": summary(runs["without_localization"]),
            "baseline_names": sorted(baselines)}


# ----------------------------------------------------------------------------------------------------------


def reproduce(seed: str, out="runs/reproduce", log: Optional[Callable[[str], None]] = print,
              **overrides: Any) -> Dict[str, Any]:
    """Train and evaluate ``seed`` ("mrclip", "medtrim" or "radfinder"); writes ``out/results.json``.

    ``overrides`` replace :data:`SETTINGS` and the seed's ``steps`` / ``eval_n`` / ``cnn_epochs``
    (the tests run a seed in seconds this way; the recorded figures use the defaults)."""
    if seed not in SEEDS:
        raise ValueError(f"unknown seed {seed!r}; choose one of {', '.join(SEEDS)}")
    run = {**SETTINGS, "steps": STEPS[seed], "eval_n": EVAL_N[seed], "cnn_epochs": 40}
    unknown = sorted(set(overrides) - set(run))
    if unknown:
        raise TypeError(f"reproduce: unknown setting(s) {unknown}; valid: {sorted(run)}")
    run.update(overrides)
    log = log or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"mrclip": _mrclip, "medtrim": _medtrim, "radfinder": _radfinder}[seed](out, run, log)
    results = {"seed": seed, "settings": {**run, "eval_seed": 100_000}, **results,
               "wall_s": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"[{seed}] done in {results['wall_s']:.0f} s: {out / 'results.json'}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="medvl reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("seed", choices=SEEDS)
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce-<seed>)")
    args = parser.parse_args(argv)
    results = reproduce(args.seed, args.out or f"runs/reproduce-{args.seed}", log=lambda m: print(m, flush=True))
    shown = {k: v for k, v in results.items() if k not in ("settings",)}
    print(json.dumps(shown, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
