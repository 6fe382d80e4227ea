"""What an evaluation task is: one :class:`Task` record per task module, from which the registry, evaluate()'s
choice of tasks, the report's sections, the figures and ``medvl eval --help`` are read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from medvl.eval.cache import CachedEncoder
from medvl.eval.eval_set import EvalSet
from medvl.eval.markdown import json_block

__all__ = ["NotEnoughData", "Plot", "Task", "as_numpy", "cutoffs"]

Result = Dict[str, Any]


class NotEnoughData(ValueError):
    """The evaluation set is too small (or too uniform) for a task; :func:`evaluate` records the reason."""


@dataclass(frozen=True)
class Plot:
    """A task's figure: drawn by ``draw(result, path)`` (which returns the path, or None when the result
    has nothing to draw) into ``filename``, listed under ``name`` in the summary's ``files``."""

    name: str
    filename: str
    draw: Callable[[Mapping[str, Any], Union[str, os.PathLike]], Optional[str]]


def _nothing_missing(data: EvalSet) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Task:
    """An evaluation task.

    Args:
        name: what ``--tasks`` and the results call it (its module's name).
        help: one line for ``medvl eval --help``.
        kinds: the data kinds ("ct", "mr") it applies to.
        needs: what it needs of the data, in words (said when it cannot run).
        run: ``run(encoder, data, **options)`` -> the result dict; raises :class:`NotEnoughData` when the
            set is too small for it.
        missing: what ``data`` (of one of ``kinds``) lacks for the task, in words, or None.
        seeded: ``run`` takes ``seed=`` (it draws at random: splits, shots, corruptions, a random baseline).
        report: the body of its report section, from its result; None: no section of its own.
        plot: its figure, or None.
    """

    name: str
    help: str
    kinds: Tuple[str, ...]
    needs: str
    run: Callable[..., Result]
    missing: Callable[[EvalSet], Optional[str]] = _nothing_missing
    seeded: bool = False
    report: Optional[Callable[[Mapping[str, Any]], str]] = json_block
    plot: Optional[Plot] = None

    def __call__(self, encoder, data, **options) -> Result:
        return self.run(encoder, data, **options)

    def requirement(self, data: EvalSet) -> Optional[str]:
        """None when the task can run on ``data``, else why not (what it needs)."""
        if data.kind not in self.kinds:
            return (f"task {self.name!r} applies to {' or '.join(k.upper() for k in self.kinds)} data "
                    f"({self.needs}); {data.source} is {data.kind.upper()}")
        missing = self.missing(data)
        if missing is not None:
            return f"task {self.name!r} needs {self.needs}; {data.source} has {missing}"
        return None

    def prepare(self, encoder, data) -> Tuple[CachedEncoder, EvalSet]:
        """(encoder, data) as the task runs them: a bare model gets a memory cache, a bare dataset is wrapped
        (CT when its samples carry findings labels); ValueError when the task cannot run on the data."""
        if not isinstance(encoder, CachedEncoder):
            encoder = CachedEncoder(encoder)
        if not isinstance(data, EvalSet):
            kind = "ct" if getattr(data[0], "labels", None) is not None else "mr"
            data = EvalSet.from_dataset(data, kind)
        reason = self.requirement(data)
        if reason:
            raise ValueError(reason)
        return encoder, data


def cutoffs(values: Sequence[int], n: int) -> List[int]:
    """The cut-offs (R@k, P@R, shots) that ``n`` items allow; [1] when none does."""
    kept = [k for k in values if k <= n]
    return kept or [1]


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 array (the metrics' input)."""
    return x.detach().cpu().double().numpy()
