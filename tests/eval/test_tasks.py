"""Evaluation tasks on tiny checkpoints: keys and ranges, the embedding cache, evaluate()'s files and errors,
and the header rules of metadata QC."""

import json

import numpy as np
import pytest
import torch

from medvl.eval.cache import CachedEncoder, EmbeddingCache, text_key
from medvl.eval.tasks import (EvalSet, evaluate, fewshot_task, localization_task, metadata_issues, precision_task,
                              probe_task, qc_task, retrieval_task, sequence_family, zeroshot_task)
from medvl.train.main import main as train_main

TINY = ["--steps", "2", "--batch-size", "4", "--n-train", "8", "--size", "32,32,16", "--no-progress"]
SIZE = (32, 32, 16)


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-ct") / "siglip"
    assert train_main(["--recipe", "siglip", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-mr") / "mrclip"
    assert train_main(["--recipe", "mrclip", "--out", str(out), *TINY]) == 0
    return out


def _encoder_and_set(run, source, kind, n):
    from medvl.eval.tasks import _prompt_head_of
    from medvl.models.checkpoint import checkpoint_dir, load_checkpoint
    from medvl.data.sources import build_dataset

    model, _ = load_checkpoint(run)
    encoder = CachedEncoder(model, prompt_head=_prompt_head_of(checkpoint_dir(run)))
    dataset, _ = build_dataset(source, kind, n=n, seed=100_000, size=SIZE)
    return encoder, EvalSet.from_dataset(dataset, kind, source=source, size=SIZE)


@pytest.fixture(scope="module")
def ct(ct_run):
    return _encoder_and_set(ct_run, "synthetic-ct", "ct", 16)


@pytest.fixture(scope="module")
def mr(mr_run):
    return _encoder_and_set(mr_run, "synthetic-mr", "mr", 24)


def _in_unit(value):
    return value is None or 0.0 <= value <= 1.0


# ------------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------------

def test_zeroshot_on_ct(ct):
    from medvl.data import CT_FINDINGS

    encoder, data = ct
    result = zeroshot_task(encoder, data)
    assert encoder.has_prompt_head and result["volume_side"] == "prompt head"
    assert list(result["per_class"]) == list(CT_FINDINGS)
    assert result["n_templates"] == 5 and result["n"] == 16
    for entry in result["per_class"].values():
        assert entry["n_pos"] + entry["n_neg"] == 16
        assert all(_in_unit(entry[k]) for k in ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity"))
    assert 0 < result["macro"]["n_classes"] <= len(CT_FINDINGS) and _in_unit(result["macro"]["auc"])
    scores = np.asarray(result["data"]["scores"])
    assert scores.shape == (16, len(CT_FINDINGS)) and ((scores > 0) & (scores < 1)).all()
    probe = result["probe"]  # the supervised ceiling beside each zero-shot AUC
    assert list(probe["per_class"]) == list(CT_FINDINGS) and _in_unit(probe["macro"]["auc"])
    for name, entry in probe["per_class"].items():
        counts = (result["per_class"][name]["n_pos"], result["per_class"][name]["n_neg"])
        assert (entry["n_pos"], entry["n_neg"]) == counts
        assert (entry["auc"] is None) == (min(counts) < 2)


def test_retrieval_pair_and_class_level(ct, mr):
    for encoder, data, relevance in (ct + ("identical finding sets",), mr + ("same contrast category",)):
        result = retrieval_task(encoder, data)
        assert result["class_relevance"] == relevance
        for direction in ("volume_to_text", "text_to_volume", "volume_to_text_class", "text_to_volume_class"):
            r = result[direction]
            assert set(r) == {"R@1", "R@5", "R@10", "MedR", "mAP", "n_queries", "n_excluded"}
            assert r["n_queries"] == len(data) and r["R@1"] <= r["R@5"] <= r["R@10"] <= 1
            assert 1 <= r["MedR"] <= len(data) and 0 < r["mAP"] <= 1
        assert 0 < result["chance_R@1"]["pair"] <= result["chance_R@1"]["class"] <= 1


def test_precision_ct_findings_and_mr_categories(ct, mr):
    from medvl.data import CT_FINDINGS

    result = precision_task(*ct)
    assert {"P@1", "P@10", "n_queries", "per_class", "macro"} <= set(result) and "P@20" not in result  # 20 > n
    graded = result["by_relevance"]
    assert set(graded) == {"shared", "identical", "jaccard"} and graded["shared"]["P@10"] == result["P@10"]
    # identical sets <= Jaccard-weighted <= share a finding, for the values and for their chance levels
    for key in ("P@1", "P@10", "chance"):
        assert graded["identical"][key] <= graded["jaccard"][key] + 1e-12 <= graded["shared"][key] + 2e-12
    assert set(result["per_class"]) <= set(CT_FINDINGS) | {"normal"}
    assert all(_in_unit(result[k]) for k in ("P@1", "P@10"))
    result = precision_task(*mr)
    assert {"P@1", "P@10", "P@20"} <= set(result) and result["n_queries"] == 24
    assert result["relevance"] == "same contrast category"
    assert all(_in_unit(v["P@1"]) for v in result["per_class"].values())


def test_localization_against_baselines(ct):
    encoder, data = ct
    result = localization_task(encoder, data, seed=0)
    # One depth bin per patch row along Z; phantom slices are 5 mm thick (vit3d-tiny: patch_z 8, two bins).
    patch_z = encoder.patch_size[2]
    n_bins = SIZE[2] // patch_z
    assert result["patch_z"] == patch_z and result["n_bins"] == n_bins
    assert result["bin_mm"] == pytest.approx(5.0 * patch_z)
    targets = [min(s["depth_index"] // patch_z, n_bins - 1) for m in data.metas for s in m["snippets"]]
    assert result["n_snippets"] == len(targets) > 0
    assert set(result["baselines"]) == {"middle", "random", "finding_mean"}
    for metrics in [result["model"], *result["baselines"].values()]:
        assert metrics["n"] == len(targets) and 0 <= metrics["mae_mm"] <= (n_bins - 1) * result["bin_mm"]
        assert 0 <= metrics["within_one_bin"] <= 1
    middle = (n_bins - 1) // 2
    expected = np.mean([abs(t - middle) for t in targets]) * result["bin_mm"]
    assert result["baselines"]["middle"]["mae_mm"] == pytest.approx(expected)
    by_depth = result["data"]["by_depth"]
    assert sum(v["n"] for v in by_depth.values()) == len(targets)
    assert set(next(iter(by_depth.values()))) == {"n", "model", "middle", "random", "finding_mean"}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn, a class absent from a half
def test_probe_and_fewshot_on_mr_sequences(mr):
    encoder, data = mr
    probe = probe_task(encoder, data, seed=0)
    assert probe["target"] == "sequence" and probe["n_train"] + probe["n_test"] == 24
    assert all(_in_unit(probe[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "majority_accuracy"))
    shots = fewshot_task(encoder, data, ks=(1, 2), seeds=(0,), seed=0)
    assert set(shots["by_k"]) == {"1", "2"} and shots["n_train"] == probe["n_train"]
    for entry in shots["by_k"].values():
        assert len(entry["values"]) == 1 and _in_unit(entry["mean"]) and entry["k_effective"] >= 1


def test_qc_scores_corruptions_per_kind_and_rate(mr):
    encoder, data = mr
    result = qc_task(encoder, data, seed=0)
    assert set(result["by_case"]) == {f"{kind}@{rate}" for kind in ("missing_tag", "wrong_tag", "numeric_error")
                                      for rate in ("0.1", "0.5")}
    for case, entry in result["by_case"].items():
        assert entry["n_clean"] + entry["n_corrupted"] == 24 and _in_unit(entry["auc"])
        scores = result["data"][case]
        assert len(scores["clean"]) == entry["n_clean"] and len(scores["corrupted"]) == entry["n_corrupted"]
        assert all(0 <= s <= 2 for s in scores["clean"] + scores["corrupted"])
    assert result["by_case"]["missing_tag@0.1"]["n_corrupted"] == 2  # round(0.1 * 24)
    assert result["by_case"]["wrong_tag@0.5"]["n_corrupted"] == 12
    # per tag, and split by whether the image can show the tag; corruptions the sentence does not show are out
    for entry in result["by_case"].values():
        tags = entry["by_tag"]
        assert sum(v["n"] for v in tags.values()) == entry["n_corrupted"] - entry["n_text_unchanged"]
        independent = sum(v["n"] for t, v in tags.items() if t in ("Manufacturer", "ManufacturerModelName"))
        assert entry["image_independent"]["n"] == independent
        assert entry["image_determined"]["n"] + independent == entry["n_corrupted"] - entry["n_text_unchanged"]
    assert set(result["by_case"]["numeric_error@0.5"]["by_tag"]) <= {"EchoTime", "RepetitionTime", "InversionTime"}
    assert set(result["image_independent_tags"]) == {"Manufacturer", "ManufacturerModelName"}


def test_tasks_refuse_the_wrong_data_kind(ct, mr):
    with pytest.raises(ValueError, match=r"task 'zeroshot' applies to CT data.*synthetic-mr is MR"):
        zeroshot_task(*mr)
    with pytest.raises(ValueError, match=r"task 'localization' applies to CT data"):
        localization_task(*mr)
    with pytest.raises(ValueError, match=r"task 'qc' applies to MR data.*synthetic-ct is CT"):
        qc_task(*ct)
    with pytest.raises(ValueError, match=r"task 'probe' needs single-label classes"):
        probe_task(*ct)


# ------------------------------------------------------------------------------------------------------
# The cache and evaluate()
# ------------------------------------------------------------------------------------------------------

def test_embedding_cache_round_trips_through_safetensors(tmp_path):
    first = EmbeddingCache(tmp_path, "abc123")
    first.put_many({"k1": {"features": torch.arange(4.0)}, "k2": {"a": torch.ones(2, 3), "b": torch.zeros(1)}})
    shards = list((tmp_path / "abc123").glob("*.safetensors"))
    assert len(shards) == 1 and not list((tmp_path / "abc123").glob("*.pt"))
    again = EmbeddingCache(tmp_path, "abc123")
    assert len(again) == 2 and "k1" in again
    assert torch.equal(again.get("k1")["features"], torch.arange(4.0))
    assert set(again.get_many(["k2", "missing"])) == {"k2"}
    assert len(EmbeddingCache(tmp_path, "other-model")) == 0  # another model never sees these entries
    assert text_key("a b") == text_key("a b") != text_key("a  b")


def _count_forwards(monkeypatch):
    from medvl.models.text_encoder import TextEncoder
    from medvl.models.volume_encoder import VolumeEncoder

    calls = {"volume": 0, "text": 0}
    for cls, name in ((VolumeEncoder, "volume"), (TextEncoder, "text")):
        original = cls.forward

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)
    return calls


def test_evaluate_writes_results_and_reuses_the_cache(ct_run, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    calls = _count_forwards(monkeypatch)
    first = evaluate(str(ct_run), n=12, out=out)
    assert first["tasks"] == ["zeroshot", "retrieval", "precision", "localization", "collapse"]
    assert set(first["skipped"]) == {"probe", "fewshot"}  # CT phantoms carry no single-label class
    assert first["encoding"]["volumes_encoded"] == 12 and calls["volume"] > 0 and calls["text"] > 0
    for name in ("results.json", "report.md", "zeroshot_roc.png", "embeddings_pca.png", "localization_by_depth.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == set(first["tasks"]) and saved["n"] == 12 and saved["seed"] == 100_000
    report = (out / "report.md").read_text()
    assert all(f"## {task}" in report for task in first["tasks"]) and "| finding" in report
    assert list((out / "cache").rglob("*.safetensors"))

    calls.update(volume=0, text=0)
    second = evaluate(str(ct_run), n=12, out=out)
    assert calls == {"volume": 0, "text": 0}
    assert second["encoding"]["volumes_encoded"] == 0 and second["encoding"]["texts_encoded"] == 0
    assert second["encoding"]["volumes_cached"] == 12
    assert second["results"]["zeroshot"]["per_class"] == first["results"]["zeroshot"]["per_class"]
    assert second["results"]["localization"]["model"] == first["results"]["localization"]["model"]


def test_evaluate_accepts_a_model_just_trained(ct_run):
    from medvl.models.checkpoint import load_checkpoint

    model, run_config = load_checkpoint(ct_run)
    model.train()
    head = torch.randn(model.visual.proj.weight.shape)  # a prompt head of the same shape as the projection
    result = evaluate((model, run_config), n=8, tasks="retrieval,localization", prompt_head=head)
    assert result["tasks"] == ["retrieval", "localization"] and result["checkpoint"] is None
    assert result["files"] == {} and result["results"]["localization"]["depth_features"] == "prompt head"
    assert model.training  # the caller's mode is restored
    again = evaluate((model, run_config), n=8, tasks=["retrieval"])
    assert again["model_key"] != result["model_key"]  # the head is part of the in-memory key


def test_evaluate_errors_name_the_argument_and_the_fix(ct_run, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task\(s\) 'zero-shot'; choose from zeroshot, retrieval"):
        evaluate(str(ct_run), tasks="zero-shot")
    with pytest.raises(ValueError, match=r"task 'qc' applies to MR data.*Tasks that apply to synthetic-ct: zeroshot"):
        evaluate(str(ct_run), n=4, tasks="qc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"size \(30, 32, 16\) does not fit the checkpoint's patch size"):
        evaluate(str(ct_run), size=(30, 32, 16))
    with pytest.raises(ValueError, match=r"'synthetic-mr' is MR but the checkpoint was trained on CT"):
        evaluate(str(ct_run), data="synthetic-mr")
    with pytest.raises(TypeError, match=r"\(model, run_config\) pair"):
        evaluate(42)


# ------------------------------------------------------------------------------------------------------
# Header rules of metadata QC
# ------------------------------------------------------------------------------------------------------

def test_metadata_issues_clean_phantoms_have_none():
    from medvl.data import make_phantom_set

    _, phantoms = make_phantom_set(0, 60, seed=5, mr_kwargs={"shape": (8, 8, 8)})
    assert {sequence_family(p.metadata) for p in phantoms} >= {"FLAIR", "STIR", "gradient echo", "T1 spin echo"}
    assert [p.sequence for p in phantoms if metadata_issues(p.metadata)] == []


def test_metadata_issues_flag_broken_headers():
    from medvl.data import make_mr_phantom

    flair = make_mr_phantom(1, shape=(8, 8, 8), sequence="FLAIR").metadata
    assert metadata_issues({**flair, "Manufacturer": None}) == ["missing Manufacturer"]
    assert any("EchoTime" in issue and "FLAIR" in issue for issue in metadata_issues({**flair,
                                                                                      "EchoTime": flair["EchoTime"] / 10}))
    assert "IR in ScanningSequence but no InversionTime" in metadata_issues({**flair, "InversionTime": None})
    gd = make_mr_phantom(2, shape=(8, 8, 8), sequence="T1_SE_GD").metadata
    assert metadata_issues({**gd, "ContrastBolusAgent": None}) == [
        "SeriesDescription says contrast but ContrastBolusAgent is empty"]
    plane = {"axial": "coronal", "coronal": "sagittal", "sagittal": "axial"}[gd["Plane"]]
    assert any("SeriesDescription says" in issue for issue in metadata_issues({**gd, "Plane": plane}))
    # Without ScanningSequence the description still names the family, so its ranges still apply.
    broken = {**flair, "ScanningSequence": None, "RepetitionTime": flair["RepetitionTime"] / 10}
    assert sequence_family(broken) == "FLAIR"
    assert {"missing ScanningSequence"} < set(metadata_issues(broken))

