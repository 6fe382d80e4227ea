"""Shared test helpers: which backends run here, the tolerance tables, what a share is, and spawned ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict

import torch

from medvl.ops import _core

# Absolute/relative tolerances against a float64 reference computed on the same (upcast) inputs.
# For float16/bfloat16 the rule is flash-attention's: our error may be at most twice the error of
# plain PyTorch in that dtype (both against the float64 reference), plus the atol below.
TOLERANCES = {
    torch.float64: {"forward": (1e-10, 1e-10), "backward": (1e-9, 1e-10)},
    torch.float32: {"forward": (2e-5, 2e-5), "backward": (1e-4, 2e-5)},
    torch.float16: {"forward": (0.0, 1e-3), "backward": (0.0, 1e-3)},
    torch.bfloat16: {"forward": (0.0, 1e-2), "backward": (0.0, 1e-2)},
}


def available_backends():
    """(backend, device) pairs that can run on this machine."""
    pairs = [("reference", "cpu")]
    if _core._C is not None:
        pairs.append(("cpu", "cpu"))
    if _core.triton_import_error() is None:
        pairs.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if _core.cuda_core_state()[0] and torch.cuda.is_available():
        pairs.append(("cuda", "cuda"))
    return pairs


def backend_params():
    import pytest

    return [pytest.param(name, device, id=f"{name}-{device}") for name, device in available_backends()]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str, name: str = "",
                 plain: torch.Tensor = None) -> None:
    """Compare to a float64 reference; for low precision also bound by 2x plain PyTorch's error."""
    rtol, atol = TOLERANCES[dtype][kind]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    if plain is not None:
        plain_error = (plain.detach().double().cpu() - expected).abs().max().item()
        bound = 2 * plain_error + atol
        assert error.max().item() <= bound, (
            f"{name} ({dtype}, {kind}): max error {error.max().item():.3g} > 2 x plain PyTorch's "
            f"{plain_error:.3g} + {atol}"
        )
        return
    allowed = atol + rtol * expected.abs()
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (
        f"{name} ({dtype}, {kind}): |{actual.flatten()[worst].item():.8g} - {expected.flatten()[worst].item():.8g}|"
        f" = {error.flatten()[worst].item():.3g} exceeds atol {atol} + rtol {rtol}"
    )


def is_share(value) -> bool:
    """A metric that is a share (AUC, accuracy, R@k): in [0, 1], or None where it cannot be measured."""
    return value is None or 0.0 <= value <= 1.0
# A module in plain PyTorch against its loop-by-loop reference (medvl.nn losses against medvl.reference): the same
# sums in another order, in the inputs' dtype.
MODULE_TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def leaves(*tensors: torch.Tensor, dtype: torch.dtype):
    """Copies of ``tensors`` in ``dtype`` that require grad: the inputs of one side of a comparison."""
    return [t.to(dtype).clone().requires_grad_(True) for t in tensors]


def assert_matches_reference(fn, ref, inputs, dtype: torch.dtype) -> None:
    """``fn(*inputs)`` equals ``ref(*inputs)`` in value and in the gradient of every input (MODULE_TOLERANCES)."""
    a, b = leaves(*inputs, dtype=dtype), leaves(*inputs, dtype=dtype)
    out, expected = fn(*a), ref(*b)
    torch.testing.assert_close(out, expected, **MODULE_TOLERANCES[dtype])
    out.backward()
    expected.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **MODULE_TOLERANCES[dtype])


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, *args: str, env: Dict[str, str] = None) -> dict:
    """Run `python -c script args` in a fresh process (2 threads, extra environment `env`) from the
    repository root and return the JSON object it prints last: for what a process decides once
    (the CPU instruction set) or measures about itself (peak memory)."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rank_then_exit(rank: int, fn, args) -> None:
    fn(rank, *args)  # an exception here reaches torch.multiprocessing with its traceback, as usual
    # After a rank's checks have all passed, the interpreter's exit can race torch's gloo worker
    # thread: it drops its last reference to a finished collective's tensors, which takes the GIL,
    # and a thread taking the GIL during finalization is ended by pthread_exit, whose unwinding
    # through a noexcept destructor calls std::terminate (SIGABRT; core dump read with gdb: the
    # stack is ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> decref -> take_gil -> pthread_exit).
    # Seen in about 1 of 20 runs of 4 ranks on 2 busy cores. Leaving without finalization keeps a
    # passed rank from being reported as crashed; a failed check still fails the test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args) -> None:
    """Run fn(rank, *args) in `world` spawned processes (fn importable at module level); raise if one fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_then_exit, args=(fn, args), nprocs=world, join=True, start_method="spawn")
