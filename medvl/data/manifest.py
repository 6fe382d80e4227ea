"""Manifests of real volume-report pairs (CSV or JSONL), and loading the volumes they name.

A manifest is a CSV file (a header row, then one row per volume) or a JSONL file (one JSON object per
line; blank lines are ignored). The format is chosen by the extension: ``.csv`` or ``.jsonl``/``.ndjson``.
Columns (CSV) or keys (JSONL):

- ``volume`` (required): a NIfTI file (``.nii`` / ``.nii.gz``) or a DICOM series folder. Relative
  paths are resolved against ``root`` when given, else against the manifest's own folder.
- ``report`` / ``text`` (optional): the report. When only one of them is given it serves as both.
- ``metadata`` (optional): a JSON object (a JSON string in a CSV cell, an object in JSONL).
- ``label`` (optional): an integer class id (-1 when absent).
- ``labels`` (optional): multi-label findings as a JSON list (``[1, 0, -1]``) or a ``;``-separated
  string (``1;0;-1``); every value must be 0, 1 or -1.

Rows are numbered from 1 in file order (the CSV header and JSONL blank lines are not counted); every
record carries ``meta = {"row": n, "line": line_in_file, "source": manifest_path}``.

Error handling: ``read_manifest`` checks every row up front (the volume exists, a NIfTI header parses,
a DICOM folder holds at least one file, the label fields are well formed) and raises one ``ValueError``
listing every bad row with its row number and path. ``load_manifest(..., skip_bad=True)`` instead
drops those rows, logs a warning (logger ``"medvl"``) listing them, and returns them in
``Manifest.skipped``; with ``skip_bad=False`` it raises like ``read_manifest``.

Axis convention of :func:`load_volume`: NIfTI volumes are reoriented (flips and axis permutations only,
never resampled) to the closest RAS+ voxel axes (i -> Right, j -> Anterior, k -> Superior) and returned
as ``(z, y, x) = (k, j, i)``, which is the layout ``medvl.data.transforms.volume_to_metatensor`` expects
with ``orientation=None`` ("RAS"). The intensity scaling of the header (scl_slope / scl_inter) is
applied exactly once (by nibabel). DICOM folders are read with
:func:`medvl.data.dicom.read_dicom_series` and keep its (slices, rows, cols) layout in the series'
own orientation (not reoriented; use ``read_dicom_series`` directly when the orientation is needed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

__all__ = [
    "Manifest",
    "SkippedRow",
    "is_nifti_path",
    "load_manifest",
    "load_volume",
    "nifti_to_zyx",
    "nifti_voxel_size_problem",
    "read_manifest",
]

logger = logging.getLogger("medvl")

PathLike = Union[str, os.PathLike]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class SkippedRow:
    """A manifest row that was dropped: its 1-based row number, the volume path (as resolved, or as
    written when it could not be resolved) and why."""

    row: int
    path: Optional[str]
    reason: str


@dataclass
class Manifest:
    """The records of a manifest and the rows dropped with ``skip_bad=True``."""

    records: list[dict] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)


def is_nifti_path(path: PathLike) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(_NIFTI_SUFFIXES)


# ----------------------------------------------------------------------------------------------------
# volumes


def _stored_header(img: Any) -> Any:
    """The header as the file holds it: the header of a loaded image has been "fixed" by nibabel
    already (a zero pixdim replaced by 1, a negative one by its absolute value)."""
    path = img.get_filename()
    if path is None:
        return img.header
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as f:
        return type(img.header).from_fileobj(f, check=False)


def _image_name(img: Any) -> str:
    return img.get_filename() or "the NIfTI image"


def nifti_voxel_size_problem(img: Any) -> Optional[str]:
    """Why the stored voxel size (pixdim[1:4]) of `img` cannot be used, or None when it can: a voxel
    size must be a finite non-zero number (nibabel would read a zero as 1 mm). A negative pixdim is
    read as its absolute value, as nibabel and the NIfTI standard's qform do."""
    pixdim = [float(v) for v in np.asarray(_stored_header(img)["pixdim"], dtype=np.float64)[1:4]]
    bad = [i + 1 for i, v in enumerate(pixdim) if not math.isfinite(v) or v == 0]
    if not bad:
        return None
    return (f"pixdim[1:4] (the voxel size) is {tuple(pixdim)}: pixdim[{', '.join(map(str, bad))}] is not a finite "
            "non-zero number")


