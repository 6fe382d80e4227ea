"""Reading DICOM series into volumes, and the acquisition metadata that goes with them.

A *series* is one folder holding the single-frame files of one SeriesInstanceUID, or one enhanced
multi-frame file (e.g. Enhanced MR Image Storage) whose frames are the slices. Slices are ordered by
the projection of ImagePositionPatient on the slice normal (the cross product of the row and column
direction cosines of ImageOrientationPatient); file names and InstanceNumber are never used for
ordering because neither is reliable across vendors and anonymisation tools.

The reader refuses, with a ``ValueError`` that names the offending file(s), folders that mix several
series, have missing slices (a gap above 1.5x the median gap), uneven spacing (consecutive gaps that
differ by more than 1% of the larger one), duplicate positions, slices whose orientation, pixel spacing
or matrix size differ from the others, and files that are not DICOM or cannot be decoded (an element
with a corrupt value representation included).

Geometry and rescale values are never guessed. ImagePositionPatient, ImageOrientationPatient and
PixelSpacing must be present; RescaleSlope, RescaleIntercept, SliceThickness and SpacingBetweenSlices
may be absent (DICOM allows it), but when any of these seven is present it must hold finite numbers,
as many as the tag has (3, 6, 2, else 1), or the file is refused with a ``ValueError`` that names the
file, the tag, the value as written and the fix. PixelSpacing must be positive, RescaleSlope non-zero,
SliceThickness and SpacingBetweenSlices not negative. These tags must also have DICOM's value
representation (DS): stored as, say, binary FD they decode to finite but meaningless numbers.

Pixel values are returned in modality units: RescaleSlope and RescaleIntercept (for enhanced files,
the PixelValueTransformationSequence of the functional groups) are applied exactly once, to the raw
stored values (pydicom's ``pixel_array`` does not apply them itself); absent, they are 1 and 0.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError

from medvl.data.metadata import MR_METADATA_KEYS
from medvl.data.values import finite_float

__all__ = [
    "GEOMETRY_RESCALE_TAGS",
    "MR_METADATA_KEYS",
    "Series",
    "mr_metadata",
    "read_dicom_header",
    "read_dicom_series",
    "read_series_metadata",
]


_FLOAT_KEYS = ("EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "MagneticFieldStrength")
_MULTI_KEYS = ("ScanningSequence", "SequenceVariant", "ScanOptions")
_STRING_KEYS = (
    "Manufacturer",
    "ManufacturerModelName",
    "MRAcquisitionType",
    "ContrastBolusAgent",
    "SeriesDescription",
    "Modality",
)

# Media Storage Directory Storage: a DICOMDIR, whatever its file name.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# The tags whose present values must be finite numbers, and how many each holds (see the module docstring).
GEOMETRY_RESCALE_TAGS = {
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "PixelSpacing": 2,
    "SliceThickness": 1,
    "SpacingBetweenSlices": 1,
    "RescaleSlope": 1,
    "RescaleIntercept": 1,
}

# Tolerances of the geometry checks.
_ORIENTATION_ATOL = 1e-4  # direction cosines
_PIXEL_SPACING_RTOL = 1e-4
_DUPLICATE_ATOL_MM = 1e-3  # two slices closer than this along the normal are the same position
_GAP_FACTOR = 1.5  # a gap above 1.5x the median gap means missing slices
_SPACING_RTOL = 0.01  # consecutive gaps may differ by at most 1% of the larger one


@dataclass
class Series:
    """One image series as a volume.

    volume: float32 (slices, rows, cols) in modality units (rescale applied once).
    spacing: (slice, row, col) in mm; the slice spacing is the mean gap of the sorted positions along
        the normal, row/col come from PixelSpacing (row spacing first, as DICOM stores it).
    orientation: the six ImageOrientationPatient floats.
    position: ImagePositionPatient of the first slice after sorting.
    metadata: mr_metadata() of the series plus a few identifiers (see ``_series_metadata``).
    files: the files read, in slice order (one entry for an enhanced multi-frame file).
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    orientation: tuple
    position: tuple
    metadata: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# small value helpers


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes)) and not str(value).strip():
        return True
    try:
        return len(value) == 0  # empty MultiValue / sequence
    except TypeError:
        return False


