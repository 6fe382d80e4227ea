"""evaluate(): the files it writes, the cache it reuses, an in-memory model, and its errors."""

import json

import pytest
import torch

from medvl.eval.evaluation import evaluate


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
    with pytest.raises(ValueError, match=r"task must be one of 'zeroshot', 'retrieval', .*, got 'zero-shot'; "
                                         r"did you mean 'zeroshot'\?"):
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
