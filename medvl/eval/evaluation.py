""":func:`evaluate`: run the evaluation tasks of a trained CLIP model on held-out data, and write the results.

    results = evaluate("runs/siglip", out="runs/siglip/eval")                  # CT phantoms, seed 100000
    results = evaluate((model, run_config), data="synthetic-mr", tasks=["qc"])  # a model just trained

(The module is not named ``evaluate``: medvl.eval exports the function under that name, which would hide a
module of the same name from ``import medvl.eval.evaluate as ...``.)
"""

from __future__ import annotations

import json
import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from medvl.data.phantoms import HELD_OUT_SEED
from medvl.eval.cache import CachedEncoder, EmbeddingCache
from medvl.eval.eval_set import EvalSet, class_target
from medvl.eval.loading import check_device, check_size, device_of, load_model
from medvl.eval.markdown import jsonable
from medvl.eval.report import format_report
from medvl.eval.tasks import TASKS, NotEnoughData, parse_tasks
from medvl.eval.tasks.task import as_numpy

__all__ = ["DEFAULT_EVAL_SEED", "DEFAULT_N", "evaluate"]

# The held-out phantoms (training runs use small seeds).
DEFAULT_EVAL_SEED = HELD_OUT_SEED
DEFAULT_N = 256


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
    device = check_device(device)
    requested = parse_tasks(tasks)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise ValueError(f"n: expected an int >= 1 (or None), got {n!r}")

    model, run_config, head, model_key, checkpoint = load_model(checkpoint_or_model, device, prompt_head)
    # A model handed in is given back as it came: same train/eval mode, same device.
    was_training, home = model.training, device_of(model)
    try:
        patch_size = tuple(int(p) for p in model.visual.patch_size)
        eval_set, size = _eval_set(data, run_config, n=n, seed=seed, size=size, patch_size=patch_size, split=split,
                                   log=emit)
        chosen, skipped = _choose_tasks(requested, eval_set)
        if cache_dir is None and out is not None:
            cache_dir = Path(out) / "cache"
        cache = EmbeddingCache(cache_dir, model_key)
        encoder = CachedEncoder(model, cache, device=device, batch_size=batch_size, prompt_head=head)
        emit(f"evaluating on {len(eval_set)} {eval_set.kind.upper()} samples of {eval_set.source} (seed {seed}, "
             f"size {size}): {', '.join(chosen)}")
        results, timing = _run_tasks(chosen, encoder, eval_set, seed, skipped, emit)
    finally:
        model.to(home).train(was_training)

    summary: Dict[str, Any] = {
        "training_diagnostics": _training_diagnostics(checkpoint),
        "checkpoint": None if checkpoint is None else str(checkpoint), "model_key": model_key,
        "recipe": run_config.get("recipe"), "data": eval_set.source, "kind": eval_set.kind, "n": len(eval_set),
        "seed": int(seed), "size": list(size), "device": str(device), "tasks": list(results), "results": results,
        "skipped": skipped, "encoding": encoder.stats(), "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "cache_dir": None if cache_dir is None else os.path.abspath(os.fspath(cache_dir)), "files": {},
    }
    if out is not None:
        _write(summary, Path(out), eval_set, encoder, plots, emit)
    return summary


def _eval_set(data: Any, run_config: Mapping[str, Any], *, n: Optional[int], seed: int,
              size: Optional[Sequence[int]], patch_size: Tuple[int, ...], split: str,
              log: Callable[[str], None]) -> Tuple[EvalSet, Tuple[int, int, int]]:
    """The evaluation set of ``data`` (default the run's training source) and the volume size it is read at."""
    data = run_config.get("data") if data is None else data
    if data is None:
        raise ValueError("data: the run config names no data source; pass data=")
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, str):
        from medvl.data.sources import build_dataset

        kind = _data_kind(data, run_config)
        size = check_size(size, run_config, patch_size, log)
        count = (DEFAULT_N if n is None else int(n)) if data.startswith("synthetic-") else n
        dataset, _ = build_dataset(data, kind, n=count, seed=int(seed), size=size, split=split, log=log)
        return EvalSet.from_dataset(dataset, kind, source=data, size=size), size
    eval_set = EvalSet.from_dataset(data, _data_kind(None, run_config))
    return eval_set, check_size(eval_set.size, run_config, patch_size, log)


