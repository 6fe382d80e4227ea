"""The task records and what is read from them: the registry, requirements, parsing --tasks, the help."""

import inspect

import pytest

from medvl.eval.tasks import MODULES, TASK_KINDS, TASKS, NotEnoughData, Task, parse_tasks, task_requirement


def test_each_module_declares_its_task_under_its_own_name():
    from importlib import import_module

    assert list(TASKS) == list(MODULES)
    for name, task in TASKS.items():
        assert import_module(f"medvl.eval.tasks.{name}").TASK is task and task.name == name
        assert isinstance(task, Task) and task.help and task.needs
        assert set(task.kinds) <= {"ct", "mr"} and TASK_KINDS[name] == task.kinds
        # evaluate() hands its seed to exactly the tasks that take one
        assert ("seed" in inspect.signature(task.run).parameters) == task.seeded, name


def test_requirement_says_what_a_task_needs_and_what_the_data_lacks(ct, mr):
    _, ct_set = ct
    _, mr_set = mr
    assert task_requirement("retrieval", ct_set) is None and task_requirement("qc", mr_set) is None
    assert task_requirement("qc", ct_set).startswith("task 'qc' applies to MR data (MR series with acquisition")
    assert task_requirement("probe", ct_set) == (
        f"task 'probe' needs {TASKS['probe'].needs}; synthetic-ct has no single-label class on every sample")
    with pytest.raises(ValueError, match=r"^task must be one of 'zeroshot', 'retrieval', .*, got 'bogus'$"):
        task_requirement("bogus", ct_set)


def test_a_task_record_runs_its_function(ct):
    result = TASKS["retrieval"](*ct)
    assert result == TASKS["retrieval"].run(*ct) and result["n"] == 16


def test_parse_tasks():
    assert parse_tasks(None) is None
    assert parse_tasks(" QC, probe,qc ") == ["qc", "probe"]
    assert parse_tasks(["retrieval"]) == ["retrieval"]
    with pytest.raises(ValueError, match=r"got 'zero-shot'; did you mean 'zeroshot'\?; task must be .*, got 'qc2'"):
        parse_tasks("zero-shot,retrieval,qc2")  # every unknown name, each with its likely meaning
    with pytest.raises(ValueError, match="expected at least one of"):
        parse_tasks(" , ")


def test_not_enough_data_is_a_value_error():
    assert issubclass(NotEnoughData, ValueError)


def test_eval_help_lists_every_task():
    from medvl.eval.main import build_eval_parser

    text = build_eval_parser().format_help()
    for name, task in TASKS.items():
        assert any(line.split()[:1] == [name] and task.help in line for line in text.splitlines()), name
