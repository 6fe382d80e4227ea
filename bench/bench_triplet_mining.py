"""Triplet mining: medvl backends vs the reference and pytorch-metric-learning's BatchHardMiner.

CPU: batch-hard, B in {1024, 4096, 16384}, D = 256, float32. GPU (when visible): batch-hard at the
issue's shapes (B in {1024, 8192, 32768}, D = 256, bfloat16; and B in {8192, 32768}, D = 512, bfloat16
and float32), semi-hard and entity mining at the same bfloat16 shapes (issue 16's floor: within 2.5x of
batch-hard's time at the same shape), and a sweep of the Triton tiles around kernels/triplet_mining.py's
GPU_TILES (test_triton_tile_sweep: prints the ranking and saves it to bench/results/, to settle the
table). Peak memory, GFLOP/s and the fraction of the bf16 GEMM rate measured in the same run go to
each benchmark's extra_info.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from medvl.bench import harness
from medvl.bench import triplet_mining as op_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
if GPU:
    CASES = ([(n, 256, torch.bfloat16) for n in (1024, 8192, 32768)]
             + [(n, 512, dtype) for n in (8192, 32768) for dtype in (torch.bfloat16, torch.float32)])
else:
    CASES = [(n, 256, torch.float32) for n in (1024, 4096, 16384)]
METHODS = list(op_bench.triplet_mining_methods(DEVICE))
STRATEGY_CASES = [(n, 256) for n in (1024, 8192, 32768)]
ENTITY_WIDTHS = ((18, 0.15), (9, 0.3), (11, 0.3))


def _inputs(n, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator).to(DEVICE, dtype)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=generator).to(DEVICE)
    entities = [(torch.rand(n, k, generator=generator) < p).to(DEVICE) for k, p in ENTITY_WIDTHS]
    return x, labels, entities


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,dim,dtype", CASES, ids=[f"B{n}-D{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_batch_hard_mining(benchmark, method, n, dim, dtype):
    if method in ("reference", "pytorch-metric-learning") and dtype == torch.bfloat16:
        pytest.skip("the peers mine in the embeddings' dtype; compared in float32")
    miner = op_bench.triplet_mining_methods(DEVICE)[method]
    x, labels, _ = _inputs(n, dim, dtype)

    median, peak_mib = harness.benchmark_call(benchmark, lambda: miner(x, labels), DEVICE,
                                              rounds=3 if n >= 16384 else 5)
    benchmark.extra_info.update(peak_mib=peak_mib, gflops=2.0 * n * n * dim / median / 1e9,
                                device=harness.machine_name(DEVICE), dtype=str(dtype))


def _gpu_backends():
    return [m.split("-", 1)[1] for m in METHODS if m in ("medvl-cuda", "medvl-triton")]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU benchmark")
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("strategy", ["batch_hard", "semi_hard", "entities"])
@pytest.mark.parametrize("n,dim", STRATEGY_CASES, ids=[f"B{n}-D{d}" for n, d in STRATEGY_CASES])
def test_mining_strategies(benchmark, backend, strategy, n, dim):
    import medvl

    x, labels, entities = _inputs(n, dim, torch.bfloat16)
    kw = {"entities": entities} if strategy == "entities" else {"labels": labels}

    median, peak_mib = harness.benchmark_call(
        benchmark, lambda: medvl.triplet_mining(x, strategy=strategy, backend=backend, **kw), DEVICE, rounds=5)
    rate = harness.gemm_rate(n, dim, torch.bfloat16, DEVICE)
    flops = 2.0 * n * n * dim * (2 if strategy == "semi_hard" else 1)  # semi-hard computes the tiles twice
    benchmark.extra_info.update(peak_mib=peak_mib, gflops=flops / median / 1e9,
                                of_gemm_rate=2.0 * n * n * dim / median / rate,
                                device=harness.machine_name(DEVICE), strategy=strategy)


# Alternatives around GPU_TILES (each must fit the shared memory of an H100/H200; ptxas counts in the
# kernel module's comments). The sweep times the Triton path alone, per strategy, at B = 32768 and 1024.
SWEEP = {
    "batch_hard": [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=2),
                   dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
                   dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
                   dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=256, num_warps=8, num_stages=3),
                   dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)],
    "semi_hard": [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, BLOCK_S=8, num_warps=8, num_stages=2),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_S=8, num_warps=8, num_stages=3),
                  dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, BLOCK_S=4, num_warps=8, num_stages=2),
                  dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=256, BLOCK_S=16, num_warps=8, num_stages=2)],
    "entities": [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128, num_warps=8, num_stages=2),
                 dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=8, num_stages=3),
                 dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2)],
}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tile sweep")
@pytest.mark.parametrize("strategy", list(SWEEP))
def test_triton_tile_sweep(strategy):
    import triton.testing

    from medvl.ops._labels import pack_multi_hot
    from medvl.ops.triplet_mining import _Inputs, _run_fused, _triton_per_anchor
    from medvl.reference.triplet_mining import entity_scoring

    results = []
    for n in (32768, 1024):
        x, labels, entities = _inputs(n, 256, torch.bfloat16)
        scored = strategy == "entities"
        bits = torch.cat([pack_multi_hot(e) for e in entities], 1) if scored else None
        scoring = entity_scoring((0.85, 0.10, 0.05), (0.25, 0.6))
        inputs = _Inputs(x, x, None if scored else labels, None if scored else labels, bits, bits,
                         strategy, "euclidean", [pack_multi_hot(e).shape[1] for e in entities] if scored else [],
                         [float(w) for w in scoring.weights], float(scoring.low), float(scoring.high), True)
        configs = [None] + SWEEP[strategy]  # None: the table's own choice
        splits = [None] if strategy == "semi_hard" else [None, 1, 2, 4, 8]
        table = None
        for cfg in configs:
            unsplit = None
            for split in splits:
                overrides = dict(cfg or {}, **({"SPLIT": split} if split else {}))
                run = (lambda o=overrides: _run_fused(lambda *a: _triton_per_anchor(*a, block_overrides=o or None),
                                                      inputs))
                mined = run()
                unsplit = mined if unsplit is None else unsplit
                table = mined if table is None else table
                # Splits never change the triplets; other tiles may round the dot products differently.
                assert all(torch.equal(a, b) for a, b in zip(mined, unsplit)), f"{overrides} changed the triplets"
                same = all(torch.equal(a, b) for a, b in zip(mined, table))
                ms = triton.testing.do_bench(run, warmup=5, rep=50)
                results.append({"n": n, "config": overrides or "table", "ms": ms, "same_as_table": same})
    for n in (32768, 1024):
        ranked = sorted((r for r in results if r["n"] == n), key=lambda r: r["ms"])
        print(f"\n{strategy} B={n} D=256 bf16:")
        for r in ranked:
            print(f"  {r['ms']:8.3f} ms  {r['config']}{'' if r['same_as_table'] else '  (other triplets)'}")
    path = os.path.join(os.path.dirname(__file__), "results", f"triton-tiles-mining-{harness.machine_name(DEVICE)}.json")
    records = json.load(open(path)) if os.path.exists(path) else {}
    records[strategy] = results
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
