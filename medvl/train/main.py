"""``medvl train``: train a recipe on synthetic phantoms (see :mod:`medvl.train.trainer`).

    python -m medvl.train.main --recipe siglip --steps 60 --batch-size 8 --out runs/siglip
    python -m medvl.train.main --recipe siglip --steps 120 --out runs/siglip --resume latest
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from medvl.train.recipes import RECIPES

__all__ = ["main", "build_parser"]


def _size(text: str):
    from medvl.train.data import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvl train", description="Train a recipe on synthetic CT/MR phantoms.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="siglip")
    p.add_argument("--data", choices=("synthetic-ct", "synthetic-mr"), default=None,
                   help="default: the recipe's data")
    p.add_argument("--model", default="vit3d-tiny")
    p.add_argument("--steps", type=_positive, default=60)
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--accum-steps", type=_positive, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=_nonneg_float, default=None, help="default: the recipe's")
    p.add_argument("--weight-decay", type=_nonneg_float, default=None, help="default: the recipe's")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(recipe's, steps // 10)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; <= 0 disables")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>)")
    p.add_argument("--resume", default=None, metavar="latest|PATH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n-train", type=_positive, default=256, help="number of phantoms")
    p.add_argument("--size", type=_size, default=(64, 64, 32), help="volume size X,Y,Z (e.g. 64,64,32)")
    p.add_argument("--patch-size", type=_size, default=None, help="vision patch size X,Y,Z (default: the model's)")
    p.add_argument("--log-every", type=_positive, default=10)
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: end only)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from medvl.train.trainer import TrainConfig, train

    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or str(Path("runs") / args.recipe)
    if args.resume and args.resume != "latest" and not Path(args.resume).exists():
        parser.error(f"--resume: checkpoint {args.resume!r} does not exist")
    if args.resume == "latest" and not (Path(out) / "latest").is_file():
        parser.error(f"--resume latest: no checkpoint in {out} (missing {Path(out) / 'latest'})")
    if args.checkpoint_every < 0:
        parser.error("--checkpoint-every must be >= 0")
    vision = {} if args.patch_size is None else {"patch_size": list(args.patch_size)}
    config = TrainConfig(recipe=args.recipe, model=args.model, data=args.data, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, accum_steps=args.accum_steps,
                         grad_clip=args.grad_clip if args.grad_clip > 0 else None, seed=args.seed, out=out,
                         device=args.device, resume=args.resume, log_every=args.log_every, n_train=args.n_train,
                         size=args.size, vision=vision, checkpoint_every=args.checkpoint_every,
                         log_fn=lambda msg: print(msg, flush=True))
    try:
        config.validate()
    except ValueError as e:
        parser.error(str(e))
    result = train(config)
    print(f"done: {result['step']} steps, loss {result['first_loss']:.4f} -> {result['loss']:.4f}; "
          f"checkpoint {result['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
