"""`medvl eval` and `medvl qc` end to end on a tiny MR checkpoint, and their argument errors."""

import csv
import json
import re

import pytest

from medvl import cli
from medvl.data import make_phantom_set, write_dicom_series

TINY = ["--steps", "2", "--batch-size", "4", "--n-train", "8", "--size", "32,32,16", "--no-progress"]


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "mrclip"
    assert cli.main(["train", "--recipe", "mrclip", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory):
    """Five MR series in two patient folders; series3's header lost its Manufacturer. Also a note (not
    DICOM, ignored) and a folder whose only "DICOM" file is broken (listed as unreadable)."""
    root = tmp_path_factory.mktemp("dicom")
    _, phantoms = make_phantom_set(0, 5, seed=11, mr_kwargs={"shape": (16, 32, 32)})
    for i, phantom in enumerate(phantoms):
        metadata = dict(phantom.metadata)
        if i == 3:
            metadata["Manufacturer"] = None
        write_dicom_series(root / f"patient{i % 2}" / f"series{i}", phantom.volume, phantom.spacing, modality="MR",
                           metadata=metadata, seed=i)
    (root / "notes.txt").write_text("not a DICOM file")
    (root / "broken").mkdir()
    (root / "broken" / "x.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    return root


def test_eval_cli_end_to_end(mr_run, capsys):
    assert cli.main(["eval", str(mr_run), "--n", "16", "--tasks", "retrieval,probe,qc", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for heading in ("## retrieval", "## probe", "## qc", "| corruption@rate", "| direction"):
        assert heading in printed
    out = mr_run / "eval"  # the default: the run folder's eval/
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["retrieval", "probe", "qc"] and results["kind"] == "mr" and results["n"] == 16
    assert 0 <= results["results"]["probe"]["accuracy"] <= 1
    for name in ("report.md", "qc_histograms.png", "embeddings_pca.png"):
        assert (out / name).is_file(), name
    assert list((out / "cache").rglob("*.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the deliberately broken file
def test_qc_cli_ranks_the_corrupted_series_first(mr_run, dicom_dir, tmp_path, capsys):
    assert cli.main(["qc", str(mr_run), str(dicom_dir), "--quiet"]) == 0
    printed = capsys.readouterr().out
    default_csv = mr_run / f"qc-{dicom_dir.name}.csv"
    assert default_csv.is_file() and str(default_csv) in printed
    rows = list(csv.DictReader(default_csv.open()))
    ranked = [r for r in rows if r["rank"]]
    assert [int(r["rank"]) for r in ranked] == [1, 2, 3, 4, 5]
    assert ranked[0]["series"] == "patient1/series3" and ranked[0]["issues"] == "missing Manufacturer"
    assert "patient1/series3" in printed and "missing Manufacturer" in printed
    assert all(r["issues"] == "" for r in ranked[1:])
    scores = [float(r["score"]) for r in ranked[1:]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 2 for s in scores)
    assert re.search(r"image on an? [\w ]+ scanner at", ranked[0]["sentence"])  # the model name alone, no vendor
    unreadable = [r for r in rows if not r["rank"]]
    assert [r["series"] for r in unreadable] == ["broken"] and unreadable[0]["issues"].startswith("unreadable:")

    by_score = tmp_path / "by_score.csv"
    assert cli.main(["qc", str(mr_run), str(dicom_dir), "--out", str(by_score), "--rank-by", "score", "--quiet"]) == 0
    scores = [float(r["score"]) for r in csv.DictReader(by_score.open()) if r["rank"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


def test_bad_arguments_give_clear_errors(mr_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["eval", str(tmp_path / "missing")], r"CHECKPOINT: checkpoint .* does not exist"),
        (["eval", str(mr_run), "--tasks", "retrieval,bogus"],
         r"--tasks: task must be one of 'zeroshot', .*, got 'bogus'"),
        (["eval", str(mr_run), "--n", "4", "--tasks", "zeroshot"],
         r"task 'zeroshot' applies to CT data .*synthetic-mr is MR\. Tasks that apply to synthetic-mr: retrieval"),
        (["eval", str(mr_run), "--data", "synthetic-ct"], r"'synthetic-ct' is CT but the checkpoint was trained on MR"),
        (["eval", str(mr_run), "--size", "30,32,16"], r"size \(30, 32, 16\) does not fit the checkpoint's patch size"),
        (["eval", str(mr_run), "--size", "32,32"], r"--size: .*three positive integers"),
        (["qc", str(mr_run), str(tmp_path / "nowhere")], r"DICOM_DIR: .* does not exist"),
        (["qc", str(mr_run), str(empty)], r"no DICOM files under"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2, argv
        error = capsys.readouterr().err
        assert re.search(message, error), (argv, error)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_qc_goes_on_past_unreadable_series(mr_run, dicom_dir, tmp_path, capsys):
    """A truncated slice (readable header, cut pixels) made qc give up on the whole folder and suggest a
    --skip-bad it does not have; a corrupt VR escaped as NotImplementedError. Now each is a row."""
    import shutil

    from medvl.data.dicom_write import write_raw_element
    from medvl.data.sources import build_dataset

    root = tmp_path / "dicom"
    shutil.copytree(dicom_dir, root)
    truncated = root / "patient0" / "truncated"
    shutil.copytree(root / "patient0" / "series0", truncated)
    cut = sorted(truncated.iterdir())[2]
    cut.write_bytes(cut.read_bytes()[:-300])
    bad_vr = root / "patient1" / "badvr"
    shutil.copytree(root / "patient1" / "series1", bad_vr)
    write_raw_element(sorted(bad_vr.iterdir())[1], "SliceThickness", b"2", vr="ZZ")

    assert cli.main(["qc", str(mr_run), str(root), "--out", str(tmp_path / "qc.csv"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "8 series: 5 scored, 3 unreadable" in printed and "--skip-bad" not in printed
    rows = list(csv.DictReader((tmp_path / "qc.csv").open()))
    assert len([r for r in rows if r["rank"]]) == 5
    unreadable = {r["series"]: r["issues"] for r in rows if not r["rank"]}
    assert set(unreadable) == {"broken", "patient0/truncated", "patient1/badvr"}
    assert str(cut) in unreadable["patient0/truncated"] and "cannot decode pixel data" in unreadable["patient0/truncated"]
    assert "cannot be decoded (NotImplementedError" in unreadable["patient1/badvr"]

    # medvl train --skip-bad leaves the same series out for the same reason (one behaviour)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"volume,text\n{root / 'patient0' / 'series0'},a\n{truncated},b\n")
    dataset, info = build_dataset(str(manifest), "mr", size=(32, 32, 16), skip_bad=True)
    assert len(dataset) == 1 and [s["row"] for s in info["skipped"]] == [2]
    assert "unreadable: " + info["skipped"][0]["reason"] == unreadable["patient0/truncated"]
