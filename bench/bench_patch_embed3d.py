"""Fused 3D patch embedding: medvl backends vs window + MONAI PatchEmbeddingBlock (conv) and window +
reshape + linear, forward + backward (weight, bias and position-embedding gradients).

CPU: B = 2, 1x128^3 int16, patch 16, E = 768, float32. GPU (when visible): B = 8, 1x160x224x224 int16 and
bf16 volumes, patch (16,16,16) and (4,16,16), E = 768, bf16 parameters. Peak memory, achieved GFLOP/s, the
volume read rate (GB/s) and the time of the op's two GEMMs with torch's matmul (the limit, measured in
the same run) go to extra_info.
"""

from __future__ import annotations

import pytest
import torch

from medvl import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = bench.patch_embed3d_cases(DEVICE)
METHODS = list(bench.patch_embed3d_methods(DEVICE))


def _case_id(case):
    batch, size, patch, embed, volume_dtype, dtype = case
    return f"B{batch}-{'x'.join(map(str, size))}-{str(volume_dtype)[6:]}-p{'x'.join(map(str, patch))}-E{embed}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_patch_embed3d_forward_backward(benchmark, method, case):
    inputs = bench.patch_embed3d_inputs(case, DEVICE)
    inner = bench.patch_embed3d_step(bench.patch_embed3d_methods(DEVICE)[method], inputs)

    def step():
        inner()
        bench._sync(DEVICE)

    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
    with bench.peak_memory(DEVICE) as peak:
        step()
    median = benchmark.stats.stats.median
    limit = bench.patch_embed3d_gemm_seconds(inputs["tokens"], inputs["columns"], inputs["embed"],
                                             inputs["weight"].dtype, DEVICE, 3)
    volume = inputs["volume"]
    benchmark.extra_info.update(peak_mib=peak["mib"], gflops=inputs["flops"] / median / 1e9, gemm_limit_s=limit,
                                of_limit=limit / median, volume_gbps=volume.numel() * volume.element_size() / median / 1e9,
                                device=bench.machine_name(DEVICE))
