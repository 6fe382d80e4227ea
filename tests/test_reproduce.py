"""`medvl reproduce` end to end at toy scale: every seed trains, evaluates and writes the keys the issue names."""

import json
import re

import pytest
import torch

from medvl.reproduce import reproduce
from tests.utils import is_share

TOY = dict(steps=2, eval_n=24, n_train=16, batch_size=8, size=(32, 32, 16), cnn_epochs=2)


def test_radfinder_keys(tmp_path):
    r = reproduce("radfinder", tmp_path, log=None, **TOY)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("localization_mae_mm", "centre_mae_mm", "random_mae_mm", "mean_depth_mae_mm"):
        assert saved[key] is not None and saved[key] >= 0, key
    for variant in ("with_localization", "without_localization"):
        assert is_share(r[variant]["zeroshot_macro_auc"]) and is_share(r[variant]["retrieval_volume_to_text_R@1"])
        assert is_share(r[variant]["probe_macro_auc"]) and -1 <= r[variant]["prompt_direction_cosine"] <= 1
        assert r[variant]["retrieval_chance"] == {"R@1": 1 / 24, "R@5": 5 / 24, "R@10": 10 / 24}
        assert r[variant]["diagnostics"]["loss"]["collapsed_level"] > 0
    assert r["localization_mae_mm"] == r["with_localization"]["localization_mae_mm"]
    _check_floors(r, tmp_path, 6)
    # the seed's own settings (SEED_SETTINGS) reach both trainings
    for variant in ("with_localization", "without_localization"):
        config = json.loads((tmp_path / "radfinder" / variant / "checkpoint-2" / "config.json").read_text())
        assert config["model_config"]["vision"]["patch_size"] == [8, 8, 8] and config["lr"] == 1e-3
        assert config["model_config"]["vision"]["stem"] == [8]  # and the evaluation rebuilt it from there
    assert saved["settings"]["lr"] == 1e-3


def test_medtrim_keys(tmp_path):
    r = reproduce("medtrim", tmp_path, log=None, **TOY)
    assert set(r["precision_at_r"]) == {"entities", "batch_hard", "siglip"}
    for by_mode in r["precision_at_r"].values():
        assert set(by_mode) == {"shared", "identical", "jaccard"}
        for values in by_mode.values():
            assert {"P@1", "P@10", "P@20", "chance"} <= set(values)
            assert all(is_share(values[k]) for k in ("P@1", "P@10", "chance"))
    _check_floors(r, tmp_path, 3)
    configs = [json.loads((tmp_path / "medtrim" / v / "checkpoint-2" / "config.json").read_text())
               for v in ("entities", "batch_hard", "siglip")]
    assert [c["loss_options"].get("mining") for c in configs[:2]] == [None, "batch_hard"]
    assert configs[2]["recipe"] == "siglip"


def test_mrclip_keys_and_same_shots(tmp_path):
    r = reproduce("mrclip", tmp_path, log=None, **TOY)
    for kind in ("missing_tag", "numeric_error", "wrong_tag"):
        entry = r["qc_auc"][kind]
        assert all(is_share(entry[k]) for k in ("all", "image_determined", "image_independent"))
        assert sum(v["n"] for v in entry["by_tag"].values()) == entry["n_corrupted"] - entry["n_text_unchanged"]
    _check_floors(r, tmp_path, 2)
    assert 0.0 <= r["probe_accuracy"] <= 1.0
    clip, cnn = r["fewshot"]["clip_linear_probe"], r["fewshot"]["supervised_cnn"]
    assert set(clip) == set(cnn) and all(len(cnn[k]["values"]) == len(clip[k]["values"]) for k in clip)
    # the CNN trains on the halves the few-shot probe split off (the probe's split names its seed)
    assert r["fewshot"]["split"].endswith(f"(seed {r['fewshot']['cnn_split_seed']})")
    # the seed's stem reaches the model; MR volumes are normalised, so the stem windows nothing
    vision = json.loads((tmp_path / "mrclip" / "checkpoint-2" / "config.json").read_text())["model_config"]["vision"]
    assert vision["stem"] == [8] and vision["window"] is None


def _check_floors(r, out, count):
    """Every floor is reported with its value, threshold and verdict, and the summary says each one."""
    assert len(r["floors"]) == count
    summary = (out / "summary.txt").read_text()
    for floor in r["floors"]:
        assert isinstance(floor["met"], bool) and floor["floor"] in summary
    assert summary.count("[met]") + summary.count("[NOT MET]") == count


def test_unknown_seed_and_setting(tmp_path):
    with pytest.raises(ValueError, match="seed must be one of 'mrclip', 'medtrim', 'radfinder', got 'clip'"):
        reproduce("clip", tmp_path)
    with pytest.raises(TypeError, match="unknown setting"):
        reproduce("mrclip", tmp_path, epochs=3)


