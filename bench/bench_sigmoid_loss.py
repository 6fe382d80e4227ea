"""Sigmoid loss forward+backward: medvl backends vs the reference and open_clip's SigLipLoss.

CPU: B in {1024, 4096, 16384}, D = 512, float32. GPU (when visible): B in {4096, 16384, 65536},
D in {512, 1024}, bfloat16, adding torch.compile of the reference. Peak memory and achieved
GFLOP/s go to each benchmark's extra_info; `make bench-full` writes them to bench/results/.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medvl.bench import harness
from medvl.bench import sigmoid_loss as op_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda":
    CASES = [(n, d) for n in (4096, 16384, 65536) for d in (512, 1024)]
    DTYPE = torch.bfloat16
else:
    CASES = [(1024, 512), (4096, 512), (16384, 512)]
    DTYPE = torch.float32
METHODS = list(op_bench.sigmoid_loss_methods(DEVICE))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,dim", CASES, ids=[f"B{n}-D{d}" for n, d in CASES])
def test_sigmoid_loss_forward_backward(benchmark, method, n, dim):
    if method == "reference" and DEVICE.type == "cuda" and n > 16384:
        pytest.skip("the eager reference's B x B buffers at this size only measure the allocator")
    loss_fn = op_bench.sigmoid_loss_methods(DEVICE)[method]
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(DEVICE, DTYPE).requires_grad_()
    t = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(DEVICE, DTYPE).requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)

    def step():
        for v in (x, t, s, b):
            v.grad = None
        loss_fn(x, t, s, b).backward()

    median, peak_mib = harness.benchmark_call(benchmark, step, DEVICE, rounds=3 if n >= 16384 else 5)
    flops = 6.0 * n * n * dim
    benchmark.extra_info.update(
        peak_mib=peak_mib, gflops=flops / median / 1e9, device=harness.machine_name(DEVICE), dtype=str(DTYPE),
    )
