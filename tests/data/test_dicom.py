import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from medvl.data.dicom import (
    MR_METADATA_KEYS,
    Series,
    mr_metadata,
    read_dicom_header,
    read_dicom_series,
    read_series_metadata,
)
from medvl.data.dicom_write import write_dicom_series, write_raw_element


def _bundled(name):
    # download=False: pydicom would otherwise try to fetch files it does not ship.
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


def _bundled_dir(*parts):
    base = os.path.dirname(_bundled("CT_small.dcm"))
    path = os.path.join(base, *parts)
    if not os.path.isdir(path):
        pytest.skip(f"pydicom test folder {'/'.join(parts)} not bundled")
    return path


def _normal(orientation):
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


MR_META = {
    "EchoTime": 9.5,
    "RepetitionTime": 9000.0,
    "InversionTime": 2500.0,
    "FlipAngle": 150.0,
    "MagneticFieldStrength": 3.0,
    "Manufacturer": "SIEMENS",
    "ManufacturerModelName": "Prisma",
    "ScanningSequence": ("SE", "IR"),
    "SequenceVariant": ("SK", "SP", "MP"),
    "ScanOptions": ("FS",),
    "MRAcquisitionType": "2D",
    "ContrastBolusAgent": None,
    "SeriesDescription": "t2_tirm_tra_dark-fluid",
}

OBLIQUE = (
    np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0,
    -np.sin(np.pi / 6) * np.cos(np.pi / 5), np.cos(np.pi / 6) * np.cos(np.pi / 5), np.sin(np.pi / 5),
)


# ---------------------------------------------------------------------------------------------- bundled files


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_bundled_single_file(tmp_path, name):
    src = _bundled(name)
    shutil.copy(src, tmp_path / name)
    ds = pydicom.dcmread(src)
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    expected = ds.pixel_array.astype(np.float64) * slope + intercept
    for target in (tmp_path, tmp_path / name):  # a folder with one file, or the file itself
        series = read_dicom_series(target)
        assert isinstance(series, Series)
        assert series.volume.dtype == np.float32
        assert series.volume.shape == (1,) + ds.pixel_array.shape
        np.testing.assert_array_equal(series.volume[0], expected.astype(np.float32))
        assert series.spacing[1:] == tuple(float(v) for v in ds.PixelSpacing)
        assert series.spacing[0] == pytest.approx(float(ds.SliceThickness))
        assert series.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
        assert series.position == tuple(float(v) for v in ds.ImagePositionPatient)
        assert series.files == [str(tmp_path / name)]


def test_bundled_ct_rescale_applied_once(tmp_path):
    shutil.copy(_bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    ds = pydicom.dcmread(tmp_path / "ct.dcm")
    assert float(ds.RescaleIntercept) == -1024.0
    series = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(series.volume[0], ds.pixel_array.astype(np.float32) - 1024.0)


def test_mr_small_metadata():
    ds = pydicom.dcmread(_bundled("MR_small.dcm"))
    meta = mr_metadata(ds)
    assert tuple(meta) == MR_METADATA_KEYS
    assert meta["EchoTime"] == float(ds.EchoTime) == 240.0
    assert meta["RepetitionTime"] == float(ds.RepetitionTime) == 4000.0
    assert meta["FlipAngle"] == float(ds.FlipAngle) == 90.0
    assert meta["Manufacturer"] == ds.Manufacturer.strip() == "TOSHIBA_MEC"
    assert meta["ManufacturerModelName"] == ds.ManufacturerModelName.strip()
    assert meta["ScanningSequence"] == ("SE",)
    assert meta["SequenceVariant"] == ("NONE",)
    assert meta["MRAcquisitionType"] == "3D"
    assert meta["Modality"] == "MR"
    assert meta["Plane"] == "axial"
    for absent in ("InversionTime", "MagneticFieldStrength", "ContrastBolusAgent", "SeriesDescription", "ScanOptions"):
        assert meta[absent] is None  # ScanOptions is present but empty in MR_small


def test_mr_metadata_normalisation():
    ds = Dataset()
    ds.MagneticFieldStrength = "15000"
    ds.ScanningSequence = ["SE", "IR "]
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS\\PFP"
    ds.Manufacturer = "  GE MEDICAL SYSTEMS "
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    meta = mr_metadata(ds)
    assert meta["MagneticFieldStrength"] == 1.5
    assert meta["ScanningSequence"] == ("SE", "IR")
    assert meta["SequenceVariant"] == ("SK",)
    assert meta["ScanOptions"] == ("FS", "PFP")
    assert meta["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert meta["Plane"] == "sagittal"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert mr_metadata(ds)["Plane"] == "coronal"
    ds.ImageOrientationPatient = list(OBLIQUE)
    assert mr_metadata(ds)["Plane"] == "axial"  # normal (.29, -.5, .81): still dominated by z
    c = np.cos(np.pi / 4)
    ds.ImageOrientationPatient = [c, c, 0, 0, 0, -1]  # normal (-.71, .71, 0)
    assert mr_metadata(ds)["Plane"] == "oblique"
    assert all(v is None for k, v in mr_metadata(Dataset()).items())


def test_bundled_ct_series():
    folder = _bundled_dir("dicomdirtests", "98892001", "CT5N")
    series = read_dicom_series(folder)
    datasets = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))  # axial: normal is +z
    assert series.volume.shape == (len(datasets), 16, 16)
    assert series.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert series.position == tuple(float(v) for v in datasets[0].ImagePositionPatient)
    for k, d in enumerate(datasets):
        expected = d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
        np.testing.assert_array_equal(series.volume[k], expected.astype(np.float32))
    assert [os.path.basename(f) for f in series.files] == [
        os.path.basename(d.filename) for d in datasets
    ]


