"""Loading a checkpoint back: a damaged or tampered one is refused naming the file, before a model is built."""

import json
import shutil

import pytest
import torch

from medvl.models.checkpoint import checkpoint_dir, checkpoint_name, checkpoint_step, load_checkpoint, read_latest


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from medvl.train.main import main

    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["--steps", "1", "--batch-size", "2", "--n-train", "2", "--size", "32,32,16", "--no-progress",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def test_names():
    assert checkpoint_name(12) == "checkpoint-12" and checkpoint_step("checkpoint-12") == 12
    for name in ("checkpoint-", "checkpoint-1/..", "../checkpoint-1", "checkpoint-1x", "/checkpoint-1"):
        assert checkpoint_step(name) is None


def test_round_trip(run):
    model, config = load_checkpoint(run)
    assert config["step"] == 1 and not model.training
    assert read_latest(run) == run / "checkpoint-1" == checkpoint_dir(run)


def _config(run):
    return run / "checkpoint-1" / "config.json"


def test_tampered_config_is_refused_before_allocating(run, monkeypatch):
    """An edited embed_dim asked for a 422 TB allocation: the shapes are compared on the meta device first."""
    config = json.loads(_config(run).read_text())
    config["model_config"]["vision"]["embed_dim"] = 96 * 10 ** 5  # 1.8 TB of weights, but no overflow on meta
    _config(run).write_text(json.dumps(config))
    import medvl.models.volume_encoder as volume_encoder

    built = []
    real = volume_encoder.VolumeEncoder.__init__
    monkeypatch.setattr(volume_encoder.VolumeEncoder, "__init__",
                        lambda self, *a, **k: (built.append(torch.empty(0).device.type), real(self, *a, **k))[1])
    with pytest.raises(ValueError, match=r"config.json does not describe the weights in .*model.safetensors "
                                         r"\(visual\.[a-z_.]+: config \(.*9600000.*\), weights \("):
        load_checkpoint(run)
    assert built == ["meta"]  # never built for real


@pytest.mark.parametrize("edit, says", [
    (lambda c: c["model_config"].pop("vision"), "'model_config' lacks vision"),
    (lambda c: c.pop("model_config"), "no 'model_config' object"),
    (lambda c: c["model_config"].__setitem__("embed_dim", "64"), "'embed_dim' is '64', not a positive integer"),
])
def test_config_without_what_loading_needs(run, edit, says):
    """KeyError 'vision' before."""
    config = json.loads(_config(run).read_text())
    edit(config)
    _config(run).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: .*{says}"):
        load_checkpoint(run)


def test_config_that_is_not_json_is_named(run):
    _config(run).write_text('{"model_config": ')
    with pytest.raises(ValueError, match=r"checkpoint-1/config.json: not valid JSON"):
        load_checkpoint(run)


def test_truncated_weights_are_named(run):
    weights = run / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file .*damaged"):
        load_checkpoint(run)


def test_config_too_large_to_build_even_on_meta(run):
    config = json.loads(_config(run).read_text())
    config["model_config"]["vision"]["embed_dim"] = 96 * 10 ** 7  # the storage size overflows
    _config(run).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not describe a model that fits the weights"):
        load_checkpoint(run)
