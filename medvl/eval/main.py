"""`medvl eval` and `medvl qc`: evaluate a checkpoint, or rank DICOM series by how suspect their headers are.

    medvl eval runs/siglip                                  # the run's data kind, held-out phantoms (seed 100000)
    medvl eval runs/mrclip --tasks probe,qc --n 128 --out /tmp/eval
    medvl qc runs/mrclip /data/dicom --out qc.csv           # every series under /data/dicom, most suspect first

``medvl eval`` prints one table per task and writes OUT/results.json, OUT/report.md and the PNGs
(OUT defaults to the run directory's ``eval/``); encodings are cached under OUT/cache (or --cache-dir),
so a second run re-encodes nothing. ``medvl qc`` prints the ranking and writes it as a CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from medvl.data.sources import SYNTHETIC_SOURCES
from medvl.options import non_negative_int, positive_int, size_argument

__all__ = ["build_eval_parser", "build_qc_parser", "eval_main", "main", "qc_main"]


def _tasks_help() -> str:
    """One line per task for --help: its name, the data kinds it applies to, what it measures."""
    from medvl.eval.tasks import TASKS

    width = max(len(name) for name in TASKS)
    lines = [f"  {name:<{width}}  {'/'.join(sorted(task.kinds)).upper():<5}  {task.help}"
             for name, task in TASKS.items()]
    return "tasks (--tasks; default: every task that applies to the data):\n" + "\n".join(lines)


def build_eval_parser() -> argparse.ArgumentParser:
    from medvl.eval.evaluation import DEFAULT_EVAL_SEED
    from medvl.eval.tasks import TASKS

    p = argparse.ArgumentParser(prog="medvl eval", description="Evaluate a `medvl train` checkpoint on held-out "
                                "data with the tasks below.", epilog=_tasks_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint-<step> folder or the run folder of `medvl train`")
    p.add_argument("--data", default=None, metavar="|".join([*SYNTHETIC_SOURCES, "MANIFEST", "FOLDER"]),
                   help="default: the checkpoint's training source (phantoms at --seed are held out)")
    p.add_argument("--tasks", default=None, metavar=",".join(TASKS),
                   help="comma-separated; default every task that applies to the data")
    p.add_argument("--out", default=None, help="output folder (default: the run folder's eval/)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="phantoms to generate (default 256), or at most this many rows of a file source")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULT_EVAL_SEED,
                   help=f"phantom seed and seed of every draw (default {DEFAULT_EVAL_SEED}, far from training seeds)")
    p.add_argument("--size", type=size_argument, default=None, help="volume size X,Y,Z (default: the training size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default OUT/cache)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="volumes per forward pass")
    p.add_argument("--split", default="valid", help="CT-RATE split (default valid)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _checkpoint_or_error(parser: argparse.ArgumentParser, path: str) -> Path:
    from medvl.models.checkpoint import checkpoint_dir

    try:
        return checkpoint_dir(path)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"CHECKPOINT: {e}")


def _device_or_error(parser: argparse.ArgumentParser, device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    from medvl.eval.evaluation import evaluate
    from medvl.eval.report import format_report
    from medvl.eval.tasks import parse_tasks

    parser = build_eval_parser()
    args = parser.parse_args(argv)
    checkpoint = _checkpoint_or_error(parser, args.checkpoint)
    _device_or_error(parser, args.device)
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as e:
        parser.error(f"--tasks: {e}")
    out = Path(args.out) if args.out else checkpoint.parent / "eval"
    log = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        summary = evaluate(str(checkpoint), data=args.data, tasks=tasks, out=out, n=args.n, seed=args.seed,
                           size=args.size, device=args.device, cache_dir=args.cache_dir, log=log,
                           batch_size=args.batch_size, split=args.split, plots=not args.no_plots)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    print(format_report(summary), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------
# medvl qc
# ----------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("rank", "series", "score", "n_issues", "issues", "description", "sentence", "series_uid", "n_slices")


def build_qc_parser() -> argparse.ArgumentParser:
    from medvl.eval.qc import RANKINGS

    p = argparse.ArgumentParser(
        prog="medvl qc",
        description="Score every DICOM series under a folder against its metadata sentence with an MR checkpoint "
                    "and list them most suspect first, with what looks wrong in each header.")
    p.add_argument("checkpoint", help="an MR checkpoint (e.g. recipe mrclip): checkpoint-<step> or run folder")
    p.add_argument("dicom_dir", help="folder searched recursively; each folder holding DICOM files is one series")
    p.add_argument("--out", default=None, metavar="CSV",
                   help="the ranking as CSV (default: the run folder's qc-<DICOM_DIR name>.csv)")
    p.add_argument("--rank-by", choices=RANKINGS, default="issues",
                   help="issues: series with rule-based issues first, then by score (default); score: score only")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default: none, memory only)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="volumes per forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_qc_csv(result, path) -> str:
    """The ranking of :func:`medvl.eval.qc.qc_dicom` as CSV (unreadable series last, without a rank)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in result["series"]:
            writer.writerow({"rank": row["rank"], "series": row["series"], "score": f"{row['score']:.6f}",
                             "n_issues": len(row["issues"]), "issues": "; ".join(row["issues"]),
                             "description": row["description"] or "", "sentence": row["sentence"],
                             "series_uid": row["series_uid"] or "", "n_slices": row["n_slices"]})
        for row in result["unreadable"]:
            writer.writerow({"rank": "", "series": row["series"], "score": "", "n_issues": 1,
                             "issues": f"unreadable: {row['reason']}", "description": "", "sentence": "",
                             "series_uid": "", "n_slices": ""})
    return path


