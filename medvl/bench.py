"""`medvl bench`: every fused op against its baselines on synthetic tensors, as a table.

Times are medians over repeats (with p20/p80), taken after one warm-up; peak memory is the growth
of the process's peak RSS during the call on CPU (Linux), of torch's peak allocation on CUDA. The
limit of each op is measured in the same run: its FLOPs at the rate of a plain matmul of the same
size on the same device, so "of limit" reads as the fraction of the machine's GEMM rate reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device, repeats: int) -> List[float]:
    fn()  # warm-up: first-call costs (thread pools, kernel compilation) are not the op's
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
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


# ---------------------------------------------------------------------------------------------
# sigmoid_loss
# ---------------------------------------------------------------------------------------------


def _with_environment(variables: Dict[str, str], fn: Callable) -> Callable:
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


def sigmoid_loss_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> loss function(image, text, scale, bias) for every method runnable here."""
    import medvl
    from medvl.ops.sigmoid_loss import BACKENDS
    from medvl.reference.sigmoid_loss import sigmoid_loss as reference_loss

    methods: Dict[str, Callable] = {}
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(torch.empty(1, 1, device=device), torch.empty(1, 1, device=device)):
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is a test tool, not a benchmark
            methods[f"medvl-{name}"] = lambda x, t, s, b, name=name: medvl.sigmoid_loss(x, t, s, b, backend=name)
            if name == "triton":  # the other strategy of the Triton backend (the default is chunked)
                methods["medvl-triton-fused"] = _with_environment(
                    {"MEDVL_SIGMOID_STRATEGY": "fused"}, lambda x, t, s, b: medvl.sigmoid_loss(x, t, s, b, backend="triton"))
    methods["reference"] = reference_loss
    try:
        from open_clip.loss import SigLipLoss

        methods["open_clip"] = SigLipLoss()
    except ImportError:
        pass
    if device.type == "cuda":
        methods["reference-compiled"] = torch.compile(reference_loss)
        try:  # siglip-kernel (PyPI): a fused Triton SigLIP loss, pair targets only; its scale is exp(log_t)
            from siglip_kernel import fused_siglip_loss

            methods["siglip-kernel"] = lambda x, t, s, b: fused_siglip_loss(x, t, torch.log(s), b)
        except ImportError:
            pass
    return methods


def bench_sigmoid_loss(n: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int,
                       methods: Optional[List[str]] = None, n_text: Optional[int] = None,
                       target: str = "pair") -> List[Measurement]:
    """Forward + backward of every method at B_img = n against B_txt = n_text (default n). Targets
    other than "pair" (class labels, Jaccard of multi-hot labels) run on medvl's backends only."""
    import medvl

    n_text = n if n_text is None else n_text
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device, dtype).requires_grad_()
    t = F.normalize(torch.randn(n_text, dim, generator=generator), dim=-1).to(device, dtype).requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    labels = {}
    if target == "label":
        labels = {"image_labels": torch.randint(0, 64, (n,), generator=generator).to(device),
                  "text_labels": torch.randint(0, 64, (n_text,), generator=generator).to(device)}
    elif target == "jaccard":
        labels = {"image_labels": (torch.rand(n, 40, generator=generator) < 0.08).to(device),
                  "text_labels": (torch.rand(n_text, 40, generator=generator) < 0.08).to(device)}
    flops = 6.0 * n * n_text * dim  # logits, and the two gradient products
    shape = f"B={n}" if n_text == n else f"B_img={n} B_txt={n_text}"
    shape += f" D={dim} {str(dtype)[6:]}" + ("" if target == "pair" else f" target={target}")
    results = []
    for name, loss_fn in sigmoid_loss_methods(device).items():
        if methods and name not in methods:
            continue
        if n_text != n and not (name.startswith("medvl-") or name.startswith("reference")):
            continue  # open_clip and siglip-kernel take paired (square) batches only
        if target != "pair":
            if not name.startswith("medvl-"):
                continue
            backend = name.removeprefix("medvl-").removesuffix("-fused")
            loss_fn = lambda x, t, s, b, backend=backend: medvl.sigmoid_loss(  # noqa: E731
                x, t, s, b, target=target, backend=backend, **labels)
            if name.endswith("-fused"):
                loss_fn = _with_environment({"MEDVL_SIGMOID_STRATEGY": "fused"}, loss_fn)

        def step(loss_fn=loss_fn):
            for v in (x, t, s, b):
                v.grad = None
            loss_fn(x, t, s, b).backward()

        results.append(measure(BENCH_LABELS["sigmoid_loss"], shape, name, step, device, repeats, flops))
    return results


