"""What was compiled and what can run here: `medvl.info()` and `medvl info`."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any, Dict

import torch


def info() -> Dict[str, Any]:
    """Version, compiled backends, CUDA archs, and whether a GPU / Triton is usable (and why not)."""
    from medvl.ops.report import backend_report

    report: Dict[str, Any] = {
        "medvl": version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    report.update(backend_report())
    report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible to torch"
    return report


def version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    try:
        return importlib.metadata.version("medvl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def format_info(report: Dict[str, Any]) -> str:
    width = max(len(k) for k in report)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in report.items())