def _to_str(value: Any) -> Optional[str]:
    if _is_empty(value):
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _to_upper_tuple(value: Any) -> Optional[tuple[str, ...]]:
    """A multi-valued CS as a tuple of stripped upper-case strings; a single value gives a 1-tuple."""
    if _is_empty(value):
        return None
    if isinstance(value, str):
        items: Iterable[Any] = value.split("\\")
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        items = value
    else:
        items = [value]
    out = tuple(str(v).strip().upper() for v in items if str(v).strip())
    return out or None


def _floats(value: Any, count: int) -> Optional[tuple[float, ...]]:
    """Lenient: None when absent, unparseable or the wrong count (for metadata such as the Plane; the
    geometry of a series goes through ``_checked_numbers``)."""
    if _is_empty(value):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(math.isfinite(v) for v in out) else None


def _as_written(value: Any) -> str:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _tag_name(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _bad_value(where: str, keyword: str, value: Any, problem: str) -> ValueError:
    text = _as_written(value)
    shown = f"'{text}'" if text.isprintable() else repr(text)
    return ValueError(
        f"{where}: {_tag_name(keyword)} is {shown}, {problem}; correct the tag in the file "
        "(e.g. with pydicom or dcmodify) or leave this series out"
    )


def _checked_numbers(value: Any, keyword: str, where: str, count: int) -> Optional[tuple[float, ...]]:
    """``count`` finite numbers, or None when the tag is absent or empty.

    A present value that does not parse, is not finite or has another number of values raises a
    ValueError naming ``where`` (the file) and the tag: such a value is damaged, and reading it as
    absent would give a plausible but wrong volume."""
    if _is_empty(value):
        return None
    items = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise _bad_value(where, keyword, value, "not a number") from None
    if len(out) != count:
        raise _bad_value(where, keyword, value, f"{len(out)} value(s) where the tag holds {count}")
    if not all(math.isfinite(v) for v in out):
        raise _bad_value(where, keyword, value, "not finite")
    return out


def _checked_number(value: Any, keyword: str, where: str) -> Optional[float]:
    out = _checked_numbers(value, keyword, where, 1)
    return None if out is None else out[0]


def _first_item(ds: Optional[Dataset], keyword: str) -> Optional[Dataset]:
    if ds is None:
        return None
    seq = ds.get(keyword)
    if seq is None or len(seq) == 0:
        return None
    return seq[0]


def _normal(orientation: tuple[float, ...], where: str = "") -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise ValueError(f"{where + ': ' if where else ''}ImageOrientationPatient {orientation} has no slice normal "
                         "(a zero or parallel row and column direction); correct the tag in the file or leave this "
                         "series out")
    return n / norm


def plane_from_orientation(orientation: Optional[Iterable[float]]) -> Optional[str]:
    """"axial", "coronal", "sagittal" from the dominant axis of the slice normal; "oblique" when the
    largest normal component is below 0.8; None when the orientation is absent or degenerate."""
    if orientation is None:
        return None
    values = tuple(float(v) for v in orientation)
    if len(values) != 6:
        return None
    try:
        n = np.abs(_normal(values))
    except ValueError:
        return None
    axis = int(np.argmax(n))
    if n[axis] < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]  # patient x = left-right, y = ant-post, z = head-feet


# ----------------------------------------------------------------------------------------------
# metadata


def _enhanced_groups(ds: Dataset) -> list[Dataset]:
    """Functional group items to look into for an enhanced file: shared first, then the first frame."""
    groups = []
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    if shared is not None:
        groups.append(shared)
    first = _first_item(ds, "PerFrameFunctionalGroupsSequence")
    if first is not None:
        groups.append(first)
    return groups


def _from_groups(groups: list[Dataset], sequence: str, keyword: str) -> Any:
    for group in groups:
        item = _first_item(group, sequence)
        if item is not None and not _is_empty(item.get(keyword)):
            return item.get(keyword)
    return None


