"""What every op shares: the compiled core, Triton's availability, dtype codes, pointers."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

try:
    from medvl import _C  # the compiled core (C++/OpenMP, CUDA when compiled)

    C_IMPORT_ERROR: Optional[str] = None
except ImportError as error:  # a source checkout that was never built
    _C = None
    C_IMPORT_ERROR = f"medvl._C failed to import ({error}); reinstall with `pip install .`"

# Codes shared with csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FUSED_DTYPES = tuple(DTYPE_CODES)


def dtype_reasons(tensor: torch.Tensor) -> List[str]:
    """Why a fused backend can't take this dtype (empty when it can)."""
    if tensor.dtype not in FUSED_DTYPES:
        return [f"dtype {tensor.dtype} is not one of float32, bfloat16, float16"]
    return []


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


@functools.lru_cache(maxsize=None)
def cuda_core_state() -> Tuple[bool, str]:
    """(usable, why not) for the compiled CUDA kernels."""
    if _C is None:
        return False, C_IMPORT_ERROR
    if not _C.cuda_compiled:
        return False, "medvl was built without CUDA (no nvcc at build time, or MEDVL_CUDA=OFF)"
    count, why = _C.cuda_device_count()
    if count == 0:
        return False, f"no usable CUDA device (cudaGetDeviceCount: {why})"
    return True, ""


def cuda_arch_supported(device: torch.device) -> Optional[str]:
    """None when the compiled CUDA archs can run on `device`, else the reason."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = [a for a in _C.cuda_archs.split(",") if a]
    for arch in archs:
        digits = arch.rstrip("af")
        if not digits.isdigit():
            continue
        a_major, a_minor = int(digits[:-1]), int(digits[-1])
        exact_only = arch.endswith(("a", "f"))  # arch-specific cubins run only on that arch
        if (a_major, a_minor) == (major, minor) or (not exact_only and a_major == major and a_minor <= minor):
            return None
    return f"compiled for sm_{{{','.join(archs)}}}, device is sm_{major}{minor}; rebuild with MEDVL_CUDA_ARCHS"


# ---------------------------------------------------------------------------------------------
# What the backend choice may know: found once per device (or kernel module), then constant.
# torch.compile calls these eagerly and bakes their results into the graph
# (torch.compiler.assume_constant_result), so Dynamo never traces into medvl._C or an import.
# ---------------------------------------------------------------------------------------------


class DeviceFacts(NamedTuple):
    device_class: str  # "cpu", or "sm_90" for a CUDA device of compute capability 9.0
    cuda_problem: Optional[str]  # why the compiled CUDA kernels can't run there; None when they can
    triton_problem: Optional[str]  # why the Triton kernels can't


_DEVICE_FACTS: Dict[Tuple[str, int], DeviceFacts] = {}
_KERNEL_MODULE_PROBLEMS: Dict[str, Optional[str]] = {}
# The compiled entry points, fixed at import: `name in C_ENTRIES` is plain Python under tracing.
C_ENTRIES = frozenset(dir(_C)) if _C is not None else frozenset()


def _find_device_facts(device_type: str, index: int) -> DeviceFacts:
    triton_problem = triton_import_error()
    if device_type == "cuda":
        device = torch.device("cuda", index if index >= 0 else torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(device)
        usable, why_not = cuda_core_state()
        cuda_problem = (why_not or None) if not usable else cuda_arch_supported(device)
        return DeviceFacts(f"sm_{major}{minor}", cuda_problem, triton_problem)
    if triton_problem is None:
        if device_type == "cpu" and not triton_interpreter():
            triton_problem = "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        elif device_type != "cpu":
            triton_problem = f"tensors are on {device_type}"
    return DeviceFacts(device_type, f"tensors are on {device_type}, not a CUDA device", triton_problem)


@torch.compiler.assume_constant_result
def _device_facts(device_type: str, index: int) -> DeviceFacts:
    key = (device_type, index)
    if key not in _DEVICE_FACTS:
        _DEVICE_FACTS[key] = _find_device_facts(device_type, index)
    return _DEVICE_FACTS[key]


def device_facts(device: torch.device) -> DeviceFacts:
    return _device_facts(device.type, -1 if device.index is None else device.index)


@torch.compiler.assume_constant_result
def kernel_module_problem(op: str) -> Optional[str]:
    """Why medvl.kernels.<op> can't be imported (None when it can)."""
    if op not in _KERNEL_MODULE_PROBLEMS:
        problem = triton_import_error()
        if problem is None:
            try:
                importlib.import_module(f"medvl.kernels.{op}")
            except ImportError as error:
                problem = f"medvl.kernels.{op} failed to import ({error})"
        _KERNEL_MODULE_PROBLEMS[op] = problem
    return _KERNEL_MODULE_PROBLEMS[op]


def cpu_threads() -> int:
    return max(1, torch.get_num_threads())


def pointer(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None or tensor.numel() == 0 else tensor.data_ptr()


def workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """Scratch memory from torch's allocator (the caching allocator on CUDA); empty, with a null
    pointer, when a kernel needs none."""
    return torch.empty(max(int(nbytes), 0), dtype=torch.uint8, device=device)


# Why each kind of fused backend can't take a tensor; the ops add their own limits on top.


def cpu_backend_reasons(tensor: torch.Tensor, entry: str) -> List[str]:
    """The compiled CPU kernel `entry` of medvl._C."""
    if _C is None:
        return [C_IMPORT_ERROR]
    why = [] if entry in C_ENTRIES else [f"medvl._C was built without {entry}"]
    if tensor.device.type != "cpu":
        why.append(f"tensors are on {tensor.device}, not the CPU")
    return why + dtype_reasons(tensor)


def cuda_backend_reasons(tensor: torch.Tensor, entry: str) -> List[str]:
    """The compiled CUDA kernel `entry` of medvl._C."""
    problem = device_facts(tensor.device).cuda_problem
    if problem:
        return [problem]
    if entry not in C_ENTRIES:
        return [f"medvl._C was built without {entry}"]
    return dtype_reasons(tensor)


def triton_backend_reasons(tensor: torch.Tensor, op: str) -> List[str]:
    """The Triton kernels of `op`: a CUDA device, or CPU tensors under the interpreter."""
    problem = device_facts(tensor.device).triton_problem or kernel_module_problem(op)
    return ([problem] if problem else []) + dtype_reasons(tensor)
