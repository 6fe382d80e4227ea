"""`medvl info` and `medvl bench` from the command line entry point."""

from __future__ import annotations

import medvl
from medvl import cli


def test_info_names_every_op_and_what_was_compiled(capsys):
    report = medvl.info()
    for op in ("sigmoid_loss", "triplet_mining", "patch_embed3d"):
        assert op in report["ops"]
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "cpu_backend" in printed and "patch_embed3d" in printed


def test_bench_runs_one_op_on_a_small_shape(capsys):
    assert cli.main(["bench", "--op", "triplet_mining", "--sizes", "64", "--repeats", "1",
                     "--methods", "reference"]) == 0
    table = capsys.readouterr().out
    assert "batch-hard mining" in table and "reference" in table


def test_train_command_is_handed_to_the_trainer(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--recipe", "no-such-recipe"])
    assert exit_info.value.code == 2
    assert "recipe" in capsys.readouterr().err


def test_demo_trains_then_evaluates(tmp_path):
    from medvl.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--batch-size", "4", "--n-train", "8", "--size", "32,32,16",
                 "--no-progress"]) == 0
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    results = __import__("json").loads((out / "eval" / "results.json").read_text())
    assert {"zeroshot", "retrieval", "localization"} <= set(results["results"])


def test_a_second_demo_replaces_the_first(tmp_path, monkeypatch):
    """medvl train refuses an out that holds a run; the demo's folder is its own, so it overwrites."""
    import medvl.eval.main
    import medvl.train.main
    from medvl.cli import main

    calls = []
    monkeypatch.setattr(medvl.train.main, "main", lambda argv: calls.append(("train", argv)) or 0)
    monkeypatch.setattr(medvl.eval.main, "main", lambda argv: calls.append(("eval", argv)) or 0)
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2"]) == 0
    assert calls[0] == ("train", ["--out", str(tmp_path / "d"), "--overwrite", "--steps", "2"])
    calls.clear()
    assert main(["demo", "--out", str(tmp_path / "d"), "--resume", "latest"]) == 0
    assert "--overwrite" not in calls[0][1]