# ---------------------------------------------------------------------------------------------
# triplet_mining
# ---------------------------------------------------------------------------------------------


def triplet_mining_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> miner(embeddings, labels) for batch-hard mining, every method runnable here."""
    import medvl
    from medvl.ops.triplet_mining import BACKENDS
    from medvl.reference.triplet_mining import triplet_mining as reference_mining

    methods: Dict[str, Callable] = {}
    probe = torch.empty(1, 1, device=device)
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(probe, 0) and not (name == "triton" and device.type == "cpu"):
            methods[f"medvl-{name}"] = lambda x, y, name=name: medvl.triplet_mining(x, labels=y, backend=name)
    methods["reference"] = lambda x, y: reference_mining(x, labels=y)
    try:
        from pytorch_metric_learning import distances, miners

        miner = miners.BatchHardMiner(distance=distances.LpDistance(normalize_embeddings=False))
        methods["pytorch-metric-learning"] = lambda x, y: miner(x, y)
    except ImportError:
        pass
    return methods


def bench_triplet_mining(n: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int,
                         methods: Optional[List[str]] = None) -> List[Measurement]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, dim, generator=generator).to(device, dtype)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=generator).to(device)
    results = []
    for name, miner in triplet_mining_methods(device).items():
        if methods and name not in methods:
            continue
        results.append(measure(BENCH_LABELS["triplet_mining"], f"B={n} D={dim} {str(dtype)[6:]}", name,
                               lambda miner=miner: miner(x, labels), device, repeats, 2.0 * n * n * dim))
    return results


# ---------------------------------------------------------------------------------------------
# patch_embed3d
# ---------------------------------------------------------------------------------------------

CT_WINDOW = (-1000.0, 400.0)


def patch_embed3d_cases(device: torch.device):
    """(batch, size, patch, embed, volume dtype, parameter dtype) of the issue's benchmark shapes."""
    if device.type == "cuda":
        return [(8, (160, 224, 224), patch, 768, volume_dtype, torch.bfloat16)
                for patch in ((16, 16, 16), (4, 16, 16)) for volume_dtype in (torch.int16, torch.bfloat16)]
    return [(2, (128, 128, 128), (16, 16, 16), 768, torch.int16, torch.float32)]


