"""Readers of real data layouts (manifests, CT-RATE, NIfTI + dcm2niix sidecars) on tiny synthetic files."""

from __future__ import annotations

import csv
import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest

from medvl.data.ct_rate import ct_rate_records, ct_rate_volume_path, load_ct_rate_volume, with_ct_rate_volume
from medvl.data.dicom_write import write_dicom_series
from medvl.data.entities import CT_RATE_FINDINGS
from medvl.data.manifest import load_manifest, load_volume, read_manifest
from medvl.data.nifti_sidecar import mr_nifti_records, read_sidecar


def _hu(seed: int = 0) -> np.ndarray:
    """(i, j, k) = (8, 8, 6) HU volume with air at -1024 and some tissue."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1024, 1500, size=(8, 8, 6)).astype(np.int16)
    hu[0, 0, 0] = -1024
    return hu


def _write_nifti(path, data, affine=None, scaling=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(np.asarray(data).dtype)
    if scaling is not None:
        img.header.set_slope_inter(*scaling)
    nib.save(img, str(path))
    return str(path)


def _write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# ------------------------------------------------------------------------------------------------
# load_volume / manifest


def test_load_volume_nifti_axes_and_scaling(tmp_path):
    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    # i runs towards Left (x flipped), zooms (0.5, 0.7, 2.0); header scaling 2x - 10.
    affine = np.diag([-0.5, 0.7, 2.0, 1.0])
    path = _write_nifti(tmp_path / "v.nii.gz", data, affine, scaling=(2.0, -10.0))
    vol, spacing = load_volume(path)
    assert vol.dtype == np.float32 and vol.shape == (3, 5, 4)
    assert spacing == pytest.approx((2.0, 0.7, 0.5))
    expected = data.astype(np.float32) * 2 - 10  # scaled once
    # RAS: x index flipped; (z, y, x) = (k, j, i)
    np.testing.assert_array_equal(vol, np.transpose(expected[::-1], (2, 1, 0)))


def test_load_volume_dicom_folder(tmp_path):
    hu = np.transpose(_hu(1), (2, 1, 0)).astype(np.float32)  # (slices, rows, cols)
    write_dicom_series(tmp_path / "dcm", hu, (2.5, 0.8, 0.8), modality="CT")
    vol, spacing = load_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(vol, hu)
    assert spacing == pytest.approx((2.5, 0.8, 0.8))


def _manifest_files(tmp_path):
    _write_nifti(tmp_path / "vols" / "a.nii.gz", _hu(0))
    write_dicom_series(tmp_path / "vols" / "b_dcm", np.zeros((2, 4, 4), np.float32), (1, 1, 1))
    return tmp_path


def test_read_manifest_csv(tmp_path):
    _manifest_files(tmp_path)
    _write_csv(tmp_path / "m.csv", ["volume", "report", "metadata", "label", "labels"], [
        ["vols/a.nii.gz", "No effusion.", json.dumps({"Modality": "CT"}), "2", "[1, 0, -1]"],
        ["vols/b_dcm", "Small nodule,\nright lung.", "", "", "0;1;1"],
    ])
    records = read_manifest(tmp_path / "m.csv")
    assert [r["image"] for r in records] == [str(tmp_path / "vols" / "a.nii.gz"), str(tmp_path / "vols" / "b_dcm")]
    a, b = records
    assert a["text"] == a["report"] == "No effusion."
    assert a["label"] == 2 and a["labels"] == [1, 0, -1] and a["metadata"] == {"Modality": "CT"}
    assert b["label"] == -1 and b["labels"] == [0, 1, 1] and "metadata" not in b
    assert b["report"] == "Small nodule,\nright lung."
    assert a["meta"] == {"row": 1, "line": 2, "source": str(tmp_path / "m.csv")}
    assert b["meta"]["row"] == 2 and b["meta"]["line"] == 3


def test_read_manifest_jsonl_and_root(tmp_path):
    _manifest_files(tmp_path)
    path = tmp_path / "lists" / "m.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"volume": "vols/a.nii.gz", "text": "t1", "labels": [0, 1]}) + "\n\n"
                    + json.dumps({"volume": "vols/b_dcm", "report": "r2", "metadata": {"k": 1}}) + "\n")
    with pytest.raises(ValueError, match="row 1"):  # relative to the manifest folder: not found
        read_manifest(path)
    records = read_manifest(path, root=tmp_path)
    assert records[0]["text"] == "t1" and records[0]["labels"] == [0, 1]
    assert records[1]["text"] == records[1]["report"] == "r2" and records[1]["metadata"] == {"k": 1}
    assert records[1]["meta"]["row"] == 2 and records[1]["meta"]["line"] == 3


def test_manifest_bad_rows(tmp_path, caplog):
    _manifest_files(tmp_path)
    (tmp_path / "vols" / "broken.nii").write_bytes(b"not a nifti at all")
    _write_csv(tmp_path / "m.csv", ["volume", "text", "labels"], [
        ["vols/a.nii.gz", "ok", "1;0"],
        ["vols/missing.nii.gz", "x", ""],
        ["vols/broken.nii", "y", ""],
        ["vols/a.nii.gz", "z", "1;2"],
    ])
    with pytest.raises(ValueError) as info:
        read_manifest(tmp_path / "m.csv")
    message = str(info.value)
    assert "row 2" in message and "missing.nii.gz" in message
    assert "row 3" in message and "broken.nii" in message and "row 4" in message
    with caplog.at_level(logging.WARNING, logger="medvl"):
        manifest = load_manifest(tmp_path / "m.csv", skip_bad=True)
    assert [r["text"] for r in manifest.records] == ["ok"]
    assert [s.row for s in manifest.skipped] == [2, 3, 4]
    assert manifest.skipped[0].path == str(tmp_path / "vols" / "missing.nii.gz")
    assert "missing.nii.gz" in caplog.text
    assert len(read_manifest(tmp_path / "m.csv", skip_bad=True)) == 1
    _write_csv(tmp_path / "n.csv", ["path"], [["vols/a.nii.gz"]])
    with pytest.raises(ValueError, match="volume"):
        read_manifest(tmp_path / "n.csv")


# ------------------------------------------------------------------------------------------------
# CT-RATE


def _ct_rate_root(tmp_path, with_labels=True):
    root = tmp_path / "ct_rate"
    hu = _hu(3)
    stored = (hu.astype(np.int32) + 1024).astype(np.int16)
    affine = np.diag([0.75, 0.75, 1.5, 1.0])
    # fixed: header scaling gives HU; its CSV row ALSO lists intercept -1024 (must not apply twice)
    _write_nifti(ct_rate_volume_path(root, "train", "train_1_a_1.nii.gz", True), stored, affine, (1.0, -1024.0))
    # original: raw stored values, no header scaling, unit zooms -> CSV rescale and CSV spacing
    _write_nifti(ct_rate_volume_path(root, "train", "train_2_a_1.nii.gz", False), stored)
    # valid split (validation file names), original only
    _write_nifti(ct_rate_volume_path(root, "valid", "valid_1_a_1.nii.gz", False), stored)

    _write_csv(root / "radiology_text_reports" / "train_reports.csv",
               ["VolumeName", "ClinicalInformation_EN", "Findings_EN", "Impressions_EN"], [
                   ["train_1_a_1.nii.gz", "cough", " Findings one. ", "Impression one."],
                   ["train_2_a_1.nii.gz", "", "Findings two.", ""],
               ])
    _write_csv(root / "radiology_text_reports" / "validation_reports.csv",
               ["VolumeName", "Findings_EN", "Impressions_EN"], [["valid_1_a_1.nii.gz", "V.", "W."]])
    if with_labels:
        columns = list(reversed(CT_RATE_FINDINGS))  # not in CT_RATE_FINDINGS order
        rows = []
        for name, positive in (("train_1_a_1.nii.gz", {"Cardiomegaly", "Emphysema"}),
                               ("train_2_a_1.nii.gz", {"Medical material"})):
            rows.append([name] + [int(c in positive) for c in columns])
        _write_csv(root / "multi_abnormality_labels" / "train_predicted_labels.csv", ["VolumeName"] + columns, rows)
    meta_header = ["VolumeName", "Manufacturer", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"]
    _write_csv(root / "metadata" / "train_metadata.csv", meta_header, [
        ["train_1_a_1.nii.gz", "SIEMENS", "1", "-1024", "[0.75, 0.75]", "1.5"],
        ["train_2_a_1.nii.gz", "PHILIPS", "1.0", "-1024.0", "[0.6, 0.65]", "2.0"],
    ])
    _write_csv(root / "metadata" / "validation_metadata.csv", meta_header, [
        ["valid_1_a_1.nii.gz", "GE", "1", "-1024", "[0.7, 0.7]", "3"],
    ])
    return root, hu


def test_ct_rate_records(tmp_path):
    root, _ = _ct_rate_root(tmp_path)
    records = ct_rate_records(root, "train")
    assert [r["meta"]["volume_name"] for r in records] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]
    first, second = records
    assert first["meta"]["fixed"] is True and second["meta"]["fixed"] is False
    assert first["image"] == os.path.join(str(root), "dataset", "train_fixed", "train_1", "train_1_a",
                                          "train_1_a_1.nii.gz")
    assert first["text"] == first["report"] == "Findings one. Impression one."
    assert second["text"] == "Findings two."
    assert len(first["labels"]) == 18
    assert [CT_RATE_FINDINGS[i] for i, v in enumerate(first["labels"]) if v] == ["Cardiomegaly", "Emphysema"]
    assert [CT_RATE_FINDINGS[i] for i, v in enumerate(second["labels"]) if v] == ["Medical material"]
    assert first["metadata"]["Manufacturer"] == "SIEMENS"
    assert second["meta"]["rescale"] == (1.0, -1024.0)
    assert second["meta"]["spacing_csv"] == (2.0, 0.6, 0.65)


def test_ct_rate_hu_rescaled_exactly_once(tmp_path):
    root, hu = _ct_rate_root(tmp_path)
    fixed_rec, orig_rec = ct_rate_records(root, "train")
    fixed_hu, fixed_spacing = load_ct_rate_volume(fixed_rec)
    orig_hu, orig_spacing = load_ct_rate_volume(orig_rec)
    expected = np.transpose(hu, (2, 1, 0)).astype(np.float32)
    np.testing.assert_array_equal(fixed_hu, expected)
    np.testing.assert_array_equal(orig_hu, expected)
    assert fixed_hu.min() == -1024.0  # not -2048 (header and CSV both applied)
    assert fixed_rec["meta"]["hu_source"] == "header" and orig_rec["meta"]["hu_source"] == "csv"
    assert fixed_spacing == pytest.approx((1.5, 0.75, 0.75))  # header zooms
    assert orig_spacing == pytest.approx((2.0, 0.6, 0.65))  # unit zooms -> CSV
    loaded = with_ct_rate_volume(orig_rec)
    assert loaded["image"].shape == (6, 8, 8) and loaded["spacing"] == pytest.approx((2.0, 0.6, 0.65))
    assert orig_rec["image"].endswith(".nii.gz")


def test_ct_rate_sanity_check(tmp_path, caplog):
    root, _ = _ct_rate_root(tmp_path)
    _, orig_rec = ct_rate_records(root, "train")
    orig_rec["meta"]["rescale"] = None
    orig_rec.pop("metadata")
    with pytest.raises(ValueError, match="train_2_a_1.nii.gz"):  # stored values taken as HU: min 0
        load_ct_rate_volume(orig_rec)
    with caplog.at_level(logging.WARNING, logger="medvl"):
        vol, _ = load_ct_rate_volume(orig_rec, on_bad_hu="warn")
    assert vol.min() == 0 and "plausible range" in caplog.text


def test_ct_rate_splits_and_missing(tmp_path, caplog):
    root, hu = _ct_rate_root(tmp_path)
    for split in ("valid", "validation"):
        (record,) = ct_rate_records(root, split)
        assert record["text"] == "V. W." and record["meta"]["split"] == "valid"
        assert "labels" not in record  # no valid labels file written
        np.testing.assert_array_equal(load_ct_rate_volume(record)[0], np.transpose(hu, (2, 1, 0)))
    with pytest.raises(ValueError, match="split"):
        ct_rate_records(root, "test")
    with pytest.raises(FileNotFoundError, match="train_2_a_1.nii.gz"):
        ct_rate_records(root, "train", fixed=True)
    with pytest.raises(FileNotFoundError, match="train_1_a_1.nii.gz"):
        ct_rate_records(root, "train", fixed=False)
    with caplog.at_level(logging.WARNING, logger="medvl"):
        records = ct_rate_records(root, "train", fixed=True, skip_missing=True)
    assert [r["meta"]["volume_name"] for r in records] == ["train_1_a_1.nii.gz"]
    assert "train_2_a_1.nii.gz" in caplog.text
    with pytest.raises(FileNotFoundError, match="reports"):
        ct_rate_records(tmp_path / "nowhere", "train")


# ------------------------------------------------------------------------------------------------
# NIfTI + dcm2niix sidecars


_SIDECAR = {
    "Modality": "MR",
    "MagneticFieldStrength": 3,
    "Manufacturer": "Siemens",
    "ManufacturersModelName": "Prisma_fit",
    "SeriesDescription": "t1_mprage_sag",
    "ScanningSequence": "GR_IR",
    "SequenceVariant": "SK_SP_MP",
    "ScanOptions": "IR",
    "MRAcquisitionType": "3D",
    "EchoTime": 0.00226,
    "RepetitionTime": 2.3,
    "InversionTime": 0.9,
    "FlipAngle": 8,
    "ImageOrientationPatientDICOM": [0, 1, 0, 0, 0, -1],
}


def test_read_sidecar_units_and_spellings(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(_SIDECAR))
    meta = read_sidecar(path)
    assert meta["EchoTime"] == pytest.approx(2.26)
    assert meta["RepetitionTime"] == pytest.approx(2300.0)
    assert meta["InversionTime"] == pytest.approx(900.0)
    assert meta["FlipAngle"] == 8.0 and meta["MagneticFieldStrength"] == 3.0
    assert meta["ManufacturerModelName"] == "Prisma_fit" and meta["Manufacturer"] == "Siemens"
    assert meta["ScanningSequence"] == ("GR", "IR")
    assert meta["SequenceVariant"] == ("SK", "SP", "MP")
    assert meta["ScanOptions"] == ("IR",)
    assert meta["MRAcquisitionType"] == "3D" and meta["SeriesDescription"] == "t1_mprage_sag"
    assert meta["Plane"] == "sagittal" and meta["Modality"] == "MR"
    assert meta["ContrastBolusAgent"] is None

    variants = [
        {"ScanningSequence": "gr\\ir", "SequenceVariant": ["sk", "SP"], "ScanOptions": "FAST_GEMS_EDR_GEMS",
         "ManufacturerModelName": "SIGNA", "ImageOrientationPatientDICOM": [1, 0, 0, 0, 1, 0]},
        {"ScanningSequence": ["GR", "IR"], "ScanOptions": ["PFP", "FS"],
         "ImageOrientationPatientDICOM": [1, 0, 0, 0, 0, -1]},
        {"ScanningSequence": "SE", "ImageOrientationPatientDICOM": [1, 0, 0, 0, 0.7071, -0.7071]},
    ]
    results = []
    for i, sidecar in enumerate(variants):
        p = tmp_path / f"v{i}.json"
        p.write_text(json.dumps(sidecar))
        results.append(read_sidecar(p))
    assert results[0]["ScanningSequence"] == ("GR", "IR") == results[1]["ScanningSequence"]
    assert results[0]["SequenceVariant"] == ("SK", "SP")
    assert results[0]["ScanOptions"] == ("FAST_GEMS", "EDR_GEMS")
    assert results[1]["ScanOptions"] == ("PFP", "FS")
    assert results[0]["ManufacturerModelName"] == "SIGNA"
    assert [r["Plane"] for r in results] == ["axial", "coronal", "oblique"]
    assert results[2]["ScanningSequence"] == ("SE",)
    assert results[2]["EchoTime"] is None and results[2]["Modality"] == "MR"


def test_read_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_sidecar(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        read_sidecar(tmp_path / "bad.json")


def test_mr_nifti_records(tmp_path, caplog):
    folder = tmp_path / "mr"
    data = np.ones((4, 4, 3), np.int16)
    _write_nifti(folder / "sub-01_T1w.nii.gz", data)
    (folder / "sub-01_T1w.json").write_text(json.dumps(_SIDECAR))
    _write_nifti(folder / "sub-01_T2w.nii", data)
    (folder / "sub-01_T2w.json").write_text(json.dumps({"EchoTime": 0.1, "RepetitionTime": 4}))
    (folder / "notes.txt").write_text("ignored")
    records = mr_nifti_records(folder)
    assert [os.path.basename(r["image"]) for r in records] == ["sub-01_T1w.nii.gz", "sub-01_T2w.nii"]
    assert records[0]["metadata"]["InversionTime"] == pytest.approx(900.0)
    assert records[1]["metadata"]["EchoTime"] == pytest.approx(100.0)
    assert records[1]["meta"]["sidecar"] == str(folder / "sub-01_T2w.json")

    _write_nifti(folder / "sub-01_dwi.nii.gz", data)
    with pytest.raises(ValueError, match="sub-01_dwi.nii.gz"):
        mr_nifti_records(folder)
    with caplog.at_level(logging.WARNING, logger="medvl"):
        assert len(mr_nifti_records(folder, skip_bad=True)) == 2
    assert "sub-01_dwi.nii.gz" in caplog.text


# ------------------------------------------------------------------------------------------------
# damaged headers and files: errors naming the file and the fix, never a silent default

# NIfTI-1 header offsets: pixdim (8 float32) at 76, sform srow_x (4 float32) at 280
_PIXDIM, _SROW_X = 76, 280


def _patched_nifti(path, *, qform_code=1, sform_code=1, patches=()):
    """An uncompressed NIfTI whose stored header bytes are edited after nibabel wrote it (nibabel refuses
    to write a NaN or zero voxel size itself)."""
    import struct

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    img = nib.Nifti1Image(_hu(), affine)
    img.header.set_qform(affine, code=qform_code)
    img.header.set_sform(affine, code=sform_code)
    nib.save(img, str(path))
    data = bytearray(path.read_bytes())
    for offset, value in patches:
        struct.pack_into("<f", data, offset, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("codes", [(1, 0), (0, 1), (0, 0)], ids=["qform", "sform", "no-form"])
@pytest.mark.parametrize("value", [float("nan"), 0.0], ids=["nan", "zero"])
def test_nifti_unusable_voxel_size_is_refused(tmp_path, codes, value):
    """A NaN pixdim gave spacing nan or an SVD error deep in numpy; a zero one silently became 1 mm."""
    path = _patched_nifti(tmp_path / "v.nii", qform_code=codes[0], sform_code=codes[1],
                          patches=[(_PIXDIM + 8, value)])  # pixdim[2]
    with pytest.raises(ValueError) as err:
        load_volume(path)
    message = str(err.value)
    assert str(path) in message and "pixdim[2]" in message and "fix the header" in message
    _write_csv(tmp_path / "m.csv", ["volume", "text"], [["v.nii", "t"]])
    with pytest.raises(ValueError, match=r"row 1: .*v.nii \(pixdim"):  # checked with the manifest's rows
        read_manifest(tmp_path / "m.csv")


@pytest.mark.parametrize("value, problem", [(0.0, "singular"), (float("nan"), "not finite")])
def test_nifti_broken_affine_is_refused(tmp_path, value, problem):
    path = _patched_nifti(tmp_path / "v.nii", qform_code=0, sform_code=1, patches=[(_SROW_X, value)])
    with pytest.raises(ValueError, match=f"affine from the sform .* is {problem}") as err:
        load_volume(path)
    assert str(path) in str(err.value)


def test_nifti_negative_pixdim_reads_as_its_size(tmp_path):
    """Documented: a negative pixdim is read as its absolute value (as nibabel and the qform do)."""
    path = _patched_nifti(tmp_path / "v.nii", qform_code=0, sform_code=0, patches=[(_PIXDIM + 4, -1.5)])
    assert load_volume(path)[1] == pytest.approx((3.0, 1.5, 1.5))


def test_ct_rate_zero_voxel_size_takes_the_csv_spacing_or_is_refused(tmp_path):
    root, _ = _ct_rate_root(tmp_path)
    _, orig_rec = ct_rate_records(root, "train")
    _patched_nifti(tmp_path / "z.nii", patches=[(_PIXDIM + 4, 0.0)])
    orig_rec["image"] = str(tmp_path / "z.nii")
    orig_rec["meta"]["rescale"] = (1.0, 0.0)
    assert load_ct_rate_volume(orig_rec)[1] == pytest.approx((2.0, 0.6, 0.65))  # the CSV's
    orig_rec["meta"]["spacing_csv"] = None
    orig_rec.pop("metadata")
    with pytest.raises(ValueError, match=r"z.nii: pixdim\[1:4\]"):
        load_ct_rate_volume(orig_rec)


@pytest.mark.parametrize("column, value, problem", [
    ("RescaleIntercept", "-10x4", "not a number"),
    ("RescaleSlope", "inf", "not finite"),
    ("RescaleSlope", "0", "every voxel to the intercept"),
    ("RescaleSlope", "", "absent while the other rescale value is given"),
    ("ZSpacing", "-1", "not a positive finite spacing"),
    ("XYSpacing", "[0.6]", "not two numbers"),
])
def test_ct_rate_damaged_csv_value_is_refused_when_loading(tmp_path, column, value, problem):
    """A damaged rescale cell read as absent took the stored values as HU (or the spacing from the header)."""
    root, _ = _ct_rate_root(tmp_path)
    path = root / "metadata" / "train_metadata.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1][column] = value
    _write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    first, second = ct_rate_records(root, "train")  # the listing survives; the one volume is refused
    load_ct_rate_volume(first)
    with pytest.raises(ValueError, match=f"metadata of train_2_a_1.nii.gz: {column} .*{problem}.*correct that cell"):
        load_ct_rate_volume(second)


def test_ct_rate_nan_cell_is_absent(tmp_path):
    """Documented: "nan" is how pandas writes a missing value, so it reads as absent."""
    root, _ = _ct_rate_root(tmp_path)
    _write_csv(root / "metadata" / "train_metadata.csv", ["VolumeName", "RescaleSlope", "RescaleIntercept"],
               [["train_2_a_1.nii.gz", "nan", "nan"]])
    record = ct_rate_records(root, "train")[1]
    assert record["meta"]["rescale"] is None


def test_text_files_that_are_not_utf8_name_the_file(tmp_path):
    _manifest_files(tmp_path)
    latin1 = "volume,text\nvols/a.nii.gz,Épanchement pleural\n".encode("latin-1")
    (tmp_path / "m.csv").write_bytes(latin1)
    (tmp_path / "m.jsonl").write_bytes('{"volume": "vols/a.nii.gz", "text": "É"}\n'.encode("latin-1"))
    for name in ("m.csv", "m.jsonl"):
        with pytest.raises(ValueError, match=f"manifest .*{name} is not UTF-8 text .* save it as UTF-8"):
            read_manifest(tmp_path / name)
    (tmp_path / "s.json").write_bytes('{"Manufacturer": "Siemens É"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="sidecar .*s.json is not UTF-8"):
        read_sidecar(tmp_path / "s.json")
    root, _ = _ct_rate_root(tmp_path)
    (root / "metadata" / "train_metadata.csv").write_bytes("VolumeName,Manufacturer\nx,É\n".encode("latin-1"))
    with pytest.raises(ValueError, match="CT-RATE metadata file .*train_metadata.csv is not UTF-8"):
        ct_rate_records(root, "train")