def _checked_affine(img: Any) -> np.ndarray:
    """The voxel-to-world affine of `img`; refused when it is not finite or maps voxels onto a plane or
    a line (no orientation can be derived from it)."""
    header = img.header
    if int(header.get("sform_code", 0)) > 0:
        source = "sform (srow_x/y/z)"
    elif int(header.get("qform_code", 0)) > 0:
        source = "qform (quatern_b/c/d, qoffset, pixdim)"
    else:
        source = "pixdim (no sform or qform is set)"
    affine = np.asarray(img.affine, dtype=np.float64)
    linear = affine[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    problem = None
    if not np.isfinite(affine).all():
        problem = "not finite"
    elif norms.min() == 0 or abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(norms)):
        problem = "singular (two voxel axes point the same way, or one has length 0)"
    if problem is not None:
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in affine[:3])
        raise ValueError(f"{_image_name(img)}: the voxel-to-world affine from the {source} is {problem}: [{rows}]; "
                         "fix the header (e.g. with nibabel: img.set_sform(affine, code=1), or fslorient) or leave "
                         "this volume out")
    return affine


def nifti_to_zyx(img: Any, data: np.ndarray, *, spacing: Optional[tuple[float, float, float]] = None
                 ) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient `data` (the (i, j, k) voxel array of the nibabel image `img`, already in the wanted
    units) to the closest RAS+ axes and return it as (z, y, x) with its spacing (dz, dy, dx) in mm.

    Only flips and permutations are applied (``nibabel.orientations.io_orientation`` of the affine);
    a trailing singleton 4th dimension is dropped, any other 4-D volume is refused.

    spacing: (dz, dy, dx) mm to return instead of the header's voxel size (CT-RATE's metadata CSV);
        None: the header's, which must be finite and non-zero (see ``nifti_voxel_size_problem``).
    Raises ValueError naming the file when the affine is not finite or singular, or the voxel size
    is unusable and no `spacing` is given.
    """
    import nibabel as nib

    arr = np.asarray(data)
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{_image_name(img)}: expected a 3-D NIfTI volume, got shape {arr.shape}")
    if spacing is None:
        problem = nifti_voxel_size_problem(img)
        if problem is not None:
            raise ValueError(f"{_image_name(img)}: {problem}; fix the header (e.g. with nibabel: "
                             "img.header.set_zooms(...)) or leave this volume out")
    _checked_affine(img)
    zooms = [abs(float(z)) for z in img.header.get_zooms()[:3]]
    ornt = nib.orientations.io_orientation(img.affine)
    arr = nib.orientations.apply_orientation(arr, ornt)
    ras_zooms = [1.0, 1.0, 1.0]
    for axis in range(3):
        ras_zooms[int(ornt[axis, 0])] = zooms[axis]
    volume = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
    if spacing is None:
        spacing = (ras_zooms[2], ras_zooms[1], ras_zooms[0])
    return volume, tuple(float(s) for s in spacing)


def load_volume(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a NIfTI file or a DICOM series folder as (float32 volume (z, y, x), spacing (dz, dy, dx) mm).

    NIfTI: the header's scl_slope / scl_inter are applied once (``get_fdata``), the voxel axes are
    reoriented to the closest RAS+ axes and returned as (k, j, i) (see the module docstring).
    DICOM: ``read_dicom_series(path)``'s volume and spacing (rescale applied once, (slices, rows, cols)).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"volume not found: {path}")
    if os.path.isdir(path):
        from medvl.data.dicom import read_dicom_series

        series = read_dicom_series(path)
        return series.volume.astype(np.float32, copy=False), tuple(float(s) for s in series.spacing)
    if not is_nifti_path(path):
        raise ValueError(f"not a NIfTI file (.nii/.nii.gz) nor a DICOM folder: {path}")
    import nibabel as nib

    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except Exception as e:  # nibabel raises several kinds for damaged files
        raise ValueError(f"cannot read NIfTI file {path}: {e}") from e
    volume, spacing = nifti_to_zyx(img, data)
    return volume.astype(np.float32, copy=False), spacing


# ----------------------------------------------------------------------------------------------------
# manifest rows


def not_utf8_error(path: str, what: str, exc: UnicodeDecodeError) -> ValueError:
    """The error for a text file (manifest, CSV, sidecar) that is not UTF-8, with where and the fix."""
    return ValueError(f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                      "cannot be decoded); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)")


def _rows(path: str) -> list[tuple[int, int, Any]]:
    """As ``_read_rows``, with a file that is not UTF-8 refused by name."""
    try:
        return _read_rows(path)
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, "manifest", e) from None


def _read_rows(path: str) -> list[tuple[int, int, Any]]:
    """(row number from 1, line number in the file, raw row) for each row; a raw row is a dict of
    strings (CSV) or any JSON value (JSONL), or an Exception when the line is not valid JSON."""
    lower = path.lower()
    out: list[tuple[int, int, Any]] = []
    if lower.endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "volume" not in [n.strip() for n in reader.fieldnames]:
                raise ValueError(f"manifest {path} has no 'volume' column (columns: {reader.fieldnames})")
            line = 1
            for n, row in enumerate(reader, start=1):
                line += 1
                out.append((n, line, {(k or "").strip(): v for k, v in row.items()}))
                line = reader.line_num
        return out
    if lower.endswith(_JSONL_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            n = 0
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                n += 1
                try:
                    out.append((n, line, json.loads(text)))
                except json.JSONDecodeError as e:
                    out.append((n, line, ValueError(f"invalid JSON: {e}")))
        return out
    raise ValueError(f"manifest must be .csv or .jsonl/.ndjson, got {path}")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_labels(value: Any) -> Optional[list[int]]:
    if _blank(value):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [v.strip() for v in text.split(";")]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"labels must be a list or a ';'-separated string, got {value!r}")
    out = []
    for v in value:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"labels must be 0, 1 or -1, got {v!r}") from None
        if f not in (0.0, 1.0, -1.0):
            raise ValueError(f"labels must be 0, 1 or -1, got {v!r}")
        out.append(int(f))
    return out


def _parse_label(value: Any) -> int:
    if _blank(value):
        return -1
    if isinstance(value, bool):
        raise ValueError(f"label must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"label must be an integer, got {value!r}") from None
    if not f.is_integer():
        raise ValueError(f"label must be an integer, got {value!r}")
    return int(f)


def _parse_metadata(value: Any) -> Optional[dict]:
    if _blank(value):
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


def _check_volume(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError("volume not found")
    if os.path.isdir(path):
        if not any(not name.startswith(".") and os.path.isfile(os.path.join(path, name))
                   for name in os.listdir(path)):
            raise ValueError("DICOM folder holds no files")
        return
    if not is_nifti_path(path):
        raise ValueError("not a NIfTI file (.nii/.nii.gz) nor a DICOM folder")
    import nibabel as nib

    try:
        img = nib.load(path)  # header only; the data is read lazily
    except Exception as e:
        raise ValueError(f"unreadable NIfTI header: {e}") from None
    # the geometry needs only the header: refuse a broken one now, with the other bad rows
    problem = nifti_voxel_size_problem(img)
    if problem is not None:
        raise ValueError(problem)
    _checked_affine(img)


def _record(raw: Any, n: int, line: int, source: str, base: str) -> tuple[Optional[dict], Optional[SkippedRow]]:
    if isinstance(raw, Exception):
        return None, SkippedRow(n, None, str(raw))
    if not isinstance(raw, dict):
        return None, SkippedRow(n, None, f"expected a JSON object, got {type(raw).__name__}")
    volume = raw.get("volume")
    if _blank(volume) or not isinstance(volume, str):
        return None, SkippedRow(n, None, "no 'volume'")
    path = os.path.normpath(os.path.join(base, os.path.expanduser(volume.strip())))
    try:
        _check_volume(path)
        label = _parse_label(raw.get("label"))
        labels = _parse_labels(raw.get("labels"))
        metadata = _parse_metadata(raw.get("metadata"))
    except (OSError, ValueError) as e:
        return None, SkippedRow(n, path, str(e))
    report = None if _blank(raw.get("report")) else str(raw["report"])
    text = None if _blank(raw.get("text")) else str(raw["text"])
    record: dict[str, Any] = {
        "image": path,
        "text": text if text is not None else (report or ""),
        "report": report if report is not None else text,
        "label": label,
        "meta": {"row": n, "line": line, "source": source},
    }
    if labels is not None:
        record["labels"] = labels
    if metadata is not None:
        record["metadata"] = metadata
    return record, None


def load_manifest(path: PathLike, *, root: Optional[PathLike] = None, skip_bad: bool = False) -> Manifest:
    """Read a manifest (see the module docstring) into a :class:`Manifest`.

    skip_bad: False raises one ``ValueError`` naming every bad row (row number, path, reason); True
        drops them, logs a warning listing them and returns them in ``Manifest.skipped``.
    """
    source = os.path.abspath(os.fspath(path))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"manifest not found: {source}")
    base = os.fspath(root) if root is not None else os.path.dirname(source)
    manifest = Manifest()
    for n, line, raw in _rows(source):
        record, bad = _record(raw, n, line, source, base)
        if bad is not None:
            manifest.skipped.append(bad)
        else:
            manifest.records.append(record)
    if manifest.skipped:
        listing = "; ".join(f"row {s.row}: {s.path or '-'} ({s.reason})" for s in manifest.skipped)
        if not skip_bad:
            raise ValueError(f"manifest {source}: {len(manifest.skipped)} bad row(s): {listing}")
        logger.warning("manifest %s: skipped %d bad row(s): %s", source, len(manifest.skipped), listing)
    return manifest


def read_manifest(path: PathLike, *, root: Optional[PathLike] = None, skip_bad: bool = False) -> list[dict]:
    """The records of a manifest as a list of dataset records (see the module docstring).

    Raises ``ValueError`` naming every bad row unless ``skip_bad=True``, which drops them and logs a
    warning (use :func:`load_manifest` to get the dropped rows back).
    """
    return load_manifest(path, root=root, skip_bad=skip_bad).records