def test_bundled_series_with_gap_is_refused():
    folder = _bundled_dir("dicomdirtests", "77654033", "CT2")
    with pytest.raises(ValueError, match="missing slice") as err:
        read_dicom_series(folder)
    assert "17106" in str(err.value) and "17136" in str(err.value)


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), OBLIQUE],
    ids=["axial", "sagittal", "oblique"],
)
def test_ct_round_trip(tmp_path, orientation):
    rng = np.random.default_rng(1)
    volume = rng.integers(-1024, 3071, size=(12, 16, 20)).astype(np.float32)
    spacing, position = (2.5, 0.7, 0.8), (-12.5, 40.25, 7.0)
    paths = write_dicom_series(tmp_path, volume, spacing, orientation=orientation, position=position, seed=3)
    assert len(paths) == 12
    assert [os.path.basename(p) for p in paths] != sorted(os.path.basename(p) for p in paths)
    series = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(series.volume, volume)
    assert series.spacing == pytest.approx(spacing, rel=1e-9)
    assert series.orientation == pytest.approx(tuple(float(v) for v in orientation), abs=1e-12)
    assert series.position == pytest.approx(position, abs=1e-9)
    assert series.files == paths
    assert series.metadata["Modality"] == "CT"
    assert series.metadata["NumberOfSlices"] == 12
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    assert ds.InstanceNumber == 12  # reversed with shuffle_names


def test_ct_round_trip_non_unit_rescale(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.uniform(-1000, 2000, size=(6, 8, 10)).astype(np.float32)
    write_dicom_series(tmp_path, volume, (3.0, 0.5, 0.5), rescale=(0.5, -1024.0), shuffle_names=False)
    series = read_dicom_series(tmp_path)
    assert np.abs(series.volume - volume).max() <= 0.25 + 1e-3  # half a stored step


def test_writer_is_deterministic(tmp_path):
    volume = np.zeros((3, 4, 5), dtype=np.float32)
    a = write_dicom_series(tmp_path / "a", volume, (1, 1, 1), seed=7)
    b = write_dicom_series(tmp_path / "b", volume, (1, 1, 1), seed=7)
    c = write_dicom_series(tmp_path / "c", volume, (1, 1, 1), seed=8)
    ua = [pydicom.dcmread(p).SOPInstanceUID for p in a]
    assert ua == [pydicom.dcmread(p).SOPInstanceUID for p in b]
    assert ua != [pydicom.dcmread(p).SOPInstanceUID for p in c]
    assert pydicom.dcmread(a[0]).SeriesInstanceUID == pydicom.dcmread(b[0]).SeriesInstanceUID


def test_mr_round_trip_and_headers(tmp_path):
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 4000, size=(10, 12, 14)).astype(np.float32)
    paths = write_dicom_series(
        tmp_path, volume, (4.0, 0.9, 0.9), modality="MR", metadata=MR_META, orientation=(1, 0, 0, 0, 0, -1)
    )
    series = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(series.volume, volume)
    expected = dict(MR_META, Modality="MR", Plane="coronal")
    assert {k: series.metadata[k] for k in MR_METADATA_KEYS} == expected
    assert read_series_metadata(tmp_path) == series.metadata
    header = read_dicom_header(paths[0])
    assert "PixelData" not in header
    assert header.SOPClassUID == pydicom.uid.MRImageStorage
    assert mr_metadata(header) == expected


