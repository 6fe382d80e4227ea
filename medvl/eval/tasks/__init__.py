"""The evaluation tasks of a trained CLIP model on held-out data, one module each (``medvl/eval/tasks/<name>.py``),
each declaring its :class:`~medvl.eval.tasks.task.Task` record as ``TASK``.

Each task takes a :class:`~medvl.eval.cache.CachedEncoder` (or a bare CLIPModel) and an
:class:`~medvl.eval.eval_set.EvalSet` (or a dataset) and returns the dicts of :mod:`medvl.eval.metrics` /
:mod:`medvl.eval.probe`, plus, under ``"data"``, the per-sample values its plot is drawn from. Every volume and
text goes through the encoder's cache, so the tasks of one run share their encodings and a second run
re-encodes nothing.

A new task is a module here with its ``TASK`` (and its test), named in :data:`MODULES`: the registry, the data
each task applies to, what it needs, evaluate()'s choice and seeding, the report's sections, the figures and
``medvl eval --help`` are read from the records.
"""

from __future__ import annotations

from importlib import import_module
from typing import Dict, List, Optional, Sequence, Tuple, Union

from medvl.eval.eval_set import EvalSet
from medvl.eval.tasks.task import NotEnoughData, Plot, Task
from medvl.options import look_up_option, unknown_option

__all__ = ["MODULES", "NotEnoughData", "Plot", "TASKS", "TASK_KINDS", "Task", "parse_tasks", "task_requirement"]

# The task modules, in the order evaluate() runs them and the report and --help list them.
MODULES = ("zeroshot", "retrieval", "precision", "probe", "fewshot", "qc", "localization", "collapse")

TASKS: Dict[str, Task] = {task.name: task for task in (import_module(f"{__name__}.{m}").TASK for m in MODULES)}
# The data kinds each task applies to.
TASK_KINDS: Dict[str, Tuple[str, ...]] = {name: task.kinds for name, task in TASKS.items()}


def task_requirement(task: str, data: EvalSet) -> Optional[str]:
    """None when ``task`` can run on ``data``, else why not (what it needs)."""
    return TASKS[look_up_option(task, TASKS, name="task")].requirement(data)


def parse_tasks(tasks: Union[None, str, Sequence[str]]) -> Optional[List[str]]:
    """A list of task names from "a,b" or a sequence (order kept, duplicates dropped); None stays None."""
    if tasks is None:
        return None
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    names = [str(t).strip().lower() for t in tasks if str(t).strip()]
    if not names:
        raise ValueError(f"tasks: expected at least one of {', '.join(TASKS)}, got {tasks!r}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError("; ".join(str(unknown_option(t, TASKS, name="task")) for t in unknown))
    return list(dict.fromkeys(names))
