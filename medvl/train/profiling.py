"""``medvl train --profile``: a torch.profiler trace of a few steps and the time share of each part.

The trace (``OUT/profile/trace.json``) opens in chrome://tracing or https://ui.perfetto.dev. The step
is cut into ``record_function`` ranges (:data:`RANGES`); the fused ops appear under their own names
(``medvl::patch_embed3d``, ``medvl::sigmoid_loss_forward``, ...), since every medvl op is a
registered torch.library op and the dispatcher records it.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

__all__ = ["RANGES", "StepProfiler", "stage", "share_table"]

# The stages of one training step, as record_function names.
RANGES = ("medvl.data", "medvl.forward", "medvl.loss", "medvl.backward", "medvl.optimizer")


def stage(name: str, enabled: bool):
    """A record_function range when profiling, else a no-op context."""
    return record_function(name) if enabled else nullcontext()


class StepProfiler:
    """Profiles steps ``[wait + warmup, wait + warmup + active)`` of the run (counted from where it started,
    also when resumed)."""

    def __init__(self, out: Path, device: torch.device, *, wait: int = 1, warmup: int = 1, active: int = 3):
        self.out, self.active = Path(out), active
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                            record_shapes=False, profile_memory=True)
        self.done = False

    def __enter__(self):
        self.prof.__enter__()
        return self

    def step(self) -> None:
        self.prof.step()

    def __exit__(self, *exc) -> None:
        self.prof.__exit__(*exc)
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / "trace.json"))
        self.done = True

    def table(self) -> str:
        return share_table(self.prof.key_averages(), self.active)


def share_table(averages, steps: int) -> str:
    """The time of each step stage and each medvl op, total over the profiled steps and per step,
    as a share of the profiled time (stages add up to ~100 %; ops are inside the stages)."""
    rows: List[Tuple[str, float, int]] = []
    device_attr = "device_time_total" if hasattr(averages[0], "device_time_total") else "cuda_time_total"
    for event in averages:
        if event.key in RANGES or event.key.startswith("medvl::"):
            cpu_us = event.cpu_time_total
            dev_us = getattr(event, device_attr, 0) or 0
            rows.append((event.key, max(cpu_us, dev_us), event.count))
    total = sum(t for k, t, _ in rows if k in RANGES) or 1.0
    lines = [f"{'range / op':36s} {'calls':>6s} {'ms/step':>9s} {'share':>7s}"]
    order = {k: i for i, k in enumerate(RANGES)}
    rows.sort(key=lambda r: (r[0] not in order, order.get(r[0], 0), -r[1]))
    for key, us, count in rows:
        name = key if key in order else "  " + key
        lines.append(f"{name:36s} {count:6d} {us / 1e3 / max(steps, 1):9.2f} {100 * us / total:6.1f}%")
    return "\n".join(lines)
