"""CT-RATE (chest CT volumes + radiology reports + 18 abnormality labels) as distributed.

Expected layout under ``root``::

    dataset/{train,valid}/<patient>/<scan>/<VolumeName>          e.g. dataset/train/train_1/train_1_a/train_1_a_1.nii.gz
    dataset/{train,valid}_fixed/<patient>/<scan>/<VolumeName>    (the re-released volumes, same names)
    radiology_text_reports/{train,validation}_reports.csv         VolumeName, Findings_EN, Impressions_EN, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 findings (0/1)
    metadata/{train,validation}_metadata.csv                      VolumeName, RescaleSlope, RescaleIntercept,
                                                                  XYSpacing ("[0.75, 0.75]"), ZSpacing, ...

``<patient>`` and ``<scan>`` are the first two and three ``_``-separated parts of the VolumeName
(``train_1`` and ``train_1_a`` for ``train_1_a_1.nii.gz``). Split names are "train" and "valid";
"validation" is accepted as well; the report and metadata files use "validation".

Hounsfield units (rescale applied exactly once), decided per file from the data:

- If the NIfTI header carries a non-trivial scaling (scl_slope != 1 or scl_inter != 0, as the
  ``_fixed`` volumes do), the header's scaling gives HU and the CSV's RescaleSlope/RescaleIntercept
  are ignored.
- Otherwise the stored values are raw and ``HU = stored * RescaleSlope + RescaleIntercept`` from the
  metadata CSV. Without a CSV slope/intercept the stored values are taken as HU (a warning is logged).

The choice is logged (logger ``"medvl"``, debug level) and recorded in the returned records' meta when
loading. A sanity check then looks at the decoded minimum (air, or the scanner's padding value, lies
around -1000 to -3024 HU): a minimum outside ``hu_range`` (default (-3100, -500)) raises a
``ValueError`` naming the file (``on_bad_hu="warn"`` logs instead, "ignore" skips the check). Note that
it catches a missing rescale (stored values of about 0..4095) but not every double rescale (air at
-2048 is inside the range), which the one-scaling rule above prevents.

Spacing: the header's zooms, unless they are all 1 or a stored pixdim is zero or not finite, in which case
the CSV's ZSpacing and XYSpacing (row spacing first, as DICOM PixelSpacing; (dz, dy, dx) = (Z, XY[0], XY[1]))
are used; unusable zooms without a CSV spacing are refused. Volumes are returned in the (z, y, x) RAS
layout of ``medvl.data.manifest.load_volume``.

CSV values: an empty cell, "nan" or "none" (how pandas writes a missing value) is absent; a value that is
present but not a finite number (or a slope of 0, a spacing that is not positive, a slope without an
intercept) makes loading that volume raise a ``ValueError`` naming the CSV, the volume and the column.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any, Optional, Union

import numpy as np

from medvl.data.entities import CT_RATE_FINDINGS
from medvl.data.manifest import nifti_to_zyx, nifti_voxel_size_problem, not_utf8_error
from medvl.data.values import finite_float

__all__ = [
    "CT_RATE_FINDINGS",
    "ct_rate_records",
    "ct_rate_volume_path",
    "load_ct_rate_volume",
    "with_ct_rate_volume",
]

logger = logging.getLogger("medvl")

PathLike = Union[str, os.PathLike]

_SPLITS = {"train": ("train", "train"), "valid": ("valid", "validation"), "validation": ("valid", "validation")}
DEFAULT_HU_RANGE = (-3100.0, -500.0)


def _split_names(split: str) -> tuple[str, str]:
    """(short name used by the folders and label file, long name used by the report/metadata files)."""
    try:
        return _SPLITS[str(split).lower()]
    except KeyError:
        raise ValueError(f"split must be 'train' or 'valid' (or 'validation'), got {split!r}") from None


def _read_csv(path: str, what: str, required: bool) -> Optional[dict[str, dict[str, str]]]:
    """Rows of a CT-RATE CSV keyed by VolumeName; None when the file is absent and not required."""
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"CT-RATE {what} file not found: {path}")
        return None
    rows: dict[str, dict[str, str]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "VolumeName" not in reader.fieldnames:
                raise ValueError(f"CT-RATE {what} file {path} has no VolumeName column")
            for row in reader:
                name = (row.get("VolumeName") or "").strip()
                if name:
                    rows[name] = row
    except UnicodeDecodeError as e:
        raise not_utf8_error(path, f"CT-RATE {what} file", e) from None
    return rows


def _text(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    return "" if text.lower() in ("nan", "none") else text


def ct_rate_volume_path(root: PathLike, split: str, volume_name: str, fixed: bool) -> str:
    """Where a volume lies in the distributed layout (whether or not it exists)."""
    short, _ = _split_names(split)
    parts = volume_name.split("_")
    if len(parts) < 4:
        raise ValueError(f"unexpected CT-RATE VolumeName {volume_name!r} (expected e.g. train_1_a_1.nii.gz)")
    folder = short + ("_fixed" if fixed else "")
    return os.path.join(os.fspath(root), "dataset", folder, "_".join(parts[:2]), "_".join(parts[:3]), volume_name)


def _labels(row: dict[str, str], name: str, path: str) -> list[int]:
    out = []
    for finding in CT_RATE_FINDINGS:
        if finding not in row:
            raise KeyError(f"CT-RATE labels file {path} has no column {finding!r}")
        value = _text(row[finding])
        try:
            out.append(int(float(value)))
        except ValueError:
            raise ValueError(f"CT-RATE labels of {name}: {finding!r} is {row[finding]!r}, expected 0/1") from None
    return out


def ct_rate_records(root: PathLike, split: str = "train", fixed: Union[str, bool] = "auto", *,
                    skip_missing: bool = False) -> list[dict]:
    """One record per volume of the report CSV of `split`.

    Record: ``{"image": path, "text": report, "report": report, "labels": 18 ints in CT_RATE_FINDINGS
    order (absent when the labels file is absent), "metadata": the metadata CSV row (strings; absent
    when that file is absent), "meta": {"volume_name", "split", "fixed", "source",
    "rescale": (slope, intercept) from the CSV or None, "spacing_csv": (dz, dy, dx) or None,
    "loader": "medvl.data.ct_rate.load_ct_rate_volume"}}``. The report is Findings_EN and
    Impressions_EN joined by a space (empty parts left out).

    HU: ``load_ct_rate_volume(record)`` (or ``with_ct_rate_volume(record)`` for a record holding the
    array). A generic NIfTI loader would leave the original (non-fixed) volumes in stored values.

    fixed: "auto" uses ``<split>_fixed`` when the volume is there, else the original one; True / False
        require the fixed / original volume.
    skip_missing: False raises ``FileNotFoundError`` listing the volumes not found (with the paths
        tried); True drops them with a warning. A volume with no labels row (when the labels file is
        present) raises ``KeyError``.
    """
    if fixed not in ("auto", True, False):
        raise ValueError(f"fixed must be 'auto', True or False, got {fixed!r}")
    short, long = _split_names(split)
    root = os.fspath(root)
    reports_path = os.path.join(root, "radiology_text_reports", f"{long}_reports.csv")
    labels_path = os.path.join(root, "multi_abnormality_labels", f"{short}_predicted_labels.csv")
    metadata_path = os.path.join(root, "metadata", f"{long}_metadata.csv")
    reports = _read_csv(reports_path, "reports", required=True)
    labels = _read_csv(labels_path, "labels", required=False)
    metadata = _read_csv(metadata_path, "metadata", required=False)

    records: list[dict] = []
    missing: list[str] = []
    for name, row in reports.items():
        candidates = {
            "auto": [True, False], True: [True], False: [False],
        }[fixed]
        path, is_fixed = None, None
        for want_fixed in candidates:
            p = ct_rate_volume_path(root, short, name, want_fixed)
            if os.path.isfile(p):
                path, is_fixed = p, want_fixed
                break
        if path is None:
            tried = " or ".join(ct_rate_volume_path(root, short, name, f) for f in candidates)
            missing.append(f"{name} ({tried})")
            continue
        report = " ".join(t for t in (_text(row.get("Findings_EN")), _text(row.get("Impressions_EN"))) if t)
        meta_row = metadata.get(name) if metadata is not None else None
        record: dict[str, Any] = {
            "image": path,
            "text": report,
            "report": report,
            "meta": {
                "volume_name": name,
                "split": short,
                "fixed": is_fixed,
                "source": reports_path,
                "rescale": _listed(_csv_rescale, meta_row),
                "spacing_csv": _listed(_csv_spacing, meta_row),
                "loader": "medvl.data.ct_rate.load_ct_rate_volume",
            },
        }
        if labels is not None:
            if name not in labels:
                raise KeyError(f"CT-RATE volume {name} has no row in {labels_path}")
            record["labels"] = _labels(labels[name], name, labels_path)
        if meta_row is not None:
            record["metadata"] = dict(meta_row)
        records.append(record)
    if missing:
        listing = "; ".join(missing[:20]) + (f"; ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        if not skip_missing:
            raise FileNotFoundError(f"CT-RATE {short}: {len(missing)} volume(s) not found: {listing}")
        logger.warning("CT-RATE %s: skipped %d volume(s) not found: %s", short, len(missing), listing)
    return records


# ----------------------------------------------------------------------------------------------------
# HU


def _bad_csv_value(row: dict, column: str, problem: str) -> ValueError:
    name = _text(row.get("VolumeName")) or "?"
    return ValueError(f"CT-RATE metadata of {name}: {column} is {row.get(column)!r}, {problem}; correct that cell of "
                      "the metadata CSV (or empty it when the value is unknown)")


def _float(row: dict, column: str) -> Optional[float]:
    """The cell as a finite number; None when empty / "nan" / "none"; a ValueError when it is anything else."""
    return finite_float(_text(row.get(column)), error=lambda problem: _bad_csv_value(row, column, problem))


def _csv_rescale(row: Optional[dict]) -> Optional[tuple[float, float]]:
    """(slope, intercept) from the metadata row; None when the row or both cells are absent."""
    if row is None:
        return None
    slope, inter = _float(row, "RescaleSlope"), _float(row, "RescaleIntercept")
    if slope is None and inter is None:
        return None
    if slope is None or inter is None:
        missing = "RescaleSlope" if slope is None else "RescaleIntercept"
        raise _bad_csv_value(row, missing, "absent while the other rescale value is given")
    if slope == 0:
        raise _bad_csv_value(row, "RescaleSlope", "which would map every voxel to the intercept")
    return slope, inter


def _csv_spacing(row: Optional[dict]) -> Optional[tuple[float, float, float]]:
    """(dz, dy, dx) from the metadata row; None when the row or both spacing cells are absent."""
    if row is None:
        return None
    z = _float(row, "ZSpacing")
    xy_text = _text(row.get("XYSpacing"))
    if z is None and not xy_text:
        return None
    try:
        xy = json.loads(xy_text) if xy_text else None
    except json.JSONDecodeError:
        raise _bad_csv_value(row, "XYSpacing", "not a JSON list such as [0.75, 0.75]") from None
    if isinstance(xy, (int, float)) and not isinstance(xy, bool):
        xy = [xy, xy]
    if z is None or xy is None:
        raise _bad_csv_value(row, "ZSpacing" if z is None else "XYSpacing", "absent while the other spacing is given")
    if not isinstance(xy, list) or len(xy) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in xy):
        raise _bad_csv_value(row, "XYSpacing", "not two numbers such as [0.75, 0.75]")
    dy, dx = float(xy[0]), float(xy[1])
    for column, value in (("ZSpacing", z), ("XYSpacing", dy), ("XYSpacing", dx)):
        if not math.isfinite(value) or value <= 0:
            raise _bad_csv_value(row, column, "not a positive finite spacing")
    return z, dy, dx


def _listed(parse, row: Optional[dict]):
    """``parse(row)`` for the listing of records; a bad cell is left for loading to report (with
    --skip-bad it then drops that one volume instead of the whole listing)."""
    try:
        return parse(row)
    except ValueError:
        return None


def load_ct_rate_volume(record: dict, *, hu_range: Optional[tuple[float, float]] = DEFAULT_HU_RANGE,
                        on_bad_hu: str = "raise") -> tuple[np.ndarray, tuple[float, float, float]]:
    """The record's volume in HU as float32 (z, y, x) and its spacing (dz, dy, dx) mm.

    The rescale is applied exactly once (see the module docstring); the record's meta gets
    ``"hu_source"``: "header" or "csv" (or "none") saying which scaling was used.
    """
    import nibabel as nib

    if on_bad_hu not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_bad_hu must be 'raise', 'warn' or 'ignore', got {on_bad_hu!r}")
    path = os.fspath(record["image"])
    meta = record.setdefault("meta", {})
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CT-RATE volume not found: {path}")
    rescale = meta.get("rescale")
    spacing_csv = meta.get("spacing_csv")
    if rescale is None and record.get("metadata") is not None:
        rescale = _csv_rescale(record["metadata"])
    if spacing_csv is None and record.get("metadata") is not None:
        spacing_csv = _csv_spacing(record["metadata"])

    img = nib.load(path)
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    header_scaled = not (slope == 1.0 and inter == 0.0) and math.isfinite(slope) and math.isfinite(inter)
    if header_scaled:
        data = img.get_fdata(dtype=np.float32)  # applies scl_slope / scl_inter once
        source = "header"
        logger.debug("CT-RATE %s: HU from the NIfTI header scaling (slope %g, intercept %g); CSV ignored",
                     path, slope, inter)
    else:
        raw = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        data = raw.astype(np.float32)
        if rescale is not None:
            data = data * np.float32(rescale[0]) + np.float32(rescale[1])
            source = "csv"
            logger.debug("CT-RATE %s: HU from the CSV rescale (slope %g, intercept %g)", path, *rescale)
        else:
            source = "none"
            logger.warning("CT-RATE %s: no header scaling and no CSV RescaleSlope/RescaleIntercept; "
                           "taking the stored values as HU", path)
    meta["hu_source"] = source

    header_unusable = nifti_voxel_size_problem(img) is not None
    header_unit = all(abs(float(z) - 1.0) < 1e-6 for z in img.header.get_zooms()[:3])
    use_csv = spacing_csv is not None and (header_unusable or header_unit)
    volume, spacing = nifti_to_zyx(img, data, spacing=tuple(float(s) for s in spacing_csv) if use_csv else None)

    if hu_range is not None and on_bad_hu != "ignore" and volume.size:
        lo = float(volume.min())
        if not hu_range[0] <= lo <= hu_range[1]:
            message = (f"CT-RATE {path}: decoded minimum {lo:g} HU is outside the plausible range "
                       f"[{hu_range[0]:g}, {hu_range[1]:g}] for air/padding (rescale via {source}); "
                       "missing or repeated rescale?")
            if on_bad_hu == "raise":
                raise ValueError(message)
            logger.warning(message)
    return volume.astype(np.float32, copy=False), spacing


def with_ct_rate_volume(record: dict, **kwargs: Any) -> dict:
    """A copy of `record` whose "image" is the HU array and "spacing" its (dz, dy, dx), ready for
    ``VolumeTextDataset`` (the array is in RAS (z, y, x), i.e. orientation None)."""
    out = dict(record)
    out["meta"] = dict(record.get("meta") or {})
    volume, spacing = load_ct_rate_volume(out, **kwargs)
    out["image"], out["spacing"] = volume, spacing
    return out
