"""Training step (forward, SigLIP loss, backward, AdamW step) of the CLIP model: medvl's fused ops against the
plain path (MONAI window + PatchEmbeddingBlock(conv) + open_clip SigLipLoss, same weights), and the largest
batch each path fits in a memory budget (see medvl.bench.throughput).

CPU: vit3d-tiny, batch 16 of 1x64x64x32 int16 volumes, fp32; largest batch in 512 MiB. GPU (when visible):
vit3d-base (ViT-B, 1960 tokens), batch 8 of 1x224x224x160 int16 volumes, bf16 autocast; largest batch in
40 GiB and in the device's whole memory (the headline figure). Throughput (volumes/s) and peak memory (CPU:
parameters + peak RSS growth of a fresh process; CUDA: max_memory_allocated) go to extra_info; the largest
batch and the probes of its search go to the extra_info of test_largest_batch_*.
"""

from __future__ import annotations

import os

import pytest
import torch

from medvl.bench import harness
from medvl.bench import throughput

CPU = dict(model="vit3d-tiny", size=(64, 64, 32), batch=16, precision="fp32", budgets=("512",), cap=512)
GPU = dict(model="vit3d-base", size=(224, 224, 160), batch=8, precision="bf16", budgets=("40960", "full"),
           cap=1024)
# The CPU measurement processes' torch threads (default: torch's choice). On a shared machine 1 is steadier.
THREADS = int(os.environ["MEDVL_BENCH_THREADS"]) if os.environ.get("MEDVL_BENCH_THREADS") else None
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _train_step(benchmark, path, device, case, rounds):
    model, loss_fn = throughput.build_path(path, case["model"], case["size"])
    step = throughput.TrainStep(model, loss_fn, case["batch"], case["size"], device, case["precision"])
    threads = torch.get_num_threads()
    if THREADS and device.type == "cpu":
        torch.set_num_threads(THREADS)
    try:
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
        step.close()
    median = benchmark.stats.stats.median
    # Peak memory from a measurement of its own: a fresh process on CPU, a reset peak counter on CUDA.
    kwargs = dict(path=path, model_name=case["model"], volume_size=case["size"], batch_size=case["batch"], steps=1,
                  warmup=1, device=str(device), precision=case["precision"], threads=THREADS)
    if device.type == "cuda":
        del model, loss_fn, step
        torch.cuda.empty_cache()
        measured = throughput._measure_path(**kwargs)
    else:
        measured = throughput.run_isolated(throughput._measure_path, **kwargs)
    benchmark.extra_info.update(volumes_per_s=case["batch"] / median, peak_mib=measured["peak_mib"],
                                state_mib=measured["state_mib"], batch=case["batch"], model=case["model"],
                                volume="x".join(map(str, (1, *case["size"]))), precision=case["precision"],
                                device=harness.machine_name(device))


def _largest_batch(benchmark, path, budget, device, case):
    budget_bytes = throughput._budget_bytes(budget, device)
    kwargs = dict(model_name=case["model"], volume_size=case["size"], device=device, precision=case["precision"],
                  cap=case["cap"], threads=THREADS)
    found = benchmark.pedantic(lambda: throughput.largest_batch(path, budget_bytes, start=case["batch"], **kwargs),
                               rounds=1, iterations=1)
    benchmark.extra_info.update(largest_batch=found["batch"], capped=found["capped"], budget_mib=found["budget_mib"],
                                probes=found["probes"], model=case["model"], precision=case["precision"],
                                volume="x".join(map(str, (1, *case["size"]))), device=harness.machine_name(device))


@pytest.mark.parametrize("path", throughput.PATHS)
def test_train_step_cpu(benchmark, path):
    _train_step(benchmark, path, torch.device("cpu"), CPU, rounds=7)


@pytest.mark.parametrize("budget", CPU["budgets"], ids=[f"{b}MiB" for b in CPU["budgets"]])
@pytest.mark.parametrize("path", throughput.PATHS)
def test_largest_batch_cpu(benchmark, path, budget):
    _largest_batch(benchmark, path, budget, torch.device("cpu"), CPU)


@needs_cuda
@pytest.mark.parametrize("path", throughput.PATHS)
def test_train_step_cuda(benchmark, path):
    _train_step(benchmark, path, torch.device("cuda"), GPU, rounds=5)


@needs_cuda
@pytest.mark.parametrize("budget", GPU["budgets"], ids=[f"{b}MiB" if b != "full" else b for b in GPU["budgets"]])
@pytest.mark.parametrize("path", throughput.PATHS)
def test_largest_batch_cuda(benchmark, path, budget):
    _largest_batch(benchmark, path, budget, torch.device("cuda"), GPU)
