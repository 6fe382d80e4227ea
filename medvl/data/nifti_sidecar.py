"""MR volumes as NIfTI files with dcm2niix (BIDS) JSON sidecars, turned into our metadata dicts.

``read_sidecar`` maps a sidecar to the keys ``MR_METADATA_KEYS`` with the units of
``medvl.data.dicom.mr_metadata``:

- EchoTime, RepetitionTime, InversionTime: dcm2niix writes seconds; converted to ms.
- FlipAngle (degrees) and MagneticFieldStrength (T) as they are (a field strength above 100 is taken
  as gauss-like units and divided by 10000, as ``mr_metadata`` does).
- ``ManufacturersModelName`` (dcm2niix's spelling; ``ManufacturerModelName`` is accepted too) gives
  ManufacturerModelName.
- ScanningSequence, SequenceVariant, ScanOptions: "GR_IR", "GR\\\\IR" or a list, as a tuple of
  upper-case strings.
- Plane from ``ImageOrientationPatientDICOM`` (``plane_from_orientation``).
- Modality: the sidecar's "Modality" upper-cased ("MR" when absent).
Absent values are None.

``mr_nifti_records(folder)`` pairs each ``X.nii`` / ``X.nii.gz`` in `folder` (not recursive) with
``X.json``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

from medvl.data.dicom import plane_from_orientation
from medvl.data.metadata import MR_METADATA_KEYS
from medvl.data.values import finite_float

__all__ = ["mr_nifti_records", "read_sidecar", "sidecar_metadata", "sidecar_path"]

logger = logging.getLogger("medvl")

PathLike = Union[str, os.PathLike]

_SECONDS_KEYS = ("EchoTime", "RepetitionTime", "InversionTime")
_MULTI_KEYS = ("ScanningSequence", "SequenceVariant", "ScanOptions")
_STRING_KEYS = ("Manufacturer", "MRAcquisitionType", "ContrastBolusAgent", "SeriesDescription")


def _string(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def _terms(value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        items = value.replace("\\", "_").split("_")
    elif isinstance(value, (list, tuple)):
        items = [part for v in value for part in str(v).replace("\\", "_").split("_")]
    else:
        items = [str(value)]
    out = tuple(t.strip().upper() for t in items if t.strip())
    return out or None


def _sidecar_terms(value: Any, key: str) -> Optional[tuple[str, ...]]:
    terms = _terms(value)
    if key != "ScanOptions" or terms is None:
        return terms
    # GE ScanOptions terms contain an underscore themselves ("FAST_GEMS", "EDR_GEMS"), which dcm2niix's
    # "_" separator splits: glue a lone "GEMS" back to the term before it.
    out: list[str] = []
    for term in terms:
        if term == "GEMS" and out:
            out[-1] = out[-1] + "_GEMS"
        else:
            out.append(term)
    return tuple(out)


def sidecar_metadata(sidecar: dict) -> dict:
    """Metadata dict (keys MR_METADATA_KEYS) of an already parsed sidecar."""
    out: dict[str, Any] = {key: None for key in MR_METADATA_KEYS}
    for key in _SECONDS_KEYS:
        v = finite_float(sidecar.get(key))
        out[key] = None if v is None else v * 1000.0
    out["FlipAngle"] = finite_float(sidecar.get("FlipAngle"))
    field = finite_float(sidecar.get("MagneticFieldStrength"))
    if field is not None and field > 100:
        field /= 10000.0
    out["MagneticFieldStrength"] = field
    for key in _STRING_KEYS:
        out[key] = _string(sidecar.get(key))
    model = sidecar.get("ManufacturersModelName", sidecar.get("ManufacturerModelName"))
    out["ManufacturerModelName"] = _string(model)
    for key in _MULTI_KEYS:
        out[key] = _sidecar_terms(sidecar.get(key), key)
    modality = _string(sidecar.get("Modality"))
    out["Modality"] = modality.upper() if modality else "MR"
    orientation = sidecar.get("ImageOrientationPatientDICOM")
    try:
        out["Plane"] = plane_from_orientation(orientation) if isinstance(orientation, (list, tuple)) else None
    except (TypeError, ValueError):
        out["Plane"] = None
    return out


def read_sidecar(json_path: PathLike) -> dict:
    """The metadata dict of a dcm2niix JSON sidecar (see the module docstring)."""
    path = os.fspath(json_path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"sidecar not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"sidecar {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        from medvl.data.manifest import not_utf8_error

        raise not_utf8_error(path, "sidecar", e) from None
    if not isinstance(data, dict):
        raise ValueError(f"sidecar {path} must hold a JSON object, got {type(data).__name__}")
    return sidecar_metadata(data)


def _stem(name: str) -> Optional[str]:
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[:-7]
    if lower.endswith(".nii"):
        return name[:-4]
    return None


def sidecar_path(nifti_path: PathLike) -> str:
    """``X.json`` next to ``X.nii`` / ``X.nii.gz``."""
    path = os.fspath(nifti_path)
    folder, name = os.path.split(path)
    stem = _stem(name)
    if stem is None:
        raise ValueError(f"not a NIfTI file name (.nii/.nii.gz): {path}")
    return os.path.join(folder, stem + ".json")


def mr_nifti_records(folder: PathLike, *, skip_bad: bool = False) -> list[dict]:
    """Records ``{"image": nifti path, "metadata": read_sidecar(...), "meta": {"sidecar": json path,
    "source": folder}}``, one per NIfTI file in `folder` (not recursive, sorted by name).

    A NIfTI without a sidecar, or with an unreadable sidecar, raises a ``ValueError`` naming every such
    file; ``skip_bad=True`` drops them with a warning (logger ``"medvl"``). Records have no "text":
    pass ``text_fn=metadata_to_text`` to the dataset.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    records, bad = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or _stem(name) is None or not os.path.isfile(path):
            continue
        json_path = sidecar_path(path)
        if not os.path.isfile(json_path):
            bad.append(f"{path} (no sidecar {os.path.basename(json_path)})")
            continue
        try:
            metadata = read_sidecar(json_path)
        except (OSError, ValueError) as e:
            bad.append(f"{path} ({e})")
            continue
        records.append({"image": path, "metadata": metadata, "meta": {"sidecar": json_path, "source": folder}})
    if bad:
        listing = "; ".join(bad)
        if not skip_bad:
            raise ValueError(f"{folder}: {len(bad)} NIfTI file(s) without a usable sidecar: {listing}")
        logger.warning("%s: skipped %d NIfTI file(s) without a usable sidecar: %s", folder, len(bad), listing)
    return records