def test_the_training_seed_is_a_setting_too(tmp_path, monkeypatch):
    """``seed=`` overrides the training seed (the paper's name is positional), on top of the seed's own settings."""
    import medvl.reproduce

    class Stop(Exception):
        pass

    seen = {}

    def record(out, run, log):
        seen.update(run)
        raise Stop

    monkeypatch.setattr(medvl.reproduce, "_mrclip", record)
    with pytest.raises(Stop):
        reproduce("mrclip", tmp_path, log=None, seed=1)
    assert seen["seed"] == 1 and seen["vision"] == {"stem": (8,)} and seen["steps"] == medvl.reproduce.STEPS["mrclip"]


def test_each_reproduction_trains_afresh(tmp_path, monkeypatch):
    """A second `medvl reproduce` into the same folder replaces its runs instead of being refused."""
    import medvl.train.trainer
    from medvl.reproduce import _train

    configs = []
    monkeypatch.setattr(medvl.train.trainer, "train", lambda config: configs.append(config) or
                        {"first_loss": 1.0, "loss": 0.5, "checkpoint": str(tmp_path / "checkpoint-2")})
    _train("x", tmp_path, "siglip", dict(TOY, model="vit3d-tiny", lr=1e-3, seed=0, vision={}), log=lambda _: None)
    assert configs[0].overwrite is True


def test_trainings_side_by_side_give_what_one_process_gives(tmp_path):
    """``jobs=2``: RadFinder's two trainings run at once, each in its own process with half the threads; their
    models and results are those of the same trainings one after another in this process at that thread count."""
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    side_log, alone_log = [], []
    side = reproduce("radfinder", tmp_path / "side", log=side_log.append, jobs=2, **TOY)
    torch.set_num_threads(max(1, threads // 2))
    try:
        alone = reproduce("radfinder", tmp_path / "alone", log=alone_log.append, jobs=1, **TOY)
    finally:
        torch.set_num_threads(threads)
    assert (side["side_by_side"], alone["side_by_side"]) == (2, 1)
    # side by side, the two trainings read the 16 training phantoms through a share: each was generated by one
    # job and read by the other (a re-read after training, by the calibration, is generated again)
    shared = [re.search(r"phantoms: (\d+) generated here, (\d+) read from the other jobs", line) for line in side_log]
    counts = [(int(m.group(1)), int(m.group(2))) for m in shared if m]
    assert len(counts) == 2 and sum(read for _, read in counts) == 16, counts
    assert not any("read from the other jobs" in line for line in alone_log)
    for variant in ("with_localization", "without_localization"):
        a, b = (load_file(str(tmp_path / run / "radfinder" / variant / "checkpoint-2" / "model.safetensors"))
                for run in ("side", "alone"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), variant
        for key in ("zeroshot_auc", "probe_auc", "retrieval_volume_to_text", "localization_mae_mm"):
            assert side[variant][key] == alone[variant][key], (variant, key)
    assert not list((tmp_path / "side").rglob("*.pkl"))  # the hand-over files live and die elsewhere


def test_a_failed_side_by_side_training_names_itself(tmp_path, capfd):
    with pytest.raises(RuntimeError, match=r"radfinder/with_localization: its process exited with code 1"
                                           r"(.|\n)*no-such-model"):
        reproduce("radfinder", tmp_path, log=None, jobs=2, model="no-such-model", **TOY)
    assert "Traceback" in capfd.readouterr().err  # the child's whole stderr reaches the caller's
    with pytest.raises(ValueError, match="jobs must be a positive integer or None"):
        reproduce("radfinder", tmp_path, log=None, jobs=0, **TOY)


def test_the_command_line_sets_steps_and_training_seed(tmp_path, monkeypatch, capsys):
    """``medvl reproduce radfinder --steps 1000 --seed 1``: the figures past the 5-minute budget, or of another
    training seed, with one command; without them the seed's own settings."""
    import medvl.reproduce

    calls = []
    monkeypatch.setattr(medvl.reproduce, "reproduce", lambda name, out, log, **kw: calls.append((name, out, kw)) or {})
    monkeypatch.setattr(medvl.reproduce, "format_summary", lambda results: "summary")
    medvl.reproduce.main(["radfinder", "--steps", "1000", "--seed", "1", "--out", str(tmp_path)])
    medvl.reproduce.main(["medtrim"])
    assert calls == [("radfinder", str(tmp_path), {"steps": 1000, "seed": 1}),
                     ("medtrim", "runs/reproduce-medtrim", {})]
    for bad in ("0", "-3", "ten"):
        with pytest.raises(SystemExit):
            medvl.reproduce.main(["radfinder", "--steps", bad])
        assert f"--steps: expected a positive integer, got '{bad}'" in capsys.readouterr().err
