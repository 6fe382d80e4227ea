"""What every benchmark of medvl bench shares: timing, peak memory, the GEMM rate (the limit), the
table, and the results file. Times are medians over repeats (with p20/p80), taken after one warm-up;
peak memory is the growth of the process's peak RSS during the call on CPU (Linux), of torch's peak
allocation on CUDA. The limit of each op is measured in the same run: its FLOPs at the rate of a plain
matmul of the same size on the same device, so "of limit" reads as the fraction of the GEMM rate.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

# What each op's rows are called in the tables and the saved results (bench/backend_order.py reads them).
BENCH_LABELS = {"sigmoid_loss": "sigmoid_loss fwd+bwd", "triplet_mining": "batch-hard mining",
                "patch_embed3d": "patch_embed3d fwd+bwd"}


@dataclass
class Measurement:
    op: str
    shape: str
    method: str
    median_s: float
    p20_s: float
    p80_s: float
    peak_mib: Optional[float]
    flops: float
    extra: Dict[str, float] = field(default_factory=dict)



# ---------------------------------------------------------------------------------------------
# Timing and peak memory
# ---------------------------------------------------------------------------------------------


def _read_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose 'mib' is set on exit to the peak extra memory used inside the block."""
    result: Dict[str, Optional[float]] = {"mib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    # Linux: return freed heap pages first (else memory freed by an earlier call hides this call's
    # growth), then writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        start = _read_status_kib("VmRSS")
    except OSError:
        start = None
    yield result
    peak = _read_status_kib("VmHWM")
    if start is not None and peak is not None:
        result["mib"] = (peak - start) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark_call(benchmark, fn: Callable[[], None], device: torch.device, rounds: int) -> Tuple[float, Optional[float]]:
    """Time ``fn`` (synchronised on ``device``) with pytest-benchmark's ``benchmark`` fixture, one warm-up
    round first, then measure its peak extra memory in one more call: (median seconds, peak MiB)."""
    def step():
        fn()
        sync(device)

    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    with peak_memory(device) as peak:
        step()
    return benchmark.stats.stats.median, peak["mib"]


def time_call(fn: Callable[[], None], device: torch.device, repeats: int) -> List[float]:
    fn()  # warm-up: first-call costs (thread pools, kernel compilation) are not the op's
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(op: str, shape: str, method: str, fn: Callable[[], None], device: torch.device, repeats: int,
            flops: float) -> Measurement:
    times = time_call(fn, device, repeats)
    with peak_memory(device) as peak:
        fn()
    return Measurement(op, shape, method, statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                       peak["mib"], flops)


def gemm_rate(n: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """FLOP/s of a plain (n x dim) @ (dim x n) matmul: the machine's limit for these ops."""
    a = torch.randn(n, dim, device=device, dtype=dtype)
    b = torch.randn(n, dim, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = time_call(lambda: torch.mm(a, b.T, out=out), device, repeats)
    return 2.0 * n * n * dim / statistics.median(times)



def with_environment(variables: Dict[str, str], fn: Callable) -> Callable:
    """fn run with `variables` set in the environment (and restored after)."""
    def run(*args):
        saved = {key: os.environ.get(key) for key in variables}
        os.environ.update(variables)
        try:
            return fn(*args)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run



# ---------------------------------------------------------------------------------------------
# Table, results file, command line
# ---------------------------------------------------------------------------------------------

PEERS = ("open_clip", "pytorch-metric-learning", "monai-conv", "reshape-linear", "reference-compiled", "reference")


def annotate(results: List[Measurement], rate: float) -> None:
    """Add ratio to the best peer and the fraction of the limit (FLOPs at the GEMM rate)."""
    by_shape: Dict[str, List[Measurement]] = {}
    for m in results:
        by_shape.setdefault(m.op + m.shape, []).append(m)
    for group in by_shape.values():
        peers = [m for m in group if m.method in PEERS]
        best = min(peers, key=lambda m: m.median_s) if peers else None
        for m in group:
            # Ops whose limit is not "these FLOPs at the square GEMM rate" set their own limit_s.
            limit = m.extra.get("limit_s", m.flops / rate)
            m.extra["limit_s"] = limit
            m.extra["of_limit"] = limit / m.median_s
            m.extra["achieved_gflops"] = m.flops / m.median_s / 1e9
            if best is not None:
                m.extra["speedup_vs_best_peer"] = best.median_s / m.median_s
                m.extra["best_peer"] = best.method  # type: ignore[assignment]
                if best.peak_mib and m.peak_mib is not None:
                    m.extra["memory_vs_best_peer"] = m.peak_mib / best.peak_mib


def format_table(results: List[Measurement]) -> str:
    header = ("op", "shape", "method", "median s", "p20-p80 s", "peak MiB", "GFLOP/s", "of limit", "vs best peer")
    rows = [header]
    for m in results:
        rows.append((
            m.op, m.shape, m.method, f"{m.median_s:.4f}", f"{m.p20_s:.4f}-{m.p80_s:.4f}",
            "-" if m.peak_mib is None else f"{m.peak_mib:.1f}",
            f"{m.extra.get('achieved_gflops', 0):.1f}", f"{100 * m.extra.get('of_limit', 0):.0f}%",
            f"{m.extra['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in m.extra else "-",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def environment(device: torch.device) -> Dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    facts = {"git_sha": sha or "unknown", "torch": torch.__version__, "triton": triton_version,
             "device": machine_name(device), "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts["device_class"] = f"sm_{major}{minor}"  # the key of medvl/ops/backend_order.json
    return facts


def save(results: List[Measurement], rate: float, device: torch.device, path: str) -> None:
    append_record({"environment": environment(device), "gemm_rate_gflops": rate / 1e9,
                   "results": [asdict(m) for m in results]}, path)


def append_record(record: Dict[str, object], path: str) -> None:
    """Append one run's record to the JSON list in ``path`` (created with its folder if missing)."""
    existing = []
    if os.path.exists(path):
        with open(path) as handle:
            existing = json.load(handle)
    existing.append(record)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(existing, handle, indent=1)


