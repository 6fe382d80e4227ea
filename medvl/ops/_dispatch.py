"""Backend choice for every op: each backend says why it can't take an input; the error lists them all.

Automatic order: a CPU tensor tries cpu then reference; a CUDA tensor tries the two GPU backends
in the order measured fastest on its device class (backend_order.json, refreshed by make gpu-check),
then reference. `backend=` or the MEDVL_BACKEND environment variable forces one; a forced backend
that can't run raises with its reasons. An automatic fallback is logged once per (op, backend,
reason). Everything the choice reads is fixed at first use (medvl.ops._core.device_facts), so under
torch.compile it is a constant and Dynamo never traces into medvl._C.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from medvl.ops import _core
from medvl.options import look_up_option

BACKENDS = ("cuda", "triton", "cpu", "reference")
CPU_ORDER = ("cpu", "reference")

logger = logging.getLogger("medvl")
_logged_fallbacks: set = set()

with open(os.path.join(os.path.dirname(__file__), "backend_order.json"), encoding="utf-8") as _handle:
    _BACKEND_ORDER = json.load(_handle)
_logged_unmeasured: set = set()


@torch.compiler.assume_constant_result
def gpu_order(op: str, device_class: str) -> Tuple[str, ...]:
    """The GPU backends for `op` on `device_class`, fastest first as measured (backend_order.json)."""
    classes = _BACKEND_ORDER["classes"]
    measured = classes.get(device_class)
    if measured is None or op not in measured:
        fallback = _BACKEND_ORDER["unmeasured"]
        if (op, device_class) not in _logged_unmeasured:
            _logged_unmeasured.add((op, device_class))
            logger.warning("medvl.%s: no backend timings for %s; using %s's order %s (make gpu-check measures it)",
                           op, device_class, fallback, classes[fallback][op]["order"])
        measured = classes[fallback]
    return tuple(measured[op]["order"])


def automatic_order(op: str, device: torch.device) -> Tuple[str, ...]:
    if device.type == "cuda":
        return gpu_order(op, _core.device_facts(device).device_class) + ("reference",)
    if device.type == "cpu":
        return CPU_ORDER
    return ("reference",)


class BackendUnavailable(RuntimeError):
    """A forced backend can't run this input, or no backend can."""


@dataclass(frozen=True)
class Backend:
    name: str
    # Returns the reasons this backend can't take the input; empty when it can.
    reasons: Callable[..., List[str]]


def requested_backend(backend) -> str:
    """The backend the caller asked for ('auto' when none), validated."""
    name = backend if backend is not None else os.environ.get("MEDVL_BACKEND", "auto")
    name = str(name).lower()
    return look_up_option(name, BACKENDS + ("auto",), name="backend")


def choose_backend(op: str, backends: Dict[str, Backend], backend, device: torch.device, *args) -> str:
    """Name of the backend that will run `op` on these inputs."""
    name = requested_backend(backend)
    if name != "auto":
        why = backends[name].reasons(*args)
        if why:
            raise BackendUnavailable(f"medvl.{op}: backend {name!r} can't run this input: " + "; ".join(why))
        return name
    declined: Dict[str, Sequence[str]] = {}
    for candidate in automatic_order(op, device):
        why = backends[candidate].reasons(*args)
        if not why:
            if declined:
                _report_fallback(op, candidate, tuple((k, tuple(v)) for k, v in declined.items()))
            return candidate
        declined[candidate] = why
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in declined.items())
    raise BackendUnavailable(f"medvl.{op}: no backend can run this input ({detail})")


@torch.compiler.assume_constant_result
def _report_fallback(op: str, candidate: str, declined: Tuple[Tuple[str, Tuple[str, ...]], ...]) -> bool:
    """Log an automatic fallback once (eagerly, also under torch.compile, which cannot trace a logger)."""
    key = (op, candidate, declined)
    if key not in _logged_fallbacks:
        _logged_fallbacks.add(key)
        detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in declined)
        logger.warning("medvl.%s runs on the %s backend (%s)", op, candidate, detail)
    return True
