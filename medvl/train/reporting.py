"""What a training run shows a person: a progress bar, ``loss.png``, TensorBoard scalars, peak memory.

Only the main rank reports. TensorBoard is used when its package is installed (``pip install
tensorboard``), and silently skipped otherwise: it is a convenience, the metrics live in
``metrics.jsonl`` either way.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

__all__ = ["peak_memory_mib", "Progress", "plot_loss", "tensorboard_writer"]


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class Progress:
    """A tqdm bar over optimiser steps (loss, volumes/s, peak memory), or nothing when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc="train")

    def update(self, record: Dict[str, Any], peak_mib: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", vol_s=f"{record['volumes_per_s']:.1f}",
                                 peak=f"{peak_mib:.0f}MiB", refresh=False)
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_metrics(path: Path) -> List[Dict[str, Any]]:
    rows: Dict[int, Dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row  # a resumed run rewrites steps after its checkpoint: keep the last
    return [rows[k] for k in sorted(rows)]


def plot_loss(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """``png_path``: the loss (and each loss term) against the step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(Path(metrics_path))
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    terms = [k for k in rows[-1] if k not in ("step", "loss", "lr", "volumes_per_s", "peak_memory_mib")
             and isinstance(rows[-1][k], (int, float))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="loss", linewidth=2)
    for term in terms:
        ax.plot(steps, [r.get(term, float("nan")) for r in rows], label=term, linewidth=1, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def tensorboard_writer(log_dir: Path):
    """A ``SummaryWriter`` on ``log_dir`` when TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError):
        return None
    return SummaryWriter(log_dir=str(log_dir))
