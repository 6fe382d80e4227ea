"""build_dataset over every source kind, the on-disk volume cache, bad rows, and the synthetic CT snippets,
on tiny files written here (16x16x8 volumes)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import medvl.data.sources as sources
from medvl.data import VolumeTextDataset, collate, ct_transforms, make_phantom_set
from medvl.data.entities import CT_RATE_FINDINGS
from medvl.data.volume_cache import VolumeCache
from medvl.data.sources import BadVolumeError, build_dataset, slice_depth_indices

SIZE = (16, 16, 8)  # (X, Y, Z) of the tensors; the files below hold (i, j, k) = (16, 16, 8) voxels
SPACING = (1.0, 1.0, 1.0)  # what the test volumes have, so the resampling keeps every voxel


def _hu(seed: int) -> np.ndarray:
    """(i, j, k) int16 HU volume with air (-1024) in a corner, as a scanner's padding would be."""
    hu = np.random.default_rng(seed).integers(-1000, 1500, size=(16, 16, 8)).astype(np.int16)
    hu[0, 0, 0] = -1024
    return hu


def _write_nifti(path, data, affine=None) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, str(path))
    return str(path)


def _truncate_payload(path) -> None:
    """Cut the voxel data short and keep the header: the file opens, reading the voxels fails."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3000)


def _write_csv(path, header, rows) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


REPORTS = ("There is a small nodule in the right upper lobe.", "Mild cardiomegaly. No pleural effusion.",
           "No acute abnormality.", "Large left pleural effusion.")


def _ct_manifest(tmp_path, n=3, truncated_row=None) -> str:
    """CSV manifest of `n` CT NIfTI volumes (relative paths, labels); `truncated_row` (1-based) is corrupt."""
    rows = []
    for i in range(n):
        path = _write_nifti(tmp_path / "vols" / f"ct{i}.nii", _hu(i))
        if truncated_row == i + 1:
            _truncate_payload(path)
        rows.append([f"vols/ct{i}.nii", REPORTS[i % len(REPORTS)], f"{i % 2};{1 - i % 2};-1"])
    return _write_csv(tmp_path / "train.csv", ["volume", "report", "labels"], rows)


def _batches(ds, **kwargs):
    return list(DataLoader(ds, batch_size=2, collate_fn=collate, **kwargs))


def _check_ct_batch(batch, n_labels=None):
    assert batch["volume"].dtype == torch.int16
    assert tuple(batch["volume"].shape) == (2, 1) + SIZE
    assert all(isinstance(t, str) and t for t in batch["text"])
    assert batch["entities"] is not None and all(e.shape[0] == 2 for e in batch["entities"])
    if n_labels is not None:
        assert batch["labels"].dtype == torch.bool and tuple(batch["labels"].shape) == (2, n_labels)
    assert all(m["snippets"] == [] and m["n_slices"] == SIZE[2] for m in batch["meta"])


# ------------------------------------------------------------------------------------------------------
# sources


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_synthetic_source(kind):
    lines = []
    ds, info = build_dataset(f"synthetic-{kind}", kind, n=2, size=SIZE, log=lines.append)
    (batch,) = _batches(ds)
    assert batch["volume"].dtype == (torch.int16 if kind == "ct" else torch.float32)
    assert tuple(batch["volume"].shape) == (2, 1) + SIZE
    assert info == {"source": f"synthetic-{kind}", "kind": kind, "n": 2, "skipped": [], "cache_dir": None}
    assert lines
    other = "mr" if kind == "ct" else "ct"
    with pytest.raises(ValueError, match=f"synthetic-{kind}.*kind is '{other}'"):
        build_dataset(f"synthetic-{kind}", other, n=2, size=SIZE)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_phantoms_are_generated_when_read_and_equal_the_real_volume_pipeline(kind):
    """The phantom path skips the MONAI pipeline of real volumes because it changes nothing but the layout (and
    the MR intensity): same tensor, same affine. Records are made on demand (prefix-stable seeds)."""
    ds = sources.synthetic_dataset(kind, 3, 7, SIZE)
    more = sources.synthetic_dataset(kind, 5, 7, SIZE)
    assert len(ds) == 3 and ds.seeds == more.seeds[:3]
    for i in range(3):
        record = ds.records[i]
        reference = ds.pipeline({"image": record["image"], "spacing": record["spacing"]})["image"]
        sample = ds[i]
        assert sample.volume.dtype == reference.dtype
        torch.testing.assert_close(sample.volume, reference.as_tensor(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sample.meta["affine"], reference.affine.to(torch.float64))
    assert pickle.loads(pickle.dumps(ds))[1].text == ds[1].text  # DataLoader workers rebuild it


def test_augmentation_keeps_what_the_report_says():
    """light_augment moves the body in-plane by a few voxels and recalibrates HU a little; it never flips nor
    moves along z, so sides, lobes and cited slices stay true; the same index draws the same augmentation."""
    from medvl.data.transforms import AUGMENT_MAX_SHIFT_VOXELS, light_augment

    plain = sources.synthetic_dataset("ct", 4, 0, (32, 32, 16))
    augmented = sources.synthetic_dataset("ct", 4, 0, (32, 32, 16), augment=True)
    again = sources.synthetic_dataset("ct", 4, 0, (32, 32, 16), augment=True)
    moved = 0
    for i in range(4):
        a, b = plain[i], augmented[i]
        assert (a.text, a.labels.tolist(), a.meta["snippets"]) == (b.text, b.labels.tolist(), b.meta["snippets"])
        assert torch.equal(b.volume, again[i].volume)
        x, y = a.volume[0].float(), b.volume[0].float()          # (X, Y, Z)
        # per slice, the body's mass (HU above air) is kept up to the recalibration: nothing moved along z
        mass_a, mass_b = (x + 1000).clamp_min(0).sum((0, 1)), (y + 1000).clamp_min(0).sum((0, 1))
        assert torch.corrcoef(torch.stack([mass_a, mass_b]))[0, 1] > 0.99
        # the body's centre moved by at most the largest shift, and left stays left
        ca = ((x > -500).float().nonzero()[:, :2].float().mean(0))
        cb = ((y > -500).float().nonzero()[:, :2].float().mean(0))
        assert (ca - cb).abs().max() <= AUGMENT_MAX_SHIFT_VOXELS + 0.5
        moved += int(not torch.equal(a.volume, b.volume))
    assert moved == 4
    air = np.full((4, 8, 8), -1000, np.int16)
    out = light_augment(air, "ct", np.random.default_rng(0))
    # air stays air: -1000 HU moves by the offset only (<= 15 HU); the uncovered border is scanner air, -1024 HU
    assert out.dtype == np.int16 and np.abs(out.astype(int) + 1000).max() <= 24 + 15
    with pytest.raises(ValueError, match="kind"):
        light_augment(air, "pet", np.random.default_rng(0))


def test_csv_manifest_ct(tmp_path):
    ds, info = build_dataset(_ct_manifest(tmp_path, n=4), "ct", size=SIZE, spacing=SPACING)
    assert info["n"] == 4 and info["skipped"] == [] and info["kind"] == "ct"
    batches = _batches(ds)
    for batch in batches:
        _check_ct_batch(batch, n_labels=3)
    # uncertain (-1) labels count as not positive; 0/1 as written
    assert batches[0]["labels"].tolist() == [[False, True, False], [True, False, False]]
    # the volume is the file's HU, untouched: (i, j, k) -> (X, Y, Z) with RAS axes and matching size
    assert torch.equal(batches[0]["volume"][0, 0], torch.from_numpy(_hu(0)))
    assert batches[0]["text"][0] == REPORTS[0]


def test_manifest_dicom_series_is_reoriented(tmp_path):
    from medvl.data.dicom_write import write_dicom_series

    hu = np.transpose(_hu(5), (2, 1, 0))  # (slices, rows, cols)
    write_dicom_series(tmp_path / "series", hu, (1.0, 1.0, 1.0))  # axial LPS: cols -> Left, rows -> Posterior
    manifest = _write_csv(tmp_path / "m.csv", ["volume", "report"], [["series", REPORTS[0]], ["series", REPORTS[1]]])
    ds, _ = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING)
    (batch,) = _batches(ds)
    _check_ct_batch(batch)
    ras = torch.from_numpy(hu).permute(2, 1, 0).flip(0).flip(1)  # RAS: x to the Right, y Anterior
    assert torch.equal(batch["volume"][0, 0], ras)


def test_jsonl_manifest_mr_and_row_cap(tmp_path):
    lines = []
    for i in range(3):
        _write_nifti(tmp_path / f"mr{i}.nii.gz", np.random.default_rng(i).random((16, 16, 8)).astype(np.float32))
        meta = {"EchoTime": 10.0 + 80 * i, "RepetitionTime": 500.0 + 2000 * i, "MagneticFieldStrength": 3.0,
                "Manufacturer": "SIEMENS"}
        lines.append(json.dumps({"volume": f"mr{i}.nii.gz", "metadata": meta}))
    (tmp_path / "mr.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    logged = []
    ds, info = build_dataset(str(tmp_path / "mr.jsonl"), "mr", n=2, size=SIZE, spacing=SPACING, log=logged.append)
    assert info["n"] == 2 and any("first 2 of 3" in line for line in logged)
    (batch,) = _batches(ds)
    assert batch["volume"].dtype == torch.float32 and tuple(batch["volume"].shape) == (2, 1) + SIZE
    assert all("TE" in t for t in batch["text"])  # metadata_to_text, not the (empty) report
    assert batch["label"].dtype == torch.long and (batch["label"] >= 0).all()
    assert batch["entities"] is None


def _ct_rate_root(tmp_path) -> str:
    root = tmp_path / "ct_rate"
    names = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    for i, name in enumerate(names):
        parts = name.split("_")
        folder = root / "dataset" / "train" / "_".join(parts[:2]) / "_".join(parts[:3])
        _write_nifti(folder / name, _hu(10 + i), np.diag([0.75, 0.75, 1.5, 1.0]))
    _write_csv(root / "radiology_text_reports" / "train_reports.csv", ["VolumeName", "Findings_EN", "Impressions_EN"],
               [[name, REPORTS[i], "Impression."] for i, name in enumerate(names)])
    _write_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", ["VolumeName", *CT_RATE_FINDINGS],
               [[name] + [int(k == i) for k in range(len(CT_RATE_FINDINGS))] for i, name in enumerate(names)])
    return str(root)


def test_ct_rate_root(tmp_path, caplog):
    root = _ct_rate_root(tmp_path)
    ds, info = build_dataset(root, "ct", size=SIZE)  # default spacing: a chest field of view
    assert info["n"] == 3 and info["skipped"] == []
    batch = _batches(ds)[0]
    _check_ct_batch(batch, n_labels=len(CT_RATE_FINDINGS))
    assert batch["labels"][0].nonzero().flatten().tolist() == [0]
    assert batch["text"][0] == REPORTS[0] + " Impression."
    assert [m["row"] for m in batch["meta"]] == [1, 2]
    with pytest.raises(ValueError, match="CT-RATE.*kind 'ct'"):
        build_dataset(root, "mr", size=SIZE)
    # a volume listed in the reports but absent: named, or skipped and reported
    os.remove(os.path.join(root, "dataset", "train", "train_2", "train_2_a", "train_2_a_1.nii.gz"))
    with pytest.raises(FileNotFoundError, match="train_2_a_1.*--skip-bad"):
        build_dataset(root, "ct", size=SIZE)
    ds, info = build_dataset(root, "ct", size=SIZE, skip_bad=True)
    assert info["n"] == 2 and [s["row"] for s in info["skipped"]] == [2]


def test_mr_nifti_folder(tmp_path):
    folder = tmp_path / "mr"
    for i, (te, tr) in enumerate([(0.01, 0.5), (0.1, 4.0)]):
        _write_nifti(folder / f"sub-0{i}_T.nii.gz", np.random.default_rng(i).random((16, 16, 8)).astype(np.float32))
        (folder / f"sub-0{i}_T.json").write_text(json.dumps({"EchoTime": te, "RepetitionTime": tr,
                                                             "MagneticFieldStrength": 3, "Manufacturer": "Siemens"}))
    ds, info = build_dataset(str(folder), "mr", size=SIZE)
    (batch,) = _batches(ds)
    assert batch["volume"].dtype == torch.float32 and tuple(batch["volume"].shape) == (2, 1) + SIZE
    assert "Siemens" in batch["text"][0] and batch["text"][0] != batch["text"][1]
    assert [m["row"] for m in batch["meta"]] == [1, 2] and all(m["snippets"] == [] for m in batch["meta"])
    with pytest.raises(ValueError, match="MR NIfTI.*kind is 'ct'"):
        build_dataset(str(folder), "ct", size=SIZE)
    # a NIfTI without its sidecar
    _write_nifti(folder / "sub-02_T.nii.gz", np.ones((16, 16, 8), np.float32))
    with pytest.raises(ValueError, match="sub-02_T.nii.gz.*--skip-bad"):
        build_dataset(str(folder), "mr", size=SIZE)
    ds, info = build_dataset(str(folder), "mr", size=SIZE, skip_bad=True)
    assert len(ds) == 2 and info["skipped"][0]["row"] == 3 and "sidecar" in info["skipped"][0]["reason"]


def test_dataloader_workers_share_the_cache(tmp_path):
    cache = tmp_path / "cache"
    ds, info = build_dataset(_ct_manifest(tmp_path, n=4), "ct", size=SIZE, spacing=SPACING, cache_dir=cache)
    assert info["cache_dir"] == str(cache)
    pickle.loads(pickle.dumps(ds))  # what a spawn-started worker needs
    batches = _batches(ds, num_workers=2)
    assert len(batches) == 2
    for batch in batches:
        _check_ct_batch(batch, n_labels=3)
    entries = [name for _, _, files in os.walk(cache) for name in files]
    assert len(entries) == 4 and all(name.endswith(".safetensors") for name in entries)


# ------------------------------------------------------------------------------------------------------
# the cache


def test_cache_is_read_back_identically(tmp_path, monkeypatch):
    manifest = _ct_manifest(tmp_path, n=2)
    cache = tmp_path / "cache"
    fresh = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING)[0]
    filled = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING, cache_dir=cache)[0]
    first = [filled[i] for i in range(2)]

    # Proof that a second build reads the cache: the file reader now fails, and the samples still come.
    def no_reading(record):
        raise AssertionError(f"read {record['image']} although it is cached")

    monkeypatch.setattr(sources, "_load_record_volume", no_reading)
    cached = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING, cache_dir=cache)[0]
    for i in range(2):
        a, b = cached[i], first[i]
        assert a.volume.dtype == b.volume.dtype == torch.int16 and a.volume.shape == b.volume.shape
        assert torch.equal(a.volume, b.volume) and torch.equal(a.meta["affine"], b.meta["affine"])
    monkeypatch.undo()
    for i in range(2):
        assert torch.equal(first[i].volume, fresh[i].volume)
        assert torch.equal(first[i].meta["affine"], fresh[i].meta["affine"])

    # Entries are safetensors: loadable without pickle, holding the volume and its affine.
    from safetensors.torch import load_file

    files = sorted(os.path.join(d, f) for d, _, names in os.walk(cache) for f in names)
    assert len(files) == 2 and not any(os.path.basename(f).startswith(".tmp") for f in files)
    loaded = [load_file(f) for f in files]
    assert all(set(t) == {"volume", "affine"} and t["volume"].dtype == torch.int16 for t in loaded)

    # The key follows the transform's size and the file's mtime.
    record = filled.records[0]
    key = VolumeCache.key_for(record["image"], sources._record_description(record, filled.transform_description))
    resized = build_dataset(manifest, "ct", size=(16, 16, 10), spacing=SPACING, cache_dir=cache)[0]
    assert resized.transform_description != filled.transform_description
    assert VolumeCache.key_for(record["image"],
                               sources._record_description(record, resized.transform_description)) != key
    st = os.stat(record["image"])
    os.utime(record["image"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert VolumeCache.key_for(record["image"],
                               sources._record_description(record, filled.transform_description)) != key


def test_volume_cache_round_trip(tmp_path):
    cache = VolumeCache(tmp_path / "c")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    key = cache.key_for(src, "size=(1, 2, 3)")
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key != cache.key_for(src, "size=(1, 2, 4)")
    assert cache.get(key) is None and key not in cache
    volume = torch.arange(24, dtype=torch.int16).reshape(1, 2, 3, 4).permute(0, 3, 2, 1)  # a non-contiguous view
    cache.put(key, volume)
    assert key in cache
    out = cache.get(key)["volume"]
    assert out.dtype == torch.int16 and torch.equal(out, volume)
    cache.put(key, {"volume": volume.float(), "affine": torch.eye(4, dtype=torch.float64)})  # replaced whole
    assert cache.get(key)["volume"].dtype == torch.float32
    with open(cache.path_for(key), "wb") as f:
        f.write(b"damaged")
    assert cache.get(key) is None  # a damaged entry is a miss, recomputed by the caller
    assert pickle.loads(pickle.dumps(cache)).root == cache.root
    with pytest.raises(FileNotFoundError, match="missing source"):
        cache.key_for(tmp_path / "nope.nii", "x")


# ------------------------------------------------------------------------------------------------------
# bad rows and bad sources


def test_truncated_volume_names_its_row_or_is_skipped(tmp_path):
    manifest = _ct_manifest(tmp_path, n=3, truncated_row=2)
    bad = str(tmp_path / "vols" / "ct1.nii")
    ds, _ = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING)  # the header is fine: found on loading
    with pytest.raises(BadVolumeError, match=r"(?s)row 2: .*ct1\.nii.*--skip-bad"):
        _batches(ds)

    lines = []
    ds, info = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING, skip_bad=True, log=lines.append,
                             cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and [r["meta"]["row"] for r in ds.records] == [1, 3]
    assert info["skipped"] == [{"row": 2, "path": bad, "reason": info["skipped"][0]["reason"]}]
    assert "Expected" in info["skipped"][0]["reason"] or "damaged" in info["skipped"][0]["reason"]
    assert any("row 2" in line and "ct1.nii" in line for line in lines)
    _check_ct_batch(_batches(ds)[0], n_labels=3)

    # a row whose file is missing is caught up front by the manifest reader, and reported the same way
    os.remove(tmp_path / "vols" / "ct0.nii")
    with pytest.raises(ValueError, match=r"(?s)row 1: .*ct0\.nii.*--skip-bad"):
        build_dataset(manifest, "ct", size=SIZE, spacing=SPACING)
    ds, info = build_dataset(manifest, "ct", size=SIZE, spacing=SPACING, skip_bad=True)
    assert len(ds) == 1 and [s["row"] for s in info["skipped"]] == [1, 2]


def test_missing_manifest_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_dataset(str(tmp_path / "nope.csv"), "ct")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_dataset(tmp_path / "nope.jsonl", "mr")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    for source in ("synthetic-xray", str(tmp_path / "notes.txt"), str(tmp_path / "empty")):
        with pytest.raises(ValueError, match=r"accepted sources: 'synthetic-ct'.*manifest.*CT-RATE.*NIfTI"):
            build_dataset(source, "ct")
    with pytest.raises(ValueError, match="kind must be 'ct' or 'mr'"):
        build_dataset("synthetic-ct", "xray")


# ------------------------------------------------------------------------------------------------------
# synthetic CT snippets: the depth index is where the finding's slice lands in the tensor


MARKER = 32000  # far above any phantom HU (they are clipped to 3071)


def _marker_depth(record, transform, slice_index) -> int:
    """Paint a marker into one (z, y, x) slice of the record's array, transform it, return its Z index."""
    volume = np.array(record["image"], copy=True)
    volume[slice_index, volume.shape[1] // 2, volume.shape[2] // 2] = MARKER
    painted = VolumeTextDataset([{**record, "image": volume}], transform)[0].volume
    hits = (painted[0] == MARKER).nonzero()
    assert hits.shape[0] == 1, "the marker should survive the transform as one voxel"
    return int(hits[0, 2])


def test_snippets_depth_index_matches_a_painted_marker():
    ds, _ = build_dataset("synthetic-ct", "ct", n=3, seed=0, size=SIZE)
    phantoms, _ = make_phantom_set(3, 0, seed=0, ct_kwargs={"shape": (SIZE[2], SIZE[1], SIZE[0])})
    n_checked = 0
    for i, phantom in enumerate(phantoms):
        sample = ds[i]
        assert sample.meta["n_slices"] == sample.volume.shape[-1] == SIZE[2]
        findings = [f for f in phantom.findings if f.slice_index >= 0]
        snippets = sample.meta["snippets"]
        assert [s["finding"] for s in snippets] == [f.name for f in findings]
        for finding, snippet in zip(findings, snippets):
            text = snippet["text"]
            assert text and text[0].isupper() and text.endswith(".")
            assert not re.search(r"image\s*\d|series|\(|\)|\s[.,]", text), text
            assert text[:-1] in phantom.report  # the finding's own sentence, its reference taken out
            assert snippet["depth_index"] == _marker_depth(ds.records[i], ds.pipeline, finding.slice_index)
            n_checked += 1
    assert n_checked >= 5


@pytest.mark.parametrize("orientation, n_slices, expect", [
    (None, 8, lambda s: s),              # the phantoms: read as RAS, generated at the target size
    ("LPI", 8, lambda s: 7 - s),         # z head to feet: RAS reorientation flips the depth axis
    (None, 10, lambda s: s - 1 if 1 <= s <= 8 else -1),  # two slices more: the symmetric crop drops one each end
])
def test_slice_depth_indices_follow_the_transform(orientation, n_slices, expect):
    transform = ct_transforms(spacing=None, size=SIZE, window=None)
    shape, spacing = (n_slices, SIZE[1], SIZE[0]), (5.0, 3.5, 3.5)
    depth_of_slice, depth = slice_depth_indices(shape, spacing, transform, orientation)
    assert depth == SIZE[2] and depth_of_slice == [expect(s) for s in range(n_slices)]
    record = {"image": np.full(shape, -1000, np.int16), "spacing": spacing, "text": "x", "orientation": orientation}
    for s in range(n_slices):
        if depth_of_slice[s] >= 0:
            assert _marker_depth(record, transform, s) == depth_of_slice[s]


def test_ct_rate_reports_that_are_not_utf8_name_the_file(tmp_path):
    """UnicodeDecodeError, no path, before."""
    root = _ct_rate_root(tmp_path)
    reports = os.path.join(root, "radiology_text_reports", "train_reports.csv")
    with open(reports, "ab") as f:
        f.write("train_9_a_1.nii.gz,Épanchement,\n".encode("latin-1"))
    with pytest.raises(ValueError, match="CT-RATE reports file .*train_reports.csv is not UTF-8 text"):
        build_dataset(root, "ct", size=(32, 32, 16))
