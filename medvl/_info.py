"""What was compiled and what can run here: `medvl.info()` and `medvl info`."""

from __future__ import annotations

import platform
from typing import Any, Dict

import torch


def info() -> Dict[str, Any]:
    """Version, compiled backends, CUDA archs, and whether a GPU / Triton is usable (and why not)."""
    import medvl
    from medvl.ops import _core

    report: Dict[str, Any] = {
        "medvl": medvl.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
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
    ops = []
    for op in ("sigmoid_loss", "triplet_mining", "patch_embed3d"):
        compiled = [kind for kind in ("cpu", "cuda") if c is not None and hasattr(c, f"{op}_{kind}")]
        ops.append(f"{op} (compiled: {'+'.join(compiled) or 'none'})")
    report["ops"] = ", ".join(ops)
    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
    return report


def format_info(report: Dict[str, Any]) -> str:
    width = max(len(k) for k in report)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in report.items())