def patch_embed3d_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> make(volume, weight, bias, pos, patch) -> step() running forward + backward (parameter grads)."""
    import medvl
    import torch.nn.functional as F
    from medvl.ops.patch_embed3d import BACKENDS

    def fused(name):
        def make(volume, weight, bias, pos, patch):
            def step():
                out = medvl.patch_embed3d(volume, weight, bias, pos, patch_size=patch, window=CT_WINDOW, backend=name)
                out.backward(torch.ones_like(out))
            return step
        return make

    def window(volume, dtype):
        lo, hi = CT_WINDOW
        return ((volume.float() - lo) / (hi - lo)).clamp(0.0, 1.0).to(dtype)

    def reshape_linear(volume, weight, bias, pos, patch):
        b, c, (s0, s1, s2), (p0, p1, p2) = volume.shape[0], volume.shape[1], volume.shape[2:], patch

        def step():
            x = window(volume, weight.dtype).reshape(b, c, s0 // p0, p0, s1 // p1, p1, s2 // p2, p2)
            x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * p0 * p1 * p2)
            out = F.linear(x, weight.reshape(weight.shape[0], -1), bias) + pos
            out.backward(torch.ones_like(out))
        return step

    def monai_conv(volume, weight, bias, pos, patch):
        from monai.networks.blocks import PatchEmbeddingBlock
        from monai.transforms import ScaleIntensityRange

        block = PatchEmbeddingBlock(in_channels=volume.shape[1], img_size=tuple(volume.shape[2:]), patch_size=patch,
                                    hidden_size=weight.shape[0], num_heads=12, proj_type="conv",
                                    pos_embed_type="learnable").to(device, weight.dtype)
        scale = ScaleIntensityRange(a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)

        def step():
            x = torch.as_tensor(scale(volume.float())).to(weight.dtype)
            out = block(x)
            out.backward(torch.ones_like(out))
            block.zero_grad(set_to_none=True)
        return step

    methods: Dict[str, Callable] = {}
    probe_volume = torch.empty(1, 1, 1, 1, 1, dtype=torch.int16, device=device)
    probe_weight = torch.empty(1, device=device)
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(probe_volume, probe_weight) and not (name == "triton" and device.type == "cpu"):
            methods[f"medvl-{name}"] = fused(name)
    try:
        import monai  # noqa: F401

        methods["monai-conv"] = monai_conv
    except ImportError:
        pass
    methods["reshape-linear"] = reshape_linear
    return methods


def patch_embed3d_gemm_seconds(tokens: int, columns: int, embed: int, dtype: torch.dtype, device: torch.device,
                               repeats: int) -> float:
    """Time of the op's two GEMMs (forward and weight gradient) with torch's matmul: the limit."""
    patches = torch.randn(tokens, columns, device=device, dtype=dtype)
    weight = torch.randn(embed, columns, device=device, dtype=dtype)
    grad_out = torch.randn(tokens, embed, device=device, dtype=dtype)
    times = time_call(lambda: (patches @ weight.T, grad_out.T @ patches), device, repeats)
    return statistics.median(times)


def patch_embed3d_inputs(case, device: torch.device) -> Dict[str, object]:
    """The volume and parameters of one benchmark case (parameters require grad)."""
    batch, size, patch, embed, volume_dtype, dtype = case
    generator = torch.Generator(device="cpu").manual_seed(0)
    if volume_dtype.is_floating_point:
        volume = (torch.rand((batch, 1, *size), generator=generator) * 3000 - 1024).to(device, volume_dtype)
    else:
        volume = torch.randint(-1024, 2000, (batch, 1, *size), generator=generator, dtype=torch.int16).to(device)
    tokens, columns = math.prod(s // p for s, p in zip(size, patch)), math.prod(patch)
    return {
        "volume": volume, "patch": patch, "tokens": batch * tokens, "columns": columns, "embed": embed,
        "weight": (torch.randn(embed, 1, *patch, generator=generator) * 0.02).to(device, dtype).requires_grad_(),
        "bias": torch.zeros(embed, device=device, dtype=dtype, requires_grad=True),
        "pos": (torch.randn(1, tokens, embed, generator=generator) * 0.02).to(device, dtype).requires_grad_(),
        "flops": 2 * 2.0 * batch * tokens * columns * embed,
        "shape": f"B={batch} {size[0]}x{size[1]}x{size[2]} {str(volume_dtype)[6:]} "
                 f"p={patch[0]}x{patch[1]}x{patch[2]} E={embed}",
    }


def patch_embed3d_step(make: Callable, inputs: Dict[str, object]) -> Callable[[], None]:
    """One forward + backward of a method; gradients are dropped first so that every method allocates them."""
    inner = make(inputs["volume"], inputs["weight"], inputs["bias"], inputs["pos"], inputs["patch"])
    params = [inputs["weight"], inputs["bias"], inputs["pos"]]

    def step():
        for p in params:
            p.grad = None
        inner()
    return step


def bench_patch_embed3d(case, device: torch.device, repeats: int, methods: Optional[List[str]] = None
                        ) -> List[Measurement]:
    inputs = patch_embed3d_inputs(case, device)
    volume = inputs["volume"]
    limit = patch_embed3d_gemm_seconds(inputs["tokens"], inputs["columns"], inputs["embed"], inputs["weight"].dtype,
                                       device, repeats)
    results = []
    for name, make in patch_embed3d_methods(device).items():
        if methods and name not in methods:
            continue
        m = measure(BENCH_LABELS["patch_embed3d"], inputs["shape"], name, patch_embed3d_step(make, inputs), device, repeats,
                    inputs["flops"])
        m.extra["limit_s"] = limit
        m.extra["volume_gbps"] = volume.numel() * volume.element_size() / m.median_s / 1e9
        results.append(m)
    return results


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
