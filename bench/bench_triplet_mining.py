"""Batch-hard mining: medvl backends vs the reference and pytorch-metric-learning's BatchHardMiner.

CPU: B in {1024, 4096, 16384}, D = 256, float32. GPU (when visible): B in {8192, 32768}, D = 512,
bfloat16 and float32. Peak memory goes to each benchmark's extra_info.
"""

from __future__ import annotations

import pytest
import torch

from medvl import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    CASES = [(n, 512, dtype) for n in (8192, 32768) for dtype in (torch.bfloat16, torch.float32)]
else:
    CASES = [(n, 256, torch.float32) for n in (1024, 4096, 16384)]
METHODS = list(bench.triplet_mining_methods(DEVICE))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,dim,dtype", CASES, ids=[f"B{n}-D{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_batch_hard_mining(benchmark, method, n, dim, dtype):
    if method in ("reference", "pytorch-metric-learning") and dtype == torch.bfloat16:
        pytest.skip("the peers mine in the embeddings' dtype; compared in float32")
    miner = bench.triplet_mining_methods(DEVICE)[method]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=generator).to(DEVICE, dtype)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=generator).to(DEVICE)

    def step():
        miner(x, labels)
        bench._sync(DEVICE)

    benchmark.pedantic(step, rounds=3 if n >= 16384 else 5, iterations=1, warmup_rounds=1)
    with bench.peak_memory(DEVICE) as peak:
        step()
    benchmark.extra_info.update(peak_mib=peak["mib"], gflops=2.0 * n * n * dim / benchmark.stats.stats.median / 1e9,
                                device=bench.machine_name(DEVICE), dtype=str(dtype))
