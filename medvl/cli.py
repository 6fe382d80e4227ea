"""Command line: `medvl info`, `medvl bench`."""

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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
