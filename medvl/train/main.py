"""``medvl train``: train a recipe on synthetic phantoms or real data (see :mod:`medvl.train.trainer`).

    medvl train --recipe siglip --steps 60 --batch-size 8 --out runs/siglip
    medvl train --recipe siglip --steps 120 --out runs/siglip --resume latest
    medvl train --recipe siglip --steps 60 --out runs/siglip --overwrite      # discard the run there, start again
    medvl train --recipe mrclip --data /data/mr_nifti --size 128,128,64 --cache-dir /scratch/cache --skip-bad
    torchrun --nproc_per_node 4 -m medvl train --device cuda --model vit3d-base --size 224,224,160
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from medvl.data.sources import SYNTHETIC_SOURCES
from medvl.options import non_negative_int, positive_int, size_argument, unknown_option
from medvl.train.recipes import LOSS_TERMS, RECIPES
from medvl.train.trainer import TrainConfig

__all__ = ["main", "build_parser"]


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _grad_clip(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (0 turns clipping off), got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number (0 turns clipping off), got {text!r}")
    return value


def _loss_weight(text: str):
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if not sep or not name or weight is None or not weight >= 0 or weight == float("inf"):
        raise argparse.ArgumentTypeError(f"expected TERM=WEIGHT with a finite weight >= 0 (e.g. prompts=0), got {text!r}")
    return name.strip(), weight


def _data(text: str) -> str:
    if text in SYNTHETIC_SOURCES or Path(text).exists():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither {' / '.join(SYNTHETIC_SOURCES)} nor an existing manifest "
                                     "(.csv / .jsonl), CT-RATE folder or MR NIfTI folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvl train", description="Train a recipe on synthetic CT/MR phantoms or real "
                                "data; under torchrun, on every rank (DistributedDataParallel).")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="siglip")
    p.add_argument("--data", type=_data, default=None, metavar="|".join([*SYNTHETIC_SOURCES, "MANIFEST", "FOLDER"]),
                   help="default: the recipe's synthetic data")
    p.add_argument("--split", default="train", help="CT-RATE split (train or valid)")
    p.add_argument("--cache-dir", default=None, help="on-disk cache of preprocessed volumes (.npy, no pickle)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable volumes and report them")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--model", default="vit3d-tiny")
    p.add_argument("--steps", type=positive_int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=positive_int, default=TrainConfig.batch_size)
    p.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=_nonneg_float, default=None, help="default: the recipe's")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None, help="default: the recipe's")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(recipe's, steps // 10)")
    p.add_argument("--grad-clip", type=_grad_clip, default=1.0, help="max gradient norm; <= 0 disables")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>); one that holds a run needs "
                   "--resume or --overwrite")
    p.add_argument("--resume", default=None, metavar="latest|PATH")
    p.add_argument("--overwrite", action="store_true", help="discard the run in --out (with --resume: the "
                   "checkpoints after the resumed one) instead of refusing to mix two runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each ViT block in backward")
    p.add_argument("--loss-weight", type=_loss_weight, action="append", default=[], metavar="TERM=W",
                   help="weight of a loss term of the recipe (repeatable), e.g. localization=0")
    p.add_argument("--profile", action="store_true", help="torch.profiler trace of steps 3-5 (OUT/profile) and a "
                   "table of each stage's and fused op's time share")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--n-train", type=positive_int, default=None,
                   help="number of phantoms (default: one new phantom per sample trained on, steps x batch)")
    p.add_argument("--size", type=size_argument, default=(64, 64, 32), help="volume size X,Y,Z (e.g. 64,64,32)")
    p.add_argument("--patch-size", type=size_argument, default=None, help="vision patch size X,Y,Z (default: the model's)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0, help="also checkpoint every N steps (0: end only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from medvl.train.trainer import TrainConfig, train

    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or str(Path("runs") / args.recipe)
    weights = dict(args.loss_weight)
    terms = LOSS_TERMS[RECIPES[args.recipe].loss]
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        parser.error("--loss-weight: " + "; ".join(
            str(unknown_option(term, terms, name=f"a term of recipe {args.recipe!r}")) for term in unknown))
    vision = {} if args.patch_size is None else {"patch_size": list(args.patch_size)}
    config = TrainConfig(recipe=args.recipe, model=args.model, data=args.data, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, accum_steps=args.accum_steps,
                         grad_clip=args.grad_clip if args.grad_clip > 0 else None, seed=args.seed, out=out,
                         device=args.device, resume=args.resume, log_every=args.log_every, n_train=args.n_train,
                         size=args.size, vision=vision, checkpoint_every=args.checkpoint_every,
                         precision=args.precision, grad_checkpointing=args.grad_checkpointing,
                         loss_weights=weights or None, split=args.split, cache_dir=args.cache_dir,
                         skip_bad=args.skip_bad, num_workers=args.workers, progress=not args.no_progress,
                         profile=args.profile, overwrite=args.overwrite, log_fn=lambda msg: print(msg, flush=True))
    try:
        config.validate()
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as e:
        # what the run's checks refuse (run folder, checkpoint, data rows) is said in a sentence that names
        # the file and the fix; a traceback would only bury it
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if result.get("skipped"):
        print(f"skipped {len(result['skipped'])} unreadable volume(s): "
              + "; ".join(f"row {s.get('row')}: {s.get('path')} ({s.get('reason')})" for s in result["skipped"]),
              flush=True)
    if result.get("first_loss") is not None and (os.environ.get("RANK", "0") == "0"):
        print(f"done: {result['step']} steps, loss {result['first_loss']:.4f} -> {result['loss']:.4f}; "
              f"checkpoint {result['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
