"""Backend choice for every op: each backend says why it can't take an input; the error lists them all.

Automatic order: a CUDA tensor tries cuda then triton; a CPU tensor tries cpu then reference.
`backend=` or the MEDVL_BACKEND environment variable forces one; a forced backend that can't run
raises with its reasons. An automatic fallback is logged once per (op, backend, reason).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

logger = logging.getLogger("medvl")
_logged_fallbacks: set = set()


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
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {name!r}")
    return name


def choose_backend(op: str, backends: Dict[str, Backend], backend, device: torch.device, *args) -> str:
    """Name of the backend that will run `op` on these inputs."""
    name = requested_backend(backend)
    if name != "auto":
        why = backends[name].reasons(*args)
        if why:
            raise BackendUnavailable(f"medvl.{op}: backend {name!r} can't run this input: " + "; ".join(why))
        return name
    declined: Dict[str, Sequence[str]] = {}
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        why = backends[candidate].reasons(*args)
        if not why:
            if declined:
                key = (op, candidate, tuple((k, tuple(v)) for k, v in declined.items()))
                if key not in _logged_fallbacks:
                    _logged_fallbacks.add(key)
                    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in declined.items())
                    logger.warning("medvl.%s runs on the %s backend (%s)", op, candidate, detail)
            return candidate
        declined[candidate] = why
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in declined.items())
    raise BackendUnavailable(f"medvl.{op}: no backend can run this input ({detail})")
