"""Fused 3D patch embedding: medvl backends vs window + MONAI PatchEmbeddingBlock (conv) and window +
reshape + linear, forward + backward (weight, bias and position-embedding gradients), and forward alone.

CPU: B = 2, 1x128^3 int16, patch 16, E = 768, float32. GPU (when visible): B = 8, 1x160x224x224 int16 and
bf16 volumes, patch (16,16,16) and (4,16,16), and B = 2, 1x128^3 int16 with both patches (issue 16), E = 768,
bf16 parameters; the forward alone at the int16 shapes (issue 16's floor: 1.5x window + reshape + linear);
and a sweep of the Triton tiles around kernels/patch_embed3d.py's GPU_TILES (test_triton_tile_sweep: prints
the ranking and saves it to bench/results/, to settle the table). Peak memory, achieved GFLOP/s, the volume
read rate (GB/s) and the time of the op's GEMMs with torch's matmul (the limit, measured in the same run)
go to extra_info.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from medvl.bench import harness
from medvl.bench import patch_embed3d as op_bench
from medvl.data.transforms import CT_WINDOW

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
SMALL_GPU_CASES = [(2, (128, 128, 128), patch, 768, torch.int16, torch.bfloat16) for patch in ((16, 16, 16), (4, 16, 16))]
CASES = op_bench.patch_embed3d_cases(DEVICE) + (SMALL_GPU_CASES if GPU else [])
METHODS = list(op_bench.patch_embed3d_methods(DEVICE))
FORWARD_CASES = [c for c in CASES if c[4] == torch.int16] if GPU else []


def _case_id(case):
    batch, size, patch, embed, volume_dtype, dtype = case
    return f"B{batch}-{'x'.join(map(str, size))}-{str(volume_dtype)[6:]}-p{'x'.join(map(str, patch))}-E{embed}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_patch_embed3d_forward_backward(benchmark, method, case):
    inputs = op_bench.patch_embed3d_inputs(case, DEVICE)
    step = op_bench.patch_embed3d_step(op_bench.patch_embed3d_methods(DEVICE)[method], inputs)
    median, peak_mib = harness.benchmark_call(benchmark, step, DEVICE, rounds=7)
    limit = op_bench.patch_embed3d_gemm_seconds(inputs["tokens"], inputs["columns"], inputs["embed"],
                                             inputs["weight"].dtype, DEVICE, 3)
    volume = inputs["volume"]
    benchmark.extra_info.update(peak_mib=peak_mib, gflops=inputs["flops"] / median / 1e9, gemm_limit_s=limit,
                                of_limit=limit / median, volume_gbps=volume.numel() * volume.element_size() / median / 1e9,
                                device=harness.machine_name(DEVICE))


def _forward_methods():
    """name -> make(volume, weight, bias, pos, patch) -> step() running the forward alone (no autograd)."""
    import medvl
    import torch.nn.functional as F

    lo, hi = CT_WINDOW

    def fused(name):
        def make(volume, weight, bias, pos, patch):
            return lambda: medvl.patch_embed3d(volume, weight, bias, pos, patch_size=patch, window=CT_WINDOW,
                                               backend=name)
        return make

    def reshape_linear(volume, weight, bias, pos, patch):
        b, c, (s0, s1, s2), (p0, p1, p2) = volume.shape[0], volume.shape[1], volume.shape[2:], patch

        def step():
            x = ((volume.float() - lo) / (hi - lo)).clamp(0.0, 1.0).to(weight.dtype)
            x = x.reshape(b, c, s0 // p0, p0, s1 // p1, p1, s2 // p2, p2).permute(0, 2, 4, 6, 1, 3, 5, 7)
            return F.linear(x.reshape(b, -1, c * p0 * p1 * p2), weight.reshape(weight.shape[0], -1), bias) + pos
        return step

    methods = {f"medvl-{m.split('-', 1)[1]}": fused(m.split("-", 1)[1]) for m in METHODS if m.startswith("medvl-")}
    methods["reshape-linear"] = reshape_linear
    return methods


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU benchmark")
@pytest.mark.parametrize("method", list(_forward_methods()) if GPU else [])
@pytest.mark.parametrize("case", FORWARD_CASES, ids=[_case_id(c) for c in FORWARD_CASES])
def test_patch_embed3d_forward(benchmark, method, case):
    inputs = op_bench.patch_embed3d_inputs(case, DEVICE)
    params = [inputs[k].detach() for k in ("weight", "bias", "pos")]
    inner = _forward_methods()[method](inputs["volume"], *params, inputs["patch"])

    def step():
        with torch.no_grad():
            inner()

    median, peak_mib = harness.benchmark_call(benchmark, step, DEVICE, rounds=7)
    volume = inputs["volume"]
    benchmark.extra_info.update(peak_mib=peak_mib, gflops=inputs["flops"] / 2 / median / 1e9,
                                volume_gbps=volume.numel() * volume.element_size() / median / 1e9,
                                device=harness.machine_name(DEVICE))


# Alternatives around GPU_TILES, per kernel ((BLOCK_M, BLOCK_N, reduction block, warps, stages); each fits
# an H100/H200's shared memory; ptxas counts in the kernel module's comments). The sweep times each Triton
# kernel alone on the int16 shapes.
SWEEP = {
    "forward": [(64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 256, 32, 16, 4),
                (64, 128, 64, 4, 4)],
    "grad_weight": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3)],
    "grad_volume": [(128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3)],
}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tile sweep")
@pytest.mark.parametrize("kind", list(SWEEP))
def test_triton_tile_sweep(kind):
    import triton.testing

    from medvl.kernels import patch_embed3d as kernels

    reduce_name = {"forward": "BLOCK_K", "grad_weight": "BLOCK_T", "grad_volume": "BLOCK_E"}[kind]
    window = (*CT_WINDOW, 0.0, 1.0)
    results = []
    for case in [c for c in CASES if c[4] == torch.int16]:
        inputs = op_bench.patch_embed3d_inputs(case, DEVICE)
        volume, patch = inputs["volume"], inputs["patch"]
        if kind == "grad_volume":
            volume = volume.to(torch.bfloat16)  # only float volumes have a gradient
        grid = tuple(s // p for s, p in zip(volume.shape[2:], patch))
        weight = inputs["weight"].detach().reshape(inputs["embed"], -1)
        grad_out = torch.randn(volume.shape[0], math.prod(grid), inputs["embed"], device=DEVICE, dtype=weight.dtype)
        for cfg in [None] + SWEEP[kind]:
            overrides = None if cfg is None else dict(zip(("BLOCK_M", "BLOCK_N", reduce_name, "num_warps",
                                                          "num_stages"), cfg))
            if kind == "forward":
                run = lambda o=overrides: kernels.patch_embed3d_forward(  # noqa: E731
                    volume, weight, None, inputs["pos"].detach()[0].float(), patch, grid, window, weight.dtype,
                    block_overrides=o)
            elif kind == "grad_weight":
                run = lambda o=overrides: kernels.patch_embed3d_grad_weight(  # noqa: E731
                    volume, grad_out, patch, grid, window, block_overrides=o)
            else:
                run = lambda o=overrides: kernels.patch_embed3d_grad_volume(  # noqa: E731
                    volume, weight, grad_out, patch, grid, window, block_overrides=o)
            ms = triton.testing.do_bench(run, warmup=5, rep=50)
            results.append({"case": _case_id(case), "config": overrides or "table", "ms": ms})
    for case in {r["case"] for r in results}:
        print(f"\n{kind} {case}:")
        for r in sorted((r for r in results if r["case"] == case), key=lambda r: r["ms"]):
            print(f"  {r['ms']:8.3f} ms  {r['config']}")
    path = os.path.join(os.path.dirname(__file__), "results", f"triton-tiles-patch_embed3d-{harness.machine_name(DEVICE)}.json")
    records = json.load(open(path)) if os.path.exists(path) else {}
    records[kind] = results
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