# ---------------------------------------------------------------------------------------------- error paths


def _series(tmp_path, n=10, **kw):
    volume = np.arange(n * 4 * 5, dtype=np.float32).reshape(n, 4, 5)
    return write_dicom_series(tmp_path, volume, (2.0, 1.0, 1.0), **kw)


def _edit(path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_missing_slice(tmp_path):
    paths = _series(tmp_path)
    os.remove(paths[5])
    with pytest.raises(ValueError, match="missing slice") as err:
        read_dicom_series(tmp_path)
    assert os.path.basename(paths[4]) in str(err.value) and os.path.basename(paths[6]) in str(err.value)
    with pytest.raises(ValueError, match="missing slice"):
        read_series_metadata(tmp_path)


def test_several_series(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[3], SeriesInstanceUID="1.2.3.4.5")
    with pytest.raises(ValueError, match="SeriesInstanceUID") as err:
        read_dicom_series(tmp_path)
    msg = str(err.value)
    assert "1.2.3.4.5 (1 file" in msg and "(9 files" in msg
    assert paths[3] in msg.split("majority series:")[1]


def test_inconsistent_spacing(tmp_path):
    paths = _series(tmp_path, orientation=OBLIQUE)
    ds = pydicom.dcmread(paths[5])
    shifted = np.asarray([float(v) for v in ds.ImagePositionPatient]) + 0.3 * _normal(OBLIQUE)
    _edit(paths[5], ImagePositionPatient=[f"{v:.10g}" for v in shifted])
    with pytest.raises(ValueError, match="inconsistent slice spacing") as err:
        read_dicom_series(tmp_path)
    msg = str(err.value)
    assert f"position of {paths[5]} looks wrong" in msg
    assert f"between {paths[4]} and {paths[5]}" in msg and f"between {paths[5]} and {paths[6]}" in msg


def test_duplicate_position(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[5], ImagePositionPatient=pydicom.dcmread(paths[4]).ImagePositionPatient)
    with pytest.raises(ValueError, match="duplicate slice positions") as err:
        read_dicom_series(tmp_path)
    assert paths[4] in str(err.value) and paths[5] in str(err.value)


def test_differing_orientation(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(ValueError, match="differing ImageOrientationPatient") as err:
        read_dicom_series(tmp_path)
    assert paths[2] in str(err.value) and paths[3] not in str(err.value)


def test_differing_pixel_spacing_and_matrix(tmp_path):
    paths = _series(tmp_path / "a")
    _edit(paths[7], PixelSpacing=[1.0, 1.2])
    with pytest.raises(ValueError, match="differing PixelSpacing") as err:
        read_dicom_series(tmp_path / "a")
    assert paths[7] in str(err.value)
    paths = _series(tmp_path / "b")
    _edit(paths[1], Rows=8)
    with pytest.raises(ValueError, match="differing Rows/Columns") as err:
        read_dicom_series(tmp_path / "b")
    assert paths[1] in str(err.value)


def test_not_dicom_and_hidden_files(tmp_path):
    _series(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "DICOMDIR").write_bytes(b"skipped by name")
    assert read_dicom_series(tmp_path).volume.shape == (10, 4, 5)  # hidden file and DICOMDIR skipped
    (tmp_path / "notes.txt").write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(ValueError, match="not a DICOM file") as err:
        read_dicom_series(tmp_path)
    assert str(tmp_path / "notes.txt") in str(err.value)
    with pytest.raises(ValueError, match="notes.txt"):
        read_dicom_header(tmp_path / "notes.txt")


def test_corrupt_file(tmp_path):
    paths = _series(tmp_path)
    data = open(paths[2], "rb").read()
    with open(paths[2], "wb") as f:
        f.write(data[: len(data) - 30])  # truncate inside the pixel data
    with pytest.raises(ValueError, match="corrupt|cannot decode") as err:
        read_dicom_series(tmp_path)
    assert paths[2] in str(err.value)


def test_missing_geometry_tag(tmp_path):
    paths = _series(tmp_path)
    ds = pydicom.dcmread(paths[6])
    del ds.ImagePositionPatient
    ds.save_as(paths[6])
    with pytest.raises(ValueError, match="ImagePositionPatient") as err:
        read_dicom_series(tmp_path)
    assert paths[6] in str(err.value)


# A value that is present but damaged is refused (naming the file and the tag), never read as absent: as
# absent, an intercept of "-10x4" became 0 and one slice read 1024 HU too bright.
@pytest.mark.parametrize("keyword, raw, which, problem", [
    ("RescaleIntercept", b"-10x4", "one", "not a number"),
    ("RescaleIntercept", b"nan", "one", "not finite"),
    ("RescaleSlope", b"inf", "one", "not finite"),
    ("RescaleSlope", b"0", "one", "every pixel to the intercept"),
    ("ImagePositionPatient", b"nan\\0\\0", "all", "not finite"),
    ("ImagePositionPatient", b"1\\2", "one", "2 value(s) where the tag holds 3"),
    ("ImageOrientationPatient", b"1\\0\\0\\0\\1\\inf", "one", "not finite"),
    ("ImageOrientationPatient", b"1\\0\\0\\0\\0\\0", "all", "has no slice normal"),
    ("PixelSpacing", b"0\\-0.8", "all", "spacings must be positive"),
    ("PixelSpacing", b"0.8\\x", "one", "not a number"),
    ("SliceThickness", b"1x5", "one", "not a number"),
    ("SpacingBetweenSlices", b"-2", "one", "a negative length"),
])
def test_damaged_geometry_or_rescale_is_refused(tmp_path, keyword, raw, which, problem):
    paths = _series(tmp_path)
    for path in paths if which == "all" else [paths[3]]:
        write_raw_element(path, keyword, raw)
    for read in (read_dicom_series, read_series_metadata):  # headers alone already refuse it
        with pytest.raises(ValueError) as err:
            read(tmp_path)
        message = str(err.value)
        assert keyword in message and problem in message and "correct the tag" in message
        assert (paths[3] if which == "one" else str(tmp_path)) in message


def test_absent_rescale_is_the_identity(tmp_path):
    """Absent RescaleSlope / RescaleIntercept are allowed (DICOM defines them as 1 / 0)."""
    paths = _series(tmp_path, rescale=(1.0, 0.0))
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.save_as(path)
    np.testing.assert_array_equal(read_dicom_series(tmp_path).volume, np.arange(200.0).reshape(10, 4, 5))


def test_corrupt_value_representation_names_the_file(tmp_path):
    """An unknown VR escaped as pydicom's NotImplementedError, without a file name."""
    paths = _series(tmp_path)
    write_raw_element(paths[1], "RescaleIntercept", b"-1024", vr="ZZ")
    for read in (read_dicom_series, read_series_metadata):
        with pytest.raises(ValueError, match="cannot be decoded.*NotImplementedError") as err:
            read(tmp_path)
        assert paths[1] in str(err.value) and "(0028,1052)" in str(err.value)


def test_geometry_stored_with_another_vr_is_refused(tmp_path):
    """PixelSpacing's text read as binary FD decoded to 9.9e-96 and 1e141 mm: finite, accepted, meaningless."""
    paths = _series(tmp_path)
    write_raw_element(paths[0], "PixelSpacing", b"0.312500\\0.3125", vr="FD")  # 16 bytes: two doubles
    with pytest.raises(ValueError, match=r"PixelSpacing \(0028,0030\) is stored with value representation FD, "
                                         r"where DICOM defines DS") as err:
        read_dicom_series(tmp_path)
    assert paths[0] in str(err.value)


def test_corrupt_file_meta_names_the_file(tmp_path):
    """A corrupt VR in the file meta information escaped as NotImplementedError (found by the fuzzer)."""
    paths = _series(tmp_path)
    data = bytearray(open(paths[0], "rb").read())
    at = data.index(b"\x02\x00\x02\x00UI")  # (0002,0002) MediaStorageSOPClassUID, explicit VR
    data[at + 4:at + 6] = b"\x55\xbb"
    open(paths[0], "wb").write(bytes(data))
    for read in (read_dicom_series, read_series_metadata):
        with pytest.raises(ValueError, match=r"element \(0002,0002\) cannot be decoded") as err:
            read(tmp_path)
        assert paths[0] in str(err.value)


def test_one_slice_spacing(tmp_path):
    """SpacingBetweenSlices, else SliceThickness, else the documented 1 mm; present but damaged is refused."""
    volume = np.zeros((1, 4, 5), dtype=np.float32)
    [path] = write_dicom_series(tmp_path, volume, (3.0, 1.0, 1.0))
    assert read_dicom_series(tmp_path).spacing[0] == 3.0
    ds = pydicom.dcmread(path)
    del ds.SpacingBetweenSlices
    ds.SliceThickness = 2.5
    ds.save_as(path)
    assert read_dicom_series(tmp_path).spacing[0] == 2.5
    del ds.SliceThickness
    ds.save_as(path)
    from medvl.data.dicom import SINGLE_SLICE_DEFAULT_MM

    assert read_dicom_series(tmp_path).spacing[0] == SINGLE_SLICE_DEFAULT_MM == 1.0
    write_raw_element(path, "SliceThickness", b"0")
    with pytest.raises(ValueError, match="SliceThickness.*cannot give the slice spacing of a one-slice series"):
        read_dicom_series(tmp_path)
    write_raw_element(path, "SliceThickness", b"abc")
    with pytest.raises(ValueError, match="SliceThickness.*not a number"):
        read_dicom_series(tmp_path)


# ---------------------------------------------------------------------------------------------- enhanced MR


def _item(**tags):
    ds = Dataset()
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def _write_enhanced_mr(path, volume, frame_order, spacing, orientation, origin):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["enhanced", "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["enhanced", "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["enhanced", "series"])
    ds.Modality = "MR"
    ds.Manufacturer = "Philips"
    ds.ManufacturerModelName = "Ingenia"
    ds.MagneticFieldStrength = 1.5
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.InversionRecovery = "NO"
    ds.EchoPlanarPulseSequence = "NO"
    n, rows, cols = volume.shape
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=list(spacing[1:]), SliceThickness=spacing[0])]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=list(orientation))]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(RepetitionTime=3000.0, FlipAngle=90.0)]),
        PixelValueTransformationSequence=Sequence(
            [_item(RescaleSlope=2, RescaleIntercept=-100, RescaleType="US")]
        ),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    normal = _normal(orientation)
    frames = []
    for slice_index in frame_order:  # frame k of the file holds slice frame_order[k]
        pos = np.asarray(origin, dtype=float) + slice_index * spacing[0] * normal
        frames.append(
            _item(
                PlanePositionSequence=Sequence([_item(ImagePositionPatient=[float(v) for v in pos])]),
                MREchoSequence=Sequence([_item(EffectiveEchoTime=100.0)]),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = ((volume[list(frame_order)] + 100) / 2).astype("<u2")
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(str(path), enforce_file_format=True)


def test_enhanced_multiframe_mr(tmp_path):
    rng = np.random.default_rng(5)
    n = 6
    volume = (rng.integers(0, 2000, size=(n, 8, 9)) * 2 - 100).astype(np.float32)
    order = [3, 0, 5, 1, 4, 2]
    orientation = (1, 0, 0, 0, 0, -1)
    _write_enhanced_mr(tmp_path / "enh.dcm", volume, order, (3.0, 0.8, 0.9), orientation, (5.0, 6.0, 7.0))
    for target in (tmp_path, tmp_path / "enh.dcm"):
        series = read_dicom_series(target)
        np.testing.assert_array_equal(series.volume, volume)  # sorted by position, rescale applied once
        assert series.spacing == pytest.approx((3.0, 0.8, 0.9))
        assert series.orientation == orientation
        assert series.position == pytest.approx((5.0, 6.0, 7.0))
        assert series.files == [str(tmp_path / "enh.dcm")]
    meta = series.metadata
    assert meta["EchoTime"] == 100.0 and meta["RepetitionTime"] == 3000.0 and meta["FlipAngle"] == 90.0
    assert meta["ScanningSequence"] == ("SE",)
    assert meta["Plane"] == "coronal" and meta["Modality"] == "MR" and meta["MagneticFieldStrength"] == 1.5
    assert meta["NumberOfSlices"] == n
    assert read_series_metadata(tmp_path) == meta


def test_enhanced_duplicate_frames(tmp_path):
    volume = np.zeros((3, 4, 4), dtype=np.float32)
    _write_enhanced_mr(tmp_path / "enh.dcm", volume, [0, 1, 1], (2.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0), (0, 0, 0))
    with pytest.raises(ValueError, match="duplicate") as err:
        read_dicom_series(tmp_path)
    assert "enh.dcm frame 2" in str(err.value) and "enh.dcm frame 3" in str(err.value)


def test_enhanced_damaged_frame_values(tmp_path):
    volume = np.zeros((3, 4, 4), dtype=np.float32)
    _write_enhanced_mr(tmp_path / "enh.dcm", volume, [0, 1, 2], (2.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0), (0, 0, 0))
    ds = pydicom.dcmread(tmp_path / "enh.dcm")
    position = ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    position["ImagePositionPatient"] = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag("ImagePositionPatient"), "DS", 10, b"0\\0\\nan  ", 0, False, True)
    ds.save_as(tmp_path / "enh.dcm")
    with pytest.raises(ValueError, match="enh.dcm frame 2: ImagePositionPatient.*not finite"):
        read_dicom_series(tmp_path)
