"""What the ops can run here, and why not: the backends' part of `medvl info`."""

from __future__ import annotations

from typing import Any, Dict

import torch

from medvl.ops import _core

OPS = ("sigmoid_loss", "triplet_mining", "patch_embed3d")


def backend_report() -> Dict[str, Any]:
    """compiled_core, cpu_backend, cuda_compiled, cuda_backend, triton_backend and ops, each a short line."""
    report: Dict[str, Any] = {}
    c = _core._C
    report["compiled_core"] = c is not None or _core.C_IMPORT_ERROR
    report["cpu_backend"] = (
        f"yes (OpenMP, {c.omp_max_threads()} threads max)" if c is not None else f"no: {_core.C_IMPORT_ERROR}"
    )
    if c is not None and c.cuda_compiled:
        report["cuda_compiled"] = f"yes, archs {c.cuda_archs}"
    else:
        report["cuda_compiled"] = "no" if c is not None else "unknown (no compiled core)"
    usable, why = _core.cuda_core_state()
    if usable:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        report["cuda_backend"] = f"yes: {', '.join(names) or 'device visible to medvl, not to torch'}"
    else:
        report["cuda_backend"] = f"no: {why}"
    problem = _core.triton_import_error()
    if problem:
        report["triton_backend"] = f"no: {problem}"
    else:
        import triton

        if torch.cuda.is_available():
            report["triton_backend"] = f"yes (triton {triton.__version__})"
        elif _core.triton_interpreter():
            report["triton_backend"] = f"interpreter only (triton {triton.__version__}, TRITON_INTERPRET=1, CPU tensors)"
        else:
            report["triton_backend"] = f"no: no CUDA device for triton {triton.__version__} (TRITON_INTERPRET=1 runs it on CPU, slowly)"
    entries = _core.C_ENTRIES
    report["ops"] = ", ".join(
        f"{op} (compiled: {'+'.join(k for k in ('cpu', 'cuda') if f'{op}_{k}' in entries) or 'none'})" for op in OPS)
    return report