def _enhanced_scanning_sequence(ds: Dataset) -> Optional[tuple[str, ...]]:
    """Enhanced MR has no ScanningSequence; derive the classic terms from EchoPulseSequence
    (SPIN -> SE, GRADIENT -> GR, BOTH -> SE+GR), InversionRecovery (YES -> IR) and
    EchoPlanarPulseSequence (YES -> EP)."""
    terms: list[str] = []
    if (_to_str(ds.get("InversionRecovery")) or "").upper() == "YES":
        terms.append("IR")
    echo = (_to_str(ds.get("EchoPulseSequence")) or "").upper()
    if echo in ("SPIN", "BOTH"):
        terms.append("SE")
    if echo in ("GRADIENT", "BOTH"):
        terms.append("GR")
    if (_to_str(ds.get("EchoPlanarPulseSequence")) or "").upper() == "YES":
        terms.append("EP")
    return tuple(terms) or None


def _orientation_of(ds: Dataset) -> Optional[tuple[float, ...]]:
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is None:
        groups = _enhanced_groups(ds)
        orientation = _floats(_from_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    return orientation


def mr_metadata(dataset: Dataset) -> dict:
    """The acquisition metadata of an MR (or any) dataset as a dict with the keys MR_METADATA_KEYS.

    - EchoTime, RepetitionTime, InversionTime: ms, float. FlipAngle: degrees, float.
    - MagneticFieldStrength: tesla, float. Values above 100 are taken as written in gauss-like units
      by some scanners (15000 for 1.5 T) and divided by 10000.
    - ScanningSequence, SequenceVariant, ScanOptions: tuples of stripped upper-case strings
      (a single value becomes a 1-tuple).
    - Manufacturer, ManufacturerModelName, MRAcquisitionType, ContrastBolusAgent, SeriesDescription,
      Modality: stripped strings.
    - Plane: "axial"/"coronal"/"sagittal"/"oblique" from ImageOrientationPatient (see
      ``plane_from_orientation``).
    Absent or empty tags are present as keys with the value None.

    Enhanced MR files keep these values in functional groups; they are looked up there when the
    top-level tag is absent: EchoTime from MREchoSequence/EffectiveEchoTime, RepetitionTime and
    FlipAngle from MRTimingAndRelatedParametersSequence, InversionTime from MRModifierSequence/
    InversionTimes, orientation from PlaneOrientationSequence (shared groups first, then the first
    frame), and ScanningSequence derived from EchoPulseSequence/InversionRecovery/
    EchoPlanarPulseSequence.
    """
    ds = dataset
    groups = _enhanced_groups(ds)
    out: dict[str, Any] = {}

    echo = ds.get("EchoTime")
    if _is_empty(echo):
        echo = _from_groups(groups, "MREchoSequence", "EffectiveEchoTime")
    tr = ds.get("RepetitionTime")
    if _is_empty(tr):
        tr = _from_groups(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
    ti = ds.get("InversionTime")
    if _is_empty(ti):
        ti = _from_groups(groups, "MRModifierSequence", "InversionTimes")
    flip = ds.get("FlipAngle")
    if _is_empty(flip):
        flip = _from_groups(groups, "MRTimingAndRelatedParametersSequence", "FlipAngle")
    out["EchoTime"] = finite_float(echo)
    out["RepetitionTime"] = finite_float(tr)
    out["InversionTime"] = finite_float(ti)
    out["FlipAngle"] = finite_float(flip)
    b0 = finite_float(ds.get("MagneticFieldStrength"))
    if b0 is not None and b0 > 100:
        b0 = b0 / 10000.0
    out["MagneticFieldStrength"] = b0

    out["Manufacturer"] = _to_str(ds.get("Manufacturer"))
    out["ManufacturerModelName"] = _to_str(ds.get("ManufacturerModelName"))
    scanning = _to_upper_tuple(ds.get("ScanningSequence"))
    if scanning is None and groups:
        scanning = _enhanced_scanning_sequence(ds)
    out["ScanningSequence"] = scanning
    out["SequenceVariant"] = _to_upper_tuple(ds.get("SequenceVariant"))
    out["ScanOptions"] = _to_upper_tuple(ds.get("ScanOptions"))
    acq = _to_str(ds.get("MRAcquisitionType"))
    out["MRAcquisitionType"] = acq.upper() if acq else None
    out["ContrastBolusAgent"] = _to_str(ds.get("ContrastBolusAgent"))
    out["SeriesDescription"] = _to_str(ds.get("SeriesDescription"))
    out["Modality"] = _to_str(ds.get("Modality"))
    out["Plane"] = plane_from_orientation(_orientation_of(ds))
    return out


def _series_metadata(ds: Dataset, n_slices: int, where: str) -> dict:
    """mr_metadata() plus identifiers: SeriesInstanceUID, StudyInstanceUID, PatientID,
    SliceThickness (mm) and NumberOfSlices."""
    meta = mr_metadata(ds)
    meta["SeriesInstanceUID"] = _to_str(ds.get("SeriesInstanceUID"))
    meta["StudyInstanceUID"] = _to_str(ds.get("StudyInstanceUID"))
    meta["PatientID"] = _to_str(ds.get("PatientID"))
    thickness = _non_negative(ds.get("SliceThickness"), "SliceThickness", where)
    if thickness is None:
        thickness = _non_negative(_from_groups(_enhanced_groups(ds), "PixelMeasuresSequence", "SliceThickness"),
                                  "SliceThickness", where)
    meta["SliceThickness"] = thickness
    meta["NumberOfSlices"] = int(n_slices)
    return meta


# ----------------------------------------------------------------------------------------------
# reading files


def _decode_elements(ds: Dataset, path: str) -> None:
    """Convert every element (nested sequences and the file meta information too) now, so that a corrupt
    one (an unknown value representation, a length that does not fit its VR) is refused here with the
    file's name rather than escaping later, from whichever lookup first touches it, as pydicom's own
    exception. A geometry or rescale tag stored with another VR than DICOM's (binary FD bytes where the
    standard has DS text) is refused too: its bytes decode to finite but meaningless numbers."""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception as exc:  # pydicom raises NotImplementedError, ValueError, struct.error, ...
            raise ValueError(
                f"{path}: element {tag} cannot be decoded ({type(exc).__name__}: {exc}); the file is corrupt: "
                "replace it with a good copy or leave this series out"
            ) from exc
        if element.keyword in GEOMETRY_RESCALE_TAGS and element.VR != dictionary_VR(tag):
            raise ValueError(
                f"{path}: {_tag_name(element.keyword)} is stored with value representation {element.VR}, where DICOM "
                f"defines {dictionary_VR(tag)}; the file is corrupt: replace it with a good copy or leave this "
                "series out"
            )
        if element.VR == "SQ":
            for item in element.value:
                _decode_elements(item, path)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta is not ds:
        _decode_elements(file_meta, path)


def _read(path: str, *, stop_before_pixels: bool) -> Dataset:
    """dcmread with errors that name the file. Files without the 128-byte preamble are retried with
    force=True and accepted only if they then hold recognisable image/SOP tags."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        ds = None
    except Exception as exc:  # truncated or otherwise broken file
        raise ValueError(f"{path}: unreadable or corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    if ds is None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            plausible = any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality"))
        except Exception:
            plausible = False
        if not plausible:
            raise ValueError(f"{path}: not a DICOM file")
    _decode_elements(ds, path)
    return ds


def read_dicom_header(path: str | os.PathLike) -> Dataset:
    """The header of one DICOM file, read with ``stop_before_pixels=True``.

    Raises ValueError naming the file when it is not DICOM or cannot be parsed."""
    return _read(os.fspath(path), stop_before_pixels=True)


def _list_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: not a folder")
    names = sorted(
        name
        for name in os.listdir(folder)
        if not name.startswith(".")
        and name.upper() != "DICOMDIR"
        and os.path.isfile(os.path.join(folder, name))
    )
    return [os.path.join(folder, name) for name in names]


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = None if meta is None else meta.get("MediaStorageSOPClassUID")
    return str(sop) == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _is_multiframe(ds: Dataset) -> bool:
    if "PerFrameFunctionalGroupsSequence" in ds:
        return True
    frames = finite_float(ds.get("NumberOfFrames"))
    return frames is not None and frames > 1


def _read_folder(folder: str, *, stop_before_pixels: bool) -> list[tuple[str, Dataset]]:
    """(path, dataset) of every DICOM file of a folder, or of the one file when `folder` is a file."""
    folder = os.fspath(folder)
    if os.path.isfile(folder):
        paths = [folder]
    else:
        paths = _list_files(folder)
    items = []
    for path in paths:
        ds = _read(path, stop_before_pixels=stop_before_pixels)
        if _is_dicomdir(ds):
            continue
        items.append((path, ds))
    if not items:
        raise ValueError(f"{folder}: no DICOM files found")
    return items


def _check_single_series(items: list[tuple[str, Dataset]], folder: str) -> None:
    uids = [str(_to_str(ds.get("SeriesInstanceUID"))) for _, ds in items]
    counts = Counter(uids)
    if len(counts) <= 1:
        return
    majority = counts.most_common(1)[0][0]
    parts = []
    for uid, count in counts.most_common():
        files = [os.path.basename(p) for (p, _), u in zip(items, uids) if u == uid]
        shown = ", ".join(files[:5]) + (", ..." if len(files) > 5 else "")
        parts.append(f"{uid} ({count} file{'s' if count != 1 else ''}: {shown})")
    odd = [p for (p, _), u in zip(items, uids) if u != majority]
    raise ValueError(
        f"{folder}: {len(counts)} SeriesInstanceUIDs in one folder: " + "; ".join(parts)
        + f". Files outside the majority series: {', '.join(odd[:10])}" + (", ..." if len(odd) > 10 else "")
    )


def _order_slices(labels: list[str], positions: np.ndarray, normal: np.ndarray, where: str):
    """Sort slices along the normal and check the gaps. Returns (order, slice spacing or None)."""
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    if len(order) < 2:
        return order, None
    sorted_proj = proj[order]
    gaps = np.diff(sorted_proj)
    names = [labels[i] for i in order]
    dup = np.nonzero(gaps < _DUPLICATE_ATOL_MM)[0]
    if dup.size:
        pairs = "; ".join(f"{names[i]} and {names[i + 1]} at {sorted_proj[i]:.4f} mm" for i in dup[:5])
        raise ValueError(f"{where}: duplicate slice positions along the slice normal: {pairs}")
    median = float(np.median(gaps))
    big = np.nonzero(gaps > _GAP_FACTOR * median)[0]
    if big.size:
        parts = "; ".join(
            f"{gaps[i]:.4g} mm between {names[i]} and {names[i + 1]}" for i in big[:5]
        )
        raise ValueError(
            f"{where}: missing slice(s): gap above {_GAP_FACTOR}x the median spacing {median:.4g} mm: {parts}"
        )
    uneven = [i for i in range(len(gaps) - 1) if abs(gaps[i] - gaps[i + 1]) > _SPACING_RTOL * max(gaps[i], gaps[i + 1])]
    if uneven:
        # Name the gaps that deviate from the median; a slice between two deviating gaps is the
        # likely culprit (a displaced slice lengthens one gap and shortens the next).
        off = np.abs(gaps - median) > _SPACING_RTOL * median
        irregular = [int(i) for i in np.nonzero(off)[0]] or [uneven[0], uneven[0] + 1]
        parts = "; ".join(f"{gaps[i]:.4g} mm between {names[i]} and {names[i + 1]}" for i in irregular[:6])
        suspects = [names[i + 1] for i in irregular if i + 1 < len(gaps) and off[i + 1]]
        hint = f"; the slice position of {', '.join(suspects[:5])} looks wrong" if suspects else ""
        raise ValueError(
            f"{where}: inconsistent slice spacing (consecutive gaps differ by more than "
            f"{_SPACING_RTOL:.0%}; median gap {median:.4g} mm): {parts}{hint}"
        )
    spacing = float((sorted_proj[-1] - sorted_proj[0]) / (len(sorted_proj) - 1))
    return order, spacing


def _require(value, what: str, path: str):
    if value is None:
        raise ValueError(f"{path}: missing {what}, which a slice of a volume needs; add it to the file or leave "
                         "this series out")
    return value


def _matrix_size(ds: Dataset, path: str) -> tuple[int, int]:
    size = []
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        if value is None:
            raise ValueError(f"{path}: missing {keyword}; add it to the file or leave this series out")
        if not isinstance(value, int) or value < 1:
            raise _bad_value(path, keyword, value, "not a positive integer")
        size.append(value)
    return size[0], size[1]


def _check_same(values: list, labels: list[str], what: str, where: str, close) -> None:
    ref = values[0]
    bad = [i for i, v in enumerate(values) if not close(v, ref)]
    if bad:
        # name the minority: compare each against the most common value
        keyed = Counter(tuple(float(x) for x in np.round(np.asarray(v, dtype=float), 4).ravel()) for v in values)
        common = keyed.most_common(1)[0][0]
        odd = [
            f"{labels[i]} ({tuple(values[i])})"
            for i, v in enumerate(values)
            if tuple(float(x) for x in np.round(np.asarray(v, dtype=float), 4).ravel()) != common
        ] or [f"{labels[i]} ({tuple(values[i])})" for i in bad]
        raise ValueError(
            f"{where}: differing {what}: expected {tuple(common)}, found in " + "; ".join(odd[:10])
            + ("; ..." if len(odd) > 10 else "")
        )


def _orient_close(a, b) -> bool:
    return bool(np.allclose(a, b, atol=_ORIENTATION_ATOL, rtol=0))


def _spacing_close(a, b) -> bool:
    return bool(np.allclose(a, b, rtol=_PIXEL_SPACING_RTOL, atol=0))


def _pixels(ds: Dataset, path: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise ValueError(f"{path}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    return np.asarray(arr)


def _rescale_values(slope_value: Any, intercept_value: Any, where: str) -> tuple[Optional[float], Optional[float]]:
    slope = _checked_number(slope_value, "RescaleSlope", where)
    if slope == 0:
        raise _bad_value(where, "RescaleSlope", slope_value, "which would map every pixel to the intercept")
    return slope, _checked_number(intercept_value, "RescaleIntercept", where)


def _rescale(ds: Dataset, where: str) -> tuple[float, float]:
    """(slope, intercept) of the file; absent tags are the identity (1, 0), as DICOM defines them."""
    slope, intercept = _rescale_values(ds.get("RescaleSlope"), ds.get("RescaleIntercept"), where)
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _non_negative(value: Any, keyword: str, where: str) -> Optional[float]:
    number = _checked_number(value, keyword, where)
    if number is not None and number < 0:
        raise _bad_value(where, keyword, value, "a negative length")
    return number


# The slice spacing of a one-slice series when neither SpacingBetweenSlices nor SliceThickness is given:
# the volume is one plane, and the spacing only sizes that plane's voxels for resampling.
SINGLE_SLICE_DEFAULT_MM = 1.0


def _single_slice_spacing(candidates: Iterable[tuple[str, Any]], where: str) -> float:
    """Slice spacing of a one-slice series from the first of (keyword, value) that is present;
    ``SINGLE_SLICE_DEFAULT_MM`` when none is. A present zero cannot serve and is refused."""
    for keyword, value in candidates:
        number = _non_negative(value, keyword, where)
        if number is None:
            continue
        if number == 0:
            raise _bad_value(where, keyword, value, "which cannot give the slice spacing of a one-slice series")
        return number
    return SINGLE_SLICE_DEFAULT_MM


def _check_lengths(ds: Dataset, where: str) -> None:
    """SliceThickness and SpacingBetweenSlices, when present, must be lengths even where the spacing
    comes from the positions: a damaged value is a damaged file."""
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        _non_negative(ds.get(keyword), keyword, where)


def _pixel_spacing(value: Any, where: str) -> tuple[float, ...]:
    spacing = _require(_checked_numbers(value, "PixelSpacing", where, 2), "PixelSpacing", where)
    if min(spacing) <= 0:
        raise _bad_value(where, "PixelSpacing", value, "spacings must be positive")
    return spacing


def _read_single_frames(items, where: str, with_pixels: bool):
    labels = [p for p, _ in items]
    orientations, positions, pixel_spacings, shapes = [], [], [], []
    for path, ds in items:
        if _is_multiframe(ds):
            raise ValueError(
                f"{path}: multi-frame file mixed with other files; put an enhanced multi-frame file "
                "in a folder of its own or pass its path"
            )
        orientations.append(_require(_checked_numbers(ds.get("ImageOrientationPatient"), "ImageOrientationPatient",
                                                      path, 6), "ImageOrientationPatient", path))
        positions.append(_require(_checked_numbers(ds.get("ImagePositionPatient"), "ImagePositionPatient", path, 3),
                                  "ImagePositionPatient", path))
        pixel_spacings.append(_pixel_spacing(ds.get("PixelSpacing"), path))
        _check_lengths(ds, path)
        _rescale(ds, path)  # refused here, before any pixel is decoded, also when only headers are read
        shapes.append(_matrix_size(ds, path))
    _check_same(orientations, labels, "ImageOrientationPatient", where, _orient_close)
    _check_same(pixel_spacings, labels, "PixelSpacing", where, _spacing_close)
    _check_same(shapes, labels, "Rows/Columns", where, lambda a, b: tuple(a) == tuple(b))
    orientation = orientations[0]
    normal = _normal(orientation, labels[0])
    order, slice_spacing = _order_slices(labels, np.asarray(positions), normal, where)
    first_path, first_ds = items[order[0]]
    if slice_spacing is None:
        slice_spacing = _single_slice_spacing(
            ((k, first_ds.get(k)) for k in ("SpacingBetweenSlices", "SliceThickness")), first_path)
    volume = None
    if with_pixels:
        volume = np.empty((len(items),) + shapes[0], dtype=np.float32)
        for k, i in enumerate(order):
            path, ds = items[i]
            arr = _pixels(ds, path)
            if arr.shape != shapes[0]:
                raise ValueError(f"{path}: pixel array shape {arr.shape} does not match Rows/Columns {shapes[0]}")
            slope, intercept = _rescale(ds, path)
            volume[k] = (arr.astype(np.float64) * slope + intercept).astype(np.float32)
    spacing = (float(slice_spacing), float(pixel_spacings[0][0]), float(pixel_spacings[0][1]))
    return (
        volume,
        spacing,
        tuple(orientation),
        tuple(positions[order[0]]),
        _series_metadata(first_ds, len(items), first_path),
        [labels[i] for i in order],
    )


def _frame_value(per_frame: Optional[Dataset], shared: Optional[Dataset], sequence: str, keyword: str):
    for group in (per_frame, shared):
        item = _first_item(group, sequence)
        if item is not None and not _is_empty(item.get(keyword)):
            return item.get(keyword)
    return None


def _read_enhanced(path: str, ds: Dataset, with_pixels: bool):
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) == 0:
        raise ValueError(f"{path}: multi-frame file without PerFrameFunctionalGroupsSequence is not supported")
    n = len(per_frame)
    frames_tag = _checked_number(ds.get("NumberOfFrames"), "NumberOfFrames", path)
    if frames_tag is not None and frames_tag != n:
        raise ValueError(f"{path}: NumberOfFrames {int(frames_tag)} but {n} per-frame functional groups")
    labels = [f"{path} frame {i + 1}" for i in range(n)]
    orientations, positions, pixel_spacings, rescales = [], [], [], []
    top_orientation = _checked_numbers(ds.get("ImageOrientationPatient"), "ImageOrientationPatient", path, 6)
    _check_lengths(ds, path)
    for i, frame in enumerate(per_frame):
        where = labels[i]
        o = _checked_numbers(_frame_value(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient"),
                             "ImageOrientationPatient", where, 6)
        orientations.append(_require(o or top_orientation, "ImageOrientationPatient", where))
        p = _checked_numbers(_frame_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient"),
                             "ImagePositionPatient", where, 3)
        positions.append(_require(p, "ImagePositionPatient (PlanePositionSequence)", where))
        s = _frame_value(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        pixel_spacings.append(_pixel_spacing(ds.get("PixelSpacing") if _is_empty(s) else s, where))
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            _non_negative(_frame_value(frame, shared, "PixelMeasuresSequence", keyword), keyword, where)
        slope, intercept = _rescale_values(
            _frame_value(frame, shared, "PixelValueTransformationSequence", "RescaleSlope"),
            _frame_value(frame, shared, "PixelValueTransformationSequence", "RescaleIntercept"), where)
        if slope is None and intercept is None:
            slope, intercept = _rescale(ds, path)
        rescales.append((1.0 if slope is None else slope, 0.0 if intercept is None else intercept))
    _check_same(orientations, labels, "ImageOrientationPatient", path, _orient_close)
    _check_same(pixel_spacings, labels, "PixelSpacing", path, _spacing_close)
    orientation = orientations[0]
    order, slice_spacing = _order_slices(labels, np.asarray(positions), _normal(orientation, path), path)
    if slice_spacing is None:
        slice_spacing = _single_slice_spacing(
            [(k, _frame_value(per_frame[0], shared, "PixelMeasuresSequence", k))
             for k in ("SpacingBetweenSlices", "SliceThickness")]
            + [(k, ds.get(k)) for k in ("SpacingBetweenSlices", "SliceThickness")], labels[0])
    volume = None
    if with_pixels:
        arr = _pixels(ds, path)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] != n:
            raise ValueError(f"{path}: pixel array shape {arr.shape} does not hold {n} single-channel frames")
        volume = np.empty(arr.shape, dtype=np.float32)
        for k, i in enumerate(order):
            slope, intercept = rescales[i]
            volume[k] = (arr[i].astype(np.float64) * slope + intercept).astype(np.float32)
    meta = _series_metadata(ds, n, path)
    spacing = (float(slice_spacing), float(pixel_spacings[0][0]), float(pixel_spacings[0][1]))
    return volume, spacing, tuple(orientation), tuple(positions[order[0]]), meta, [path]


def _read_any(folder, with_pixels: bool):
    folder = os.fspath(folder)
    items = _read_folder(folder, stop_before_pixels=not with_pixels)
    _check_single_series(items, folder)
    if len(items) == 1 and _is_multiframe(items[0][1]):
        return _read_enhanced(items[0][0], items[0][1], with_pixels)
    return _read_single_frames(items, folder, with_pixels)


def read_dicom_series(folder: str | os.PathLike) -> Series:
    """Read the series in `folder` (not recursive) into a Series.

    Hidden files (names starting with ".") and DICOMDIR files are skipped; any other file that is
    not DICOM raises. `folder` may also be the path of a single file (a one-slice series, or an
    enhanced multi-frame file). A one-slice series takes its slice spacing from SpacingBetweenSlices,
    else SliceThickness, else ``SINGLE_SLICE_DEFAULT_MM`` (1 mm) when neither tag is present.

    Raises ValueError naming the file (and the tag) for every refusal listed in the module docstring.
    """
    volume, spacing, orientation, position, meta, files = _read_any(folder, with_pixels=True)
    return Series(volume=volume, spacing=spacing, orientation=orientation, position=position, metadata=meta, files=files)


def read_series_metadata(folder: str | os.PathLike) -> dict:
    """The metadata dict of the series in `folder` (as in Series.metadata), reading headers only.

    The series checks (one SeriesInstanceUID, geometry) run as well since they need only headers.
    """
    return _read_any(folder, with_pixels=False)[4]
