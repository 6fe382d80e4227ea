"""`medvl bench`: every fused op against its baselines on synthetic tensors, as a table.

Times are medians over repeats (with p20/p80), taken after one warm-up; peak memory is the growth
of the process's peak RSS during the call on CPU (Linux), of torch's peak allocation on CUDA. The
limit of each op is measured in the same run: its FLOPs at the rate of a plain matmul of the same
size on the same device, so "of limit" reads as the fraction of the machine's GEMM rate reached.
"""

from __future__ import annotations

import argparse
from typing import List

import torch

from medvl.bench.harness import (BENCH_LABELS, Measurement, annotate, append_record, environment, format_table,
                                 gemm_rate, machine_name, measure, peak_memory, save)
from medvl.bench.patch_embed3d import bench_patch_embed3d, patch_embed3d_cases
from medvl.bench.sigmoid_loss import bench_sigmoid_loss
from medvl.bench.triplet_mining import bench_triplet_mining

__all__ = ["BENCH_LABELS", "Measurement", "add_arguments", "append_record", "bench_patch_embed3d", "bench_sigmoid_loss",
           "bench_triplet_mining", "environment", "machine_name", "main", "measure", "peak_memory"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="batch sizes, comma separated (default: 1024,4096 on CPU; "
                        "4096,16384,65536 on CUDA)")
    parser.add_argument("--op", default="all", choices=["all", "sigmoid_loss", "triplet_mining", "patch_embed3d"])
    parser.add_argument("--dim", type=int, default=512, help="feature dim of the losses")
    parser.add_argument("--mining-dim", type=int, default=256, help="embedding dim of the mining benchmark")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=None, help="comma-separated subset, e.g. medvl-cpu,open_clip")
    parser.add_argument("--save", default=None, help="append the results to this JSON file")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    default_sizes = "4096,16384,65536" if device.type == "cuda" else "1024,4096"
    sizes = [int(v) for v in (args.sizes or default_sizes).split(",")]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    methods = args.methods.split(",") if args.methods else None
    rate = gemm_rate(max(sizes), args.dim, dtype, device)
    print(f"# medvl bench on {machine_name(device)}; torch {torch.__version__}; "
          f"{dtype} GEMM rate here {rate / 1e9:.1f} GFLOP/s (the limit)")
    results: List[Measurement] = []
    runs = []
    if args.op in ("all", "sigmoid_loss"):
        runs += [lambda n=n: bench_sigmoid_loss(n, args.dim, dtype, device, args.repeats, methods) for n in sizes]
        if device.type == "cuda" and not args.sizes:
            # Issue-sized GPU cases: one ring step (a rank's 1024 images against 64 ranks' texts), and
            # the label and Jaccard targets at the largest batch, beside pair.
            runs.append(lambda: bench_sigmoid_loss(1024, 768, dtype, device, args.repeats, methods, n_text=65536))
            runs += [lambda target=target: bench_sigmoid_loss(max(sizes), args.dim, dtype, device, args.repeats,
                                                              methods, target=target) for target in ("label", "jaccard")]
    if args.op in ("all", "triplet_mining"):
        runs += [lambda n=n: bench_triplet_mining(n, args.mining_dim, dtype, device, args.repeats, methods)
                 for n in sizes]
    if args.op in ("all", "patch_embed3d"):
        runs += [lambda case=case: bench_patch_embed3d(case, device, args.repeats, methods)
                 for case in patch_embed3d_cases(device)]
    for run in runs:
        current = run()
        annotate(current, rate)
        results += current
        print(format_table(current), flush=True)
        print()
    if args.save:
        save(results, rate, device, args.save)
        print(f"saved to {args.save}")
    return 0
