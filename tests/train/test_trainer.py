"""The trainer: loss falls, metrics, checkpoints round-trip, exact resume, gradient accumulation, CLI errors."""

import json
from pathlib import Path

import pytest
import torch

from medvl.train.main import main

TINY = ["--batch-size", "4", "--n-train", "16", "--size", "32,32,16", "--lr", "1e-3", "--log-every", "4"]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "siglip"
    assert main(["--steps", "12", "--checkpoint-every", "6", "--out", str(out), *TINY]) == 0
    return out


def test_loss_falls_and_metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "lr", "volumes_per_s", "contrastive"} <= set(r)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_checkpoint_layout_and_roundtrip(run):
    from medvl.models.factory import create_model
    from medvl.train.trainer import load_checkpoint_weights

    assert (run / "latest").read_text().strip() == "checkpoint-12"
    for step in (6, 12):
        assert (run / f"checkpoint-{step}" / "model.safetensors").is_file()
        state = torch.load(run / f"checkpoint-{step}" / "state.pt", weights_only=True)
        assert state["step"] == step and {"optimizer", "scheduler", "rng"} <= set(state)
    tensors = _weights(run / "checkpoint-12")
    model = create_model("vit3d-tiny", vision={"img_size": [32, 32, 16]})
    load_checkpoint_weights(run / "checkpoint-12", model)
    state = model.state_dict()
    model_keys = {k[len("model."):] for k in tensors if k.startswith("model.")}
    assert model_keys == set(state)
    for k in model_keys:
        assert torch.equal(state[k], tensors[f"model.{k}"]), k


def test_resume_equals_uninterrupted(run, tmp_path):
    out = tmp_path / "resumed"
    assert main(["--steps", "12", "--out", str(out), "--resume", str(run / "checkpoint-6"), *TINY]) == 0
    a, b = _weights(run / "checkpoint-12"), _weights(out / "checkpoint-12")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7, 13))


def test_accumulation_matches_big_batch():
    from medvl.data import collate
    from medvl.models.factory import create_model
    from medvl.train.data import synthetic_dataset
    from medvl.train.recipes import create_loss, get_recipe
    from medvl.train.trainer import DEFAULT_LOSS_WEIGHTS, _step_loss

    ds = synthetic_dataset("ct", 8, 0, (32, 32, 16))
    torch.manual_seed(0)
    model = create_model("vit3d-tiny", vision={"img_size": [32, 32, 16]}).eval()  # eval: no dropout
    loss_fn = create_loss(get_recipe("siglip", loss_weights=DEFAULT_LOSS_WEIGHTS["siglip"]))
    full = collate([ds[i] for i in range(8)])
    halves = [collate([ds[i] for i in range(4)]), collate([ds[i] for i in range(4, 8)])]

    def grads(micro):
        model.zero_grad(set_to_none=True)
        terms = _step_loss(model, loss_fn, micro)
        return terms["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, g_a = grads([full])
    loss_b, g_b = grads(halves)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert set(g_a) == set(g_b)
    for n in g_a:
        assert torch.allclose(g_a[n], g_b[n], atol=1e-5, rtol=1e-3), n


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope"], "invalid choice"),
    (["--data", "real"], "invalid choice"),
    (["--size", "32,32"], "three positive integers"),
    (["--steps", "0"], "positive integer"),
    (["--resume", "/nonexistent/checkpoint-3"], "does not exist"),
    (["--batch-size", "8", "--n-train", "4"], "at least batch_size"),
])
def test_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_latest_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--resume", "latest", "--out", str(tmp_path / "empty")])
    assert "no checkpoint" in capsys.readouterr().err
