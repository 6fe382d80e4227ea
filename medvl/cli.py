"""Command line: `medvl info`, `medvl bench`, `medvl train`, `medvl eval`, `medvl qc`, `medvl reproduce`,
`medvl demo`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _info(args) -> int:
    from medvl._info import format_info, info

    print(format_info(info()))
    return 0


def _bench(args) -> int:
    from medvl import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what was compiled and what can run here").set_defaults(run=_info)
    bench_parser = commands.add_parser("bench", help="every fused op against its baselines, as a table")
    from medvl import bench

    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=_bench)
    # Listed for --help; main() hands `medvl train ...` to medvl.train.main, which owns its arguments.
    commands.add_parser("train", help="train a recipe on the phantoms or a manifest (medvl train --help)",
                        add_help=False)
    # Likewise handed to medvl.eval.main, which owns their arguments.
    commands.add_parser("eval", help="evaluate a checkpoint on held-out data (medvl eval --help)", add_help=False)
    commands.add_parser("qc", help="rank DICOM series by how suspect their metadata is (medvl qc --help)",
                        add_help=False)
    commands.add_parser("reproduce", help="train and evaluate a seed's method on the phantoms "
                        "(medvl reproduce mrclip|medtrim|radfinder)", add_help=False)
    commands.add_parser("demo", help="the embedded default: `medvl train` then `medvl eval` of what it trained, "
                        "replacing an earlier demo in the folder (medvl demo [--out DIR])", add_help=False)
    return parser


def _demo(argv: List[str]) -> int:
    """`medvl train` on its defaults, then `medvl eval` of the checkpoint it wrote. The run folder is the demo's
    own: a second demo replaces the first (`medvl train --overwrite`) rather than being refused."""
    parser = argparse.ArgumentParser(prog="medvl demo", description=_demo.__doc__)
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    args, train_args = parser.parse_known_args(argv)
    from medvl.eval.main import main as eval_main
    from medvl.train.main import main as train_main

    overwrite = [] if "--resume" in train_args or "--overwrite" in train_args else ["--overwrite"]
    code = train_main(["--out", args.out, *overwrite, *train_args])
    if code:
        return code
    return eval_main(["eval", args.out, "--out", f"{args.out}/eval"])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from medvl.train.main import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] in ("eval", "qc"):
        from medvl.eval.main import main as eval_main

        return eval_main(argv)
    if argv and argv[0] == "reproduce":
        from medvl.reproduce import main as reproduce_main

        return reproduce_main(argv[1:])
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
