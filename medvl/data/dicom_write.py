"""Writing synthetic single-frame DICOM series (CT or MR) with pydicom, for tests and fixtures.

The files are Part 10 files (128-byte preamble, file meta information) in explicit VR little endian,
CT Image Storage or MR Image Storage. All UIDs come from ``pydicom.uid.generate_uid`` with entropy
derived from `seed`, so the same call writes byte-identical files.

``write_raw_element`` damages a file on purpose (a value or a value representation that pydicom
would refuse to write), for tests of how readers treat broken input.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

__all__ = ["PLANE_ORIENTATIONS", "write_dicom_series", "write_raw_element"]

# ImageOrientationPatient (row direction, column direction) of the standard planes, LPS patient axes.
PLANE_ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}

# Acquisition tags of mr_metadata() that are written from `metadata` when present (keyword -> kind).
_WRITABLE_TAGS = {
    "EchoTime": "DS",
    "RepetitionTime": "DS",
    "InversionTime": "DS",
    "FlipAngle": "DS",
    "MagneticFieldStrength": "DS",
    "Manufacturer": "str",
    "ManufacturerModelName": "str",
    "ScanningSequence": "multi",
    "SequenceVariant": "multi",
    "ScanOptions": "multi",
    "MRAcquisitionType": "str",
    "ContrastBolusAgent": "str",
    "SeriesDescription": "str",
}


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _uid(seed: int, *parts: object):
    return generate_uid(entropy_srcs=["medvl.dicom_write", str(int(seed))] + [str(p) for p in parts])


def write_dicom_series(
    folder: str | os.PathLike,
    volume: np.ndarray,
    spacing: Sequence[float],
    *,
    modality: str = "CT",
    metadata: Optional[dict] = None,
    rescale: tuple[float, float] = (1.0, -1024.0),
    orientation: Optional[Sequence[float]] = None,
    position: Sequence[float] = (0, 0, 0),
    series_uid: Optional[str] = None,
    shuffle_names: bool = True,
    seed: int = 0,
) -> list[str]:
    """Write `volume` (slices, rows, cols) as one single-frame file per slice; return the paths in
    slice order.

    spacing: (slice, row, col) mm; row/col go to PixelSpacing, slice to SliceThickness,
        SpacingBetweenSlices and the step between ImagePositionPatient of consecutive slices, which
        walk from `position` along the normal (cross product of the orientation's row and column
        directions).
    modality: "CT" stores int16 (PixelRepresentation 1) values
        ``round((value - intercept) / slope)`` clipped to int16, with RescaleSlope/RescaleIntercept
        from `rescale` (slope, intercept). "MR" stores the rounded values as they are, uint16
        (PixelRepresentation 0) when they are all in [0, 65535], else int16 clipped, with no rescale
        tags (`rescale` is used for CT only).
    metadata: acquisition tags to write (keys of ``medvl.data.dicom.mr_metadata``; "Modality" comes
        from `modality`; None values are left out). Tuples become multi-valued tags.
    orientation: ImageOrientationPatient (6 cosines). None: the standard cosines of metadata["Plane"]
        (axial, coronal or sagittal, see PLANE_ORIENTATIONS), axial when there is no plane.
    series_uid: SeriesInstanceUID; by default derived from `seed`.
    shuffle_names: file names are a seeded permutation that does not follow slice order, and
        InstanceNumber runs in reverse slice order, so that readers must sort by position. Without
        it names are slice_0000.dcm, ... and InstanceNumber is 1..n in slice order.
    """
    modality = str(modality).upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {vol.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive mm values (slice, row, col), got {spacing}")
    if orientation is None:
        plane = (metadata or {}).get("Plane") or "axial"
        if plane not in PLANE_ORIENTATIONS:
            raise ValueError(f"metadata['Plane'] must be one of {sorted(PLANE_ORIENTATIONS)} to derive the "
                             f"orientation, got {plane!r}; pass orientation= explicitly")
        orientation = PLANE_ORIENTATIONS[plane]
    orientation = tuple(float(v) for v in orientation)
    if len(orientation) != 6:
        raise ValueError(f"orientation must have 6 values, got {orientation}")
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    if not (
        abs(np.linalg.norm(row_dir) - 1) < 1e-3
        and abs(np.linalg.norm(col_dir) - 1) < 1e-3
        and abs(float(row_dir @ col_dir)) < 1e-3
    ):
        raise ValueError(f"orientation {orientation} is not two orthonormal direction cosines")
    normal = np.cross(row_dir, col_dir)
    position = np.asarray([float(p) for p in position], dtype=np.float64)
    if position.shape != (3,):
        raise ValueError(f"position must have 3 values, got {tuple(position)}")
    slope, intercept = (float(rescale[0]), float(rescale[1]))
    if modality == "CT" and slope == 0:
        raise ValueError("rescale slope must be non-zero")

    n, rows, cols = vol.shape
    if modality == "CT":
        stored = np.clip(np.rint((vol.astype(np.float64) - intercept) / slope), -32768, 32767).astype("<i2")
        signed = True
    else:
        values = np.rint(vol.astype(np.float64))
        if values.min() >= 0 and values.max() <= 65535:
            stored, signed = values.astype("<u2"), False
        else:
            stored, signed = np.clip(values, -32768, 32767).astype("<i2"), True

    os.makedirs(folder, exist_ok=True)
    study_uid = _uid(seed, "study")
    series_uid = str(series_uid) if series_uid is not None else _uid(seed, "series")
    frame_uid = _uid(seed, "frame-of-reference")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage

    if shuffle_names and n > 1:
        perm = np.random.default_rng(seed).permutation(n)
        if np.array_equal(perm, np.arange(n)):
            perm = perm[::-1].copy()
        names = [f"IM{int(perm[i]):05d}.dcm" for i in range(n)]
    else:
        names = [f"slice_{i:04d}.dcm" for i in range(n)]

    paths = []
    for i in range(n):
        path = os.path.join(os.fspath(folder), names[i])
        sop_uid = _uid(seed, series_uid, "instance", i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)

        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.PatientID = "MEDVL-SYNTH"
        ds.PatientName = "Synthetic^Phantom"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = (n - i) if shuffle_names else (i + 1)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

        pos = position + i * spacing[0] * normal
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.SliceLocation = _ds(float(pos @ normal))
        ds.SliceThickness = _ds(spacing[0])
        ds.SpacingBetweenSlices = _ds(spacing[0])
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[2])]

        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        if modality == "CT":
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleType = "HU"

        for key, kind in _WRITABLE_TAGS.items():
            value = (metadata or {}).get(key)
            if value is None:
                continue
            if kind == "DS":
                setattr(ds, key, _ds(value))
            elif kind == "multi":
                items = [value] if isinstance(value, str) else [str(v) for v in value]
                if not items:  # an empty tuple: the tag is absent
                    continue
                setattr(ds, key, items if len(items) > 1 else items[0])
            else:
                setattr(ds, key, str(value))

        ds.PixelData = np.ascontiguousarray(stored[i]).tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_raw_element(path: str | os.PathLike, keyword: str | int, value: bytes, vr: Optional[str] = None) -> None:
    """Set the element `keyword` (a keyword or a tag) of the file at `path` to the bytes `value`, written
    as they are with the value representation `vr` (default: the element's own, or the dictionary's).

    pydicom validates values it is given as Python objects, so a damaged file (``b"-10x4"`` as a
    RescaleIntercept, ``b"nan"`` as a position, an unknown VR such as ``"ZZ"``) can only be made from
    raw bytes. The value is padded with a space to an even length, as DICOM requires.
    """
    ds = pydicom.dcmread(os.fspath(path))
    tag = Tag(keyword)
    if vr is None:
        vr = ds[tag].VR if tag in ds else pydicom.datadict.dictionary_VR(tag)
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"value must be bytes, got {type(value).__name__}")
    raw = bytes(value) + (b" " if len(value) % 2 else b"")
    implicit_vr, little_endian = ds.original_encoding
    # the element claims the file's own encoding, so that saving writes its bytes untouched
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, bool(implicit_vr), bool(little_endian))
    ds.save_as(os.fspath(path))