def _data_kind(data: Any, run_config: Mapping[str, Any]) -> str:
    from medvl.data.sources import SYNTHETIC_SOURCES

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


def _choose_tasks(requested: Optional[List[str]], eval_set: EvalSet) -> Tuple[List[str], Dict[str, str]]:
    """(the tasks to run, {task: why it is skipped}): the ones asked for, each of which must apply to the data,
    or every task that applies; a task of the data's kind that this source cannot feed is skipped, with why."""
    skipped: Dict[str, str] = {}
    if requested is None:
        chosen = []
        for name, task in TASKS.items():
            reason = task.requirement(eval_set)
            if reason is None:
                chosen.append(name)
            elif eval_set.kind in task.kinds:
                skipped[name] = reason
        return chosen, skipped
    for name in requested:
        reason = TASKS[name].requirement(eval_set)
        if reason is not None:
            valid = [t for t, task in TASKS.items() if task.requirement(eval_set) is None]
            raise ValueError(f"{reason}. Tasks that apply to {eval_set.source}: {', '.join(valid) or 'none'}")
    return list(requested), skipped


def _run_tasks(chosen: Sequence[str], encoder: CachedEncoder, eval_set: EvalSet, seed: int,
               skipped: Dict[str, str], log: Callable[[str], None]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """({task: result}, {step: seconds}); a task without enough data is added to ``skipped`` with the reason."""
    results: Dict[str, Any] = {}
    timing: Dict[str, float] = {}
    start = time.perf_counter()
    eval_set.volumes(encoder)
    timing["encode_volumes"] = time.perf_counter() - start
    for name in chosen:
        task = TASKS[name]
        start = time.perf_counter()
        try:
            options = {"seed": int(seed)} if task.seeded else {}
            results[name] = task.run(encoder, eval_set, **options)
        except NotEnoughData as e:
            skipped[name] = str(e)
            log(f"{name}: skipped: {e}")
        timing[name] = time.perf_counter() - start
        if name in results:
            log(f"{name}: done in {timing[name]:.1f} s")
    return results, timing


def _write(summary: Dict[str, Any], out: Path, eval_set: EvalSet, encoder: CachedEncoder, plots: bool,
           log: Callable[[str], None]) -> None:
    """results.json, report.md and (with ``plots``) the figures into ``out``; their paths in ``summary["files"]``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": str(out / "results.json"), "report": str(out / "report.md")}
    if plots:
        files.update(_draw_plots(summary["results"], out, eval_set, encoder))
    summary["files"] = files
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=jsonable) + "\n")
    (out / "report.md").write_text(format_report(summary))
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")


def _draw_plots(results: Mapping[str, Any], out: Path, eval_set: EvalSet, encoder: CachedEncoder) -> Dict[str, str]:
    """The map of the volume embeddings and each task's figure: {figure name: path}."""
    from medvl.eval.plots import plot_embedding_map

    files: Dict[str, str] = {}
    embeddings = as_numpy(eval_set.volumes(encoder).image_features)
    if len(embeddings) >= 2:
        colours, colour_name = _pca_colours(eval_set)
        files["embedding_map"] = plot_embedding_map(embeddings, colours, out / "embeddings_pca.png", colour_name)
    for name, result in results.items():
        plot = TASKS[name].plot
        path = None if plot is None else plot.draw(result, out / plot.filename)
        if path is not None:
            files[plot.name] = path
    return files


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


def _pca_colours(data: EvalSet) -> Tuple[List[str], str]:
    """A category per sample for the embedding map: the MR sequence or contrast category; for CT the
    single finding, "normal" or "several findings"."""
    if data.kind == "mr" or data.labels is None:
        target, names, what = class_target(data)
        if target is None:
            return ["all"] * len(data), "none"
        return [str(names[t]) if names else str(t) for t in target.tolist()], what
    names = data.finding_names or [str(j) for j in range(data.labels.shape[1])]
    colours = []
    for row in data.labels:
        hits = np.flatnonzero(row)
        colours.append("normal" if hits.size == 0 else names[hits[0]] if hits.size == 1 else "several findings")
    return colours, "finding"
