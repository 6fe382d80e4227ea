"""The run folder of the trainer: atomic checkpoints (a save killed midway loses nothing), a run never mixed
into another, metrics cut back on resume, ``latest`` confined to the run, damaged checkpoints named."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.train.main import main

TINY = ["--batch-size", "4", "--n-train", "8", "--size", "32,32,16", "--lr", "1e-3", "--no-progress"]
REPO = Path(__file__).resolve().parents[2]


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A finished run of 2 steps with checkpoint-1 and checkpoint-2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["--steps", "2", "--checkpoint-every", "1", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run(two_steps, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(two_steps, out)
    return out


def test_new_run_into_a_run_folder_is_refused(run, capsys):
    """It was accepted without a word, and metrics.jsonl then read [1, 2, 1, 2]."""
    with pytest.raises(SystemExit) as e:
        main(["--steps", "2", "--out", str(run), *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"out {run} already holds a run" in err and "--resume latest" in err and "--overwrite" in err
    assert _steps(run) == [1, 2] and (run / "checkpoint-1").is_dir()  # untouched


def test_overwrite_discards_the_previous_run(run):
    (run / "notes.txt").write_text("mine")
    assert main(["--steps", "1", "--out", str(run), "--overwrite", *TINY]) == 0
    assert _steps(run) == [1]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert (run / "latest").read_text().strip() == "checkpoint-1"
    assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is removed


def test_resume_cuts_metrics_back_to_the_resumed_step(run):
    """Interrupted after step 2 was logged but before its checkpoint: metrics read [1, 2, 2, 3] before."""
    shutil.rmtree(run / "checkpoint-2")
    (run / "latest").write_text("checkpoint-1\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # a line cut short by the kill
    assert main(["--steps", "3", "--out", str(run), "--resume", "latest", *TINY]) == 0
    assert _steps(run) == [1, 2, 3]
    assert (run / "latest").read_text().strip() == "checkpoint-3"


def test_resume_from_an_earlier_checkpoint_of_the_run(run, capsys):
    """Resuming checkpoint-1 while checkpoint-2 exists would fork the run: refused, or later ones discarded."""
    argv = ["--steps", "3", "--out", str(run), "--resume", str(run / "checkpoint-1"), *TINY]
    with pytest.raises(SystemExit):
        main(argv)
    assert "checkpoint(s) after the resumed step 1 (checkpoint-2)" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert _steps(run) == [1, 2, 3]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-1", "checkpoint-3"]


def test_resume_of_another_runs_checkpoint_into_a_run_folder(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    argv = ["--steps", "3", "--out", str(run), "--resume", str(other / "checkpoint-1"), *TINY]
    with pytest.raises(SystemExit):
        main(argv)
    assert "is not one of its own" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # the old run discarded, the other one's continued here
    assert _steps(run) == [2, 3]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]


@pytest.mark.parametrize("content", ["../other/checkpoint-1", "/etc", "checkpoint-1/../../x", ""])
def test_latest_names_only_a_checkpoint_of_the_run(run, tmp_path, content, capsys):
    from medvl.models.checkpoint import checkpoint_dir

    shutil.copytree(run, tmp_path / "other")
    (run / "latest").write_text(content + "\n")
    with pytest.raises(SystemExit):
        main(["--steps", "3", "--out", str(run), "--resume", "latest", *TINY])
    err = capsys.readouterr().err
    assert f"{run / 'latest'} holds" in err and "not the name of a checkpoint-<step> folder" in err
    with pytest.raises(ValueError, match="not the name of a checkpoint-<step> folder"):
        checkpoint_dir(run)


@pytest.mark.parametrize("damage, named, says", [
    ("truncate model.safetensors", "model.safetensors", "not a readable safetensors file"),
    ("truncate state.pt", "state.pt", "cannot be read"),
    ("state.pt of another kind", "state.pt", "not the training state"),
])
def test_resume_from_a_damaged_checkpoint_names_the_file(run, damage, named, says, capsys):
    import torch

    path = run / "checkpoint-2" / named
    if damage.startswith("truncate"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
        torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(SystemExit) as e:
        main(["--steps", "3", "--out", str(run), "--resume", "latest", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and says in err and "Traceback" not in err


def test_resume_with_other_settings_says_which(run, capsys):
    with pytest.raises(SystemExit):
        main(["--steps", "3", "--out", str(run), "--resume", "latest", *TINY[:4], "--size", "64,64,32"])
    err = capsys.readouterr().err
    assert f"{run / 'checkpoint-2'} does not fit this run" in err and "size [32, 32, 16]" in err


_KILLED_SAVE = """
import os, signal, sys
import torch
import medvl.train.run_folder as run_folder

point = sys.argv[1]
if point == "state":      # half of state.pt written, then killed
    real_save = torch.save
    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save
else:                     # the checkpoint renamed into place, killed before latest names it
    real_write_latest = run_folder._write_latest
    def write_latest(out, name):
        if name == "checkpoint-3":
            os.kill(os.getpid(), signal.SIGKILL)
        real_write_latest(out, name)
    run_folder._write_latest = write_latest
from medvl.train.main import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("point", ["state", "latest"])
def test_a_save_killed_midway_loses_no_checkpoint(run, point, capsys):
    """Killed while saving checkpoint-3: latest still names checkpoint-2, which loads and resumes."""
    from medvl.models.checkpoint import checkpoint_dir, load_checkpoint

    argv = ["--steps", "3", "--out", str(run), "--resume", "latest", *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, point, *argv], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert checkpoint_dir(run) == run / "checkpoint-2"
    model, config = load_checkpoint(run)
    assert config["step"] == 2
    if point == "state":
        assert not (run / "checkpoint-3").exists() and list(run.glob(".checkpoint-3.partial-*"))
        assert main(argv) == 0  # the resume trains step 3 again and clears the partial folder
        assert not list(run.glob(".checkpoint-*"))
    else:
        assert (run / "checkpoint-3" / "state.pt").is_file()  # complete, only not yet named by latest
        with pytest.raises(SystemExit):  # neither silently dropped nor silently picked: the user chooses
            main(argv)
        assert f"resume the newest with --resume {run / 'checkpoint-3'}" in capsys.readouterr().err
        assert main(["--out", str(run), "--resume", str(run / "checkpoint-3"), "--steps", "4", *TINY]) == 0
    assert _steps(run) == [1, 2, 3] + ([4] if point == "latest" else [])
    assert (run / "latest").read_text().strip() == ("checkpoint-3" if point == "state" else "checkpoint-4")