def format_qc_table(result) -> str:
    from medvl.eval.markdown import table

    rows = [[r["rank"], f"{r['score']:.4f}", _shorten(r["series"], 40),
             _shorten("; ".join(r["issues"]) or "-", 90)] for r in result["series"]]
    rows += [["-", "-", _shorten(u["series"], 40), _shorten(f"unreadable: {u['reason']}", 90)]
             for u in result["unreadable"]]
    order = ("rule-based issues first, then score" if result.get("rank_by") == "issues" else "score")
    return (f"{len(result['series'])} series ranked by {order} (score: cosine distance between the volume and its "
            "metadata sentence, higher = more suspect)\n\n" + table(("rank", "score", "series", "issues"), rows)
            + "\n\n" + qc_summary(result))


def qc_summary(result) -> str:
    """One line: how many series were scored and how many could not be read."""
    scored, unreadable = len(result["series"]), len(result["unreadable"])
    line = f"{scored + unreadable} series: {scored} scored, {unreadable} unreadable"
    return line + (" (listed last, with the reason)" if unreadable else "")


def qc_main(argv: Optional[Sequence[str]] = None) -> int:
    from medvl.eval.qc import qc_dicom

    parser = build_qc_parser()
    args = parser.parse_args(argv)
    checkpoint = _checkpoint_or_error(parser, args.checkpoint)
    _device_or_error(parser, args.device)
    if not os.path.isdir(args.dicom_dir):
        parser.error(f"DICOM_DIR: {args.dicom_dir!r} does not exist or is not a folder")
    log = None if args.quiet else (lambda line: print(line, flush=True))
    try:
        result = qc_dicom(str(checkpoint), args.dicom_dir, device=args.device, cache_dir=args.cache_dir,
                          rank_by=args.rank_by, batch_size=args.batch_size, log=log)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    name = os.path.basename(os.path.normpath(os.path.abspath(args.dicom_dir))) or "dicom"
    out = args.out or str(checkpoint.parent / f"qc-{name}.csv")
    path = write_qc_csv(result, out)
    print(format_qc_table(result), flush=True)
    print(f"\nwrote {path}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``main(["eval", ...])`` or ``main(["qc", ...])`` (what ``medvl`` hands over)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("eval", "qc"):
        print("usage: medvl eval CHECKPOINT ... | medvl qc CHECKPOINT DICOM_DIR ...", file=sys.stderr)
        return 2
    return eval_main(argv[1:]) if argv[0] == "eval" else qc_main(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
