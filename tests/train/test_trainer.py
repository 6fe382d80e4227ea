"""The trainer: loss falls, metrics, checkpoints round-trip, exact resume, gradient accumulation, CLI errors."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from medvl.train.main import main

TINY = ["--batch-size", "4", "--n-train", "16", "--size", "32,32,16", "--lr", "1e-3", "--log-every", "4"]



def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def _assert_trained_alike(a, b, *, lr, steps):
    """Two checkpoints trained on the same samples with the gradients summed in another order (micro-batches,
    ranks). Adam moves an entry by about lr * g / |g| a step, so a gradient near zero (a sum that cancels:
    several do once the towers standardise across the batch) whose rounding flips its sign moves the two runs'
    entries apart by up to 2 * lr a step: parameters agree to that bound, and beyond 2e-5 only in isolated
    entries. The standardisers' statistics are measured on the finished models: a flipped entry of a parameter
    that every token shares (the token-type embedding) shifts every text's features alike, which the means take
    up (to 1 % of their scale) and the standardisation removes; their counts agree exactly."""
    assert set(a) == set(b)
    for k in a:
        difference = (a[k] - b[k]).abs()
        if k.endswith(".num_samples"):
            assert torch.equal(a[k], b[k]), k
        elif "standardizer" in k:
            assert difference.max() <= 1e-2 * a[k].abs().max() + 1e-6, k
        else:
            assert difference.max() <= 2 * lr * steps, k
            assert int(difference.gt(2e-5).sum()) <= max(2, a[k].numel() // 100), k


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
    from medvl.train.run_folder import load_checkpoint_weights

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
    """Two micro-batches of 4 give the gradients of one batch of 8, with every siglip term on
    (contrastive, per-sample prompt variants, snippet localization)."""
    from medvl.data import collate
    from medvl.models.factory import create_model
    from medvl.data.sources import synthetic_dataset
    from medvl.train.radfinder_inputs import RadFinderInputs
    from medvl.data.phantoms import CT_FINDINGS
    from medvl.train.recipes import create_loss, get_recipe
    from medvl.train.trainer import _step_loss

    ds = synthetic_dataset("ct", 8, 0, (32, 32, 16))
    torch.manual_seed(0)
    model = create_model("vit3d-tiny", vision={"img_size": [32, 32, 16]})
    loss_fn = create_loss(get_recipe("siglip"), embed_dim=model.visual.embed_dim, proj_dim=model.embed_dim)
    loss_fn.prompts.init_from(model.visual.proj)
    side = RadFinderInputs(CT_FINDINGS, model.visual.patch_size[2], prompts=True, localization=True, seed=0)
    full = side.prepare(collate([ds[i] for i in range(8)]), 0)
    assert (full["depth_target"] >= 0).any(), "the phantoms should carry localizable snippets"
    # draws are per sample, so the halves draw what the full batch drew
    halves = [side.prepare(collate([ds[i] for i in rows]), 0) for rows in (range(4), range(4, 8))]
    assert torch.equal(torch.cat([h["prompt_template"] for h in halves]), full["prompt_template"])

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        terms = _step_loss(model, loss_fn, micro, side=side)
        named = list(model.named_parameters()) + [("loss." + n, p) for n, p in loss_fn.named_parameters()]
        return terms, {n: p.grad.clone() for n, p in named if p.grad is not None}

    terms_a, g_a = grads([full])
    terms_b, g_b = grads(halves)
    for key in ("loss", "contrastive", "prompts", "report_prompts", "localization"):
        assert torch.allclose(terms_a[key], terms_b[key], atol=1e-5), key
    assert terms_a["prompts"] > 0 and terms_a["report_prompts"] > 0 and terms_a["localization"] > 0
    assert set(g_a) == set(g_b) and "loss.prompts.head.weight" in g_a
    for n in g_a:
        # to rounding, relative to the tensor's scale: a gradient summed over every token (the token-type
        # embedding's) cancels to near zero in some entries, where an elementwise rtol measures only the order of
        # the sums (the prompt set is encoded once per micro-batch)
        scale = g_a[n].abs().max().item()
        assert (g_a[n] - g_b[n]).abs().max().item() <= 1e-4 * scale + 1e-6, n


def test_accum_steps_cli_equals_big_batch(tmp_path):
    """`--accum-steps 2 --batch-size 4` ends where `--batch-size 8` does (same samples, same draws)."""
    common = ["--steps", "2", "--n-train", "16", "--size", "32,32,16", "--lr", "1e-3", "--no-progress"]
    assert main([*common, "--batch-size", "8", "--out", str(tmp_path / "big")]) == 0
    assert main([*common, "--batch-size", "4", "--accum-steps", "2", "--out", str(tmp_path / "acc")]) == 0
    a, b = _weights(tmp_path / "big" / "checkpoint-2"), _weights(tmp_path / "acc" / "checkpoint-2")
    # the gradients agree to rounding (test_accumulation_matches_big_batch)
    _assert_trained_alike(a, b, lr=1e-3, steps=2)


def _ddp_rank(rank, world, port, out, recipe):
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from medvl.train.trainer import TrainConfig, train

    train(TrainConfig(recipe=recipe, steps=1, batch_size=4, n_train=16, size=(32, 32, 16), lr=1e-3, out=out))


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", ["siglip", "mrclip"])
def test_two_gloo_ranks_equal_one_process(recipe, tmp_path):
    """2 ranks x 4 volumes = 1 process x 8 volumes: the same loss and the same parameters after a step."""
    import socket

    from medvl.train.trainer import TrainConfig, train
    from tests.utils import spawn_ranks

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spawn_ranks(_ddp_rank, 2, 2, port, str(tmp_path / "ddp"), recipe)
    train(TrainConfig(recipe=recipe, steps=1, batch_size=8, n_train=16, size=(32, 32, 16), lr=1e-3,
                      out=str(tmp_path / "one")))
    rows = [json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("ddp", "one")]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5, abs=1e-6)
    a, b = _weights(tmp_path / "ddp" / "checkpoint-1"), _weights(tmp_path / "one" / "checkpoint-1")
    # the gradients themselves agree to rounding (tests/models/test_standardize.py, the losses' tests)
    _assert_trained_alike(a, b, lr=1e-3, steps=1)
    before = _weights_at_init(recipe)
    assert any(not torch.equal(before[k], b[k]) for k in before), "the step changed nothing"


def _weights_at_init(recipe):
    from medvl.models.factory import create_model
    from medvl.train.trainer import _seed_everything

    _seed_everything(0)
    window = {} if recipe != "mrclip" else {"window": None}
    model = create_model("vit3d-tiny", vision={"img_size": [32, 32, 16], **window})
    return {f"model.{k}": v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe", ["mrclip", "medtrim", "soft"])
def test_each_recipe_trains(recipe, tmp_path):
    out = tmp_path / recipe
    assert main(["--recipe", recipe, "--steps", "2", "--out", str(out), "--no-progress", *TINY]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    config = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert config["recipe"] == recipe and config["data_kind"] == ("mr" if recipe == "mrclip" else "ct")


def test_outputs_progress_and_profile(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["--steps", "6", "--out", str(out), "--profile", *TINY]) == 0
    captured = capsys.readouterr()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"medvl.forward", "medvl.backward", "medvl::patch_embed3d", "medvl::sigmoid_loss_forward"} <= names
    assert "medvl::patch_embed3d" in captured.out and "share" in captured.out
    assert "train:" in captured.err  # the tqdm bar
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_mib"] > 0 and r["prompts"] > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "nope"], "invalid choice"),
    (["--data", "/nonexistent/manifest.csv"], "neither synthetic-ct"),
    (["--loss-weight", "nope=1"], "a term of recipe 'siglip' must be one of"),
    (["--loss-weight", "prompts"], "TERM=WEIGHT"),
    (["--size", "32,32"], "three positive integers"),
    (["--steps", "0"], "positive integer"),
    (["--resume", "/nonexistent/checkpoint-3"], "does not exist"),
    (["--batch-size", "8", "--n-train", "4"], "at least batch_size"),
    (["--model", "bogus"], "model must be one of 'vit3d-"),
    (["--patch-size", "5,5,5"], "size 64,64,32 must be a multiple of the patch size 5,5,5"),
    (["--grad-clip", "nan"], "expected a finite number (0 turns clipping off)"),
    (["--grad-clip", "inf"], "expected a finite number"),
    (["--recipe", "medtrim", "--batch-size", "1"], "the loss would be 0 at every step; use a batch size of 2"),
    (["--recipe", "mrclip", "--batch-size", "1"], "the loss would be 0 at every step"),
])
def test_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "o").write_text("not a folder")
    with pytest.raises(SystemExit):
        main(["--steps", "1", "--out", str(tmp_path / "o"), *TINY])
    assert f"out '{tmp_path / 'o'}' is a file" in capsys.readouterr().err


def test_batch_of_one_is_fine_for_siglip_and_accumulation_counts(tmp_path):
    """The minimum is on the samples a loss sees: accumulating two batches of one gives two."""
    from medvl.train.trainer import TrainConfig

    TrainConfig(recipe="siglip", batch_size=1, out=str(tmp_path / "a")).validate()
    TrainConfig(recipe="medtrim", batch_size=1, accum_steps=2, out=str(tmp_path / "b")).validate()


def test_a_phantom_share_must_be_one(tmp_path):
    from medvl.data.phantom_share import PhantomShare
    from medvl.train.trainer import TrainConfig

    TrainConfig(out=str(tmp_path / "a"), phantom_share=PhantomShare(tmp_path, consumers=2)).validate()
    with pytest.raises(TypeError, match="phantom_share must be a medvl.data.phantom_share.PhantomShare or None, got str"):
        TrainConfig(out=str(tmp_path / "b"), phantom_share=str(tmp_path)).validate()


def test_resume_latest_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--resume", "latest", "--out", str(tmp_path / "empty")])
    assert "no checkpoint" in capsys.readouterr().err


def _manifest(tmp_path, n, truncated_row=None):
    """A CSV manifest of `n` small int16 CT NIfTI volumes with reports; row `truncated_row` is corrupt."""
    import csv

    import nibabel as nib
    import numpy as np

    rows = []
    for i in range(n):
        hu = np.random.default_rng(i).integers(-1000, 1500, size=(32, 32, 16)).astype(np.int16)
        path = tmp_path / f"vol{i}.nii.gz"
        img = nib.Nifti1Image(hu, np.diag([1.5, 1.5, 3.0, 1.0]))
        img.header.set_data_dtype(np.int16)
        nib.save(img, str(path))
        if truncated_row == i + 1:
            with open(path, "r+b") as f:  # header intact, voxels cut short
                f.truncate(path.stat().st_size // 2)
        rows.append([path.name, f"Report {i}: {'nodule' if i % 2 else 'no nodule'} in the right upper lobe."])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["volume", "report"], *rows])
    return manifest


def test_manifest_corrupt_volume_and_skip_bad(tmp_path, capsys):
    manifest = _manifest(tmp_path, 9, truncated_row=3)
    common = ["--data", str(manifest), "--steps", "2", "--batch-size", "4", "--size", "32,32,16", "--no-progress",
              "--loss-weight", "prompts=0", "--loss-weight", "report_prompts=0", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as e:
        main([*common, "--out", str(tmp_path / "strict")])
    assert e.value.code == 2
    assert re.search(r"medvl train: error: row 3: .*vol2.nii.gz.*--skip-bad", capsys.readouterr().err)
    assert main([*common, "--skip-bad", "--out", str(tmp_path / "lenient")]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable volume(s): row 3" in out
    config = json.loads((tmp_path / "lenient" / "checkpoint-2" / "config.json").read_text())
    assert config["data"] == str(manifest)
    assert any((tmp_path / "cache").rglob("*.safetensors"))
