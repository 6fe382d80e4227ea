"""``medvl qc``: rank the DICOM series under a folder by how suspect their headers are: the rule-based issues of
each header (:func:`metadata_issues`) and an MR model's cosine distance between each series and its metadata
sentence (:func:`qc_dicom`).

    issues = metadata_issues(read_series_metadata("path/to/series"))   # ["missing Manufacturer", ...]
    ranking = qc_dicom("runs/mrclip", "/data/dicom")                    # every series, most suspect first
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from medvl.data.metadata import dicom_terms
from medvl.data.values import finite_float
from medvl.eval.cache import CachedEncoder, EmbeddingCache, volume_ids
from medvl.eval.loading import check_device, check_size, device_of, load_model
from medvl.eval.metrics import cosine_distance
from medvl.eval.tasks.task import as_numpy
from medvl.options import look_up_option

__all__ = ["RANKINGS", "REQUIRED_MR_TAGS", "SEQUENCE_RANGES", "find_series_folders", "metadata_issues", "qc_dicom",
           "sequence_family"]

# How qc_dicom orders the series: rule-based issues first, then by score; or by score alone.
RANKINGS = ("issues", "score")

# Tags every MR series header should carry (mr_metadata keys; "Plane" comes from ImageOrientationPatient).
# ContrastBolusAgent, ScanOptions and InversionTime are legitimately absent, so they are not required.
REQUIRED_MR_TAGS = ("EchoTime", "RepetitionTime", "FlipAngle", "MagneticFieldStrength", "Manufacturer",
                    "ManufacturerModelName", "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "Plane")

# Usual ranges (ms, degrees) by sequence family, wide enough for clinical 1.5 T / 3 T brain protocols
# (MR physics textbooks; the phantoms' MR_SEQUENCES sit well inside them). A value outside is suspect,
# not impossible.
SEQUENCE_RANGES: Dict[str, Dict[str, Tuple[float, float]]] = {
    "T1 spin echo": {"EchoTime": (5, 35), "RepetitionTime": (250, 1000), "FlipAngle": (60, 180)},
    "T2/PD spin echo": {"EchoTime": (6, 200), "RepetitionTime": (1200, 10000), "FlipAngle": (60, 180)},
    "FLAIR": {"EchoTime": (60, 200), "RepetitionTime": (5000, 14000), "InversionTime": (1500, 3200)},
    "T1 FLAIR": {"EchoTime": (5, 35), "RepetitionTime": (1200, 4000), "InversionTime": (300, 1500)},
    "STIR": {"EchoTime": (15, 120), "RepetitionTime": (2000, 9000), "InversionTime": (100, 300)},
    "IR gradient echo (MPRAGE)": {"EchoTime": (1, 8), "RepetitionTime": (5, 3500), "InversionTime": (400, 1600),
                                  "FlipAngle": (4, 20)},
    "gradient echo": {"EchoTime": (1, 60), "RepetitionTime": (2, 1500), "FlipAngle": (3, 90)},
    "echo planar": {"EchoTime": (15, 150), "RepetitionTime": (500, 15000)},
}
# Scanner model names by vendor (first word of Manufacturer, lower case).
_VENDOR_MODELS = {
    "siemens": ("avanto", "aera", "skyra", "prisma", "verio", "trio", "vida", "sola", "espree", "symphony",
                "sonata", "magnetom", "biograph", "lumina", "altea", "amira", "essenza"),
    "ge": ("signa", "discovery", "optima", "genesis", "brivo"),
    "philips": ("achieva", "ingenia", "intera", "panorama", "gyroscan", "elition", "multiva"),
    "canon": ("vantage", "titan", "galan", "orian", "excelart"),
    "toshiba": ("vantage", "titan", "galan", "orian", "excelart"),
}
# Series-description words naming a family (checked in order), for headers without ScanningSequence.
_DESCRIPTION_FAMILIES = (
    (("FLAIR",), "FLAIR"), (("STIR", "TIRM"), "STIR"),
    (("MPRAGE", "BRAVO", "TFE", "SPGR"), "IR gradient echo (MPRAGE)"),
    (("GRE", "FFE", "SWI"), "gradient echo"), (("EPI", "DWI"), "echo planar"),
)
_PLANE_WORDS = {"ax": "axial", "axial": "axial", "tra": "axial", "sag": "sagittal", "sagittal": "sagittal",
                "cor": "coronal", "coronal": "coronal"}


def sequence_family(metadata: Mapping[str, Any]) -> Optional[str]:
    """The key of :data:`SEQUENCE_RANGES` a header describes, from ScanningSequence, TI and the description."""
    seq = set(dicom_terms(metadata.get("ScanningSequence")))
    ti = finite_float(metadata.get("InversionTime"))
    words = str(metadata.get("SeriesDescription") or "").upper().replace("*", " ").split()
    if "EP" in seq:
        return "echo planar"
    if "IR" in seq and "GR" in seq:
        return "IR gradient echo (MPRAGE)"
    if "IR" in seq:
        if ti is None or ti <= 0:
            return None
        return "STIR" if ti < 300 else "T1 FLAIR" if ti < 1500 else "FLAIR"
    if "SE" in seq:
        if "T1" in words:
            return "T1 spin echo"
        if "T2" in words or "PD" in words:
            return "T2/PD spin echo"
        tr = finite_float(metadata.get("RepetitionTime"))
        return None if tr is None else ("T1 spin echo" if tr < 1000 else "T2/PD spin echo")
    if "GR" in seq:
        return "gradient echo"
    if not seq:  # ScanningSequence missing: the description's usual names, so the ranges still apply
        for names, family in _DESCRIPTION_FAMILIES:
            if any(name in words for name in names):
                return family
        if {"SE", "TSE", "FSE"} & set(words):
            return "T1 spin echo" if "T1" in words else "T2/PD spin echo" if {"T2", "PD"} & set(words) else None
    return None


def metadata_issues(metadata: Mapping[str, Any]) -> List[str]:
    """What looks wrong in an MR series header, by simple rules (empty list: nothing found).

    Rules: a tag of :data:`REQUIRED_MR_TAGS` is missing; TE / TR / TI / flip angle outside the
    :data:`SEQUENCE_RANGES` of the sequence family (:func:`sequence_family`); IR in ScanningSequence
    without an InversionTime, or an InversionTime without IR; a field strength outside 0.1-7 T; a
    scanner model that belongs to another vendor; a plane word in SeriesDescription (AX, SAG, COR)
    that disagrees with ImageOrientationPatient; a description saying contrast (+C, GD, POST) with no
    ContrastBolusAgent; an IR gradient echo (MPRAGE) that is not 3D.
    """
    issues = [f"missing {tag}" for tag in REQUIRED_MR_TAGS if metadata.get(tag) in (None, "", ())]
    seq = set(dicom_terms(metadata.get("ScanningSequence")))
    ti = finite_float(metadata.get("InversionTime"))
    if "IR" in seq and (ti is None or ti <= 0):
        issues.append("IR in ScanningSequence but no InversionTime")
    if "IR" not in seq and seq and ti is not None and ti > 0:
        issues.append(f"InversionTime {ti:g} ms but no IR in ScanningSequence {'/'.join(sorted(seq))}")
    family = sequence_family(metadata)
    for tag, (low, high) in SEQUENCE_RANGES.get(family, {}).items():
        value = finite_float(metadata.get(tag))
        if value is not None and not low <= value <= high:
            unit = "degrees" if tag == "FlipAngle" else "ms"
            issues.append(f"{tag} {value:g} {unit} outside the usual {low:g}-{high:g} for {family}")
    b0 = finite_float(metadata.get("MagneticFieldStrength"))
    if b0 is not None and not 0.1 <= b0 <= 7.0:
        issues.append(f"MagneticFieldStrength {b0:g} T outside 0.1-7 T")
    maker = str(metadata.get("Manufacturer") or "").strip().split()
    model = str(metadata.get("ManufacturerModelName") or "").strip().lower()
    if maker and model:
        vendor = maker[0].lower()
        owners = [v for v, models in _VENDOR_MODELS.items() if any(model.startswith(m) for m in models)]
        if owners and vendor in _VENDOR_MODELS and vendor not in owners:
            issues.append(f"ManufacturerModelName {metadata.get('ManufacturerModelName')!r} is a "
                          f"{'/'.join(o.capitalize() for o in owners)} scanner, Manufacturer says "
                          f"{metadata.get('Manufacturer')!r}")
    words = str(metadata.get("SeriesDescription") or "").lower().replace("+", " + ").split()
    planes = {_PLANE_WORDS[w] for w in words if w in _PLANE_WORDS}
    plane = metadata.get("Plane")
    if plane and len(planes) == 1 and plane not in planes:
        issues.append(f"SeriesDescription says {planes.pop()} but the orientation is {plane}")
    description = str(metadata.get("SeriesDescription") or "").upper()
    if any(w in description.replace("+", " +").split() for w in ("+C", "GD", "POST", "+GD")) \
            and not metadata.get("ContrastBolusAgent"):
        issues.append("SeriesDescription says contrast but ContrastBolusAgent is empty")
    if family == "IR gradient echo (MPRAGE)" and metadata.get("MRAcquisitionType") not in (None, "3D"):
        issues.append(f"IR gradient echo (MPRAGE) acquired {metadata.get('MRAcquisitionType')}, normally 3D")
    return issues


def find_series_folders(root: Union[str, os.PathLike]) -> List[str]:
    """Every folder under ``root`` (itself included) that directly holds at least one DICOM file
    (a Part 10 preamble), sorted."""
    from pydicom.misc import is_dicom

    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"DICOM folder {root!r} does not exist (or is not a folder)")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(folder, name)
            if not name.startswith(".") and os.path.isfile(path) and is_dicom(path):
                found.append(folder)
                break
    return sorted(found)


def qc_dicom(checkpoint_or_model, folder: Union[str, os.PathLike], *, device: Union[str, torch.device] = "cpu",
             cache_dir: Union[str, os.PathLike, None] = None, rank_by: str = "issues", batch_size: int = 8,
             log: Optional[Callable[[str], None]] = None, prompt_head: Any = None) -> Dict[str, Any]:
    """Score every DICOM series under ``folder`` against its metadata sentence, most suspect first.

    Each series folder's headers give the metadata (``read_series_metadata``) and the sentence
    (``metadata_to_text``); its pixels go through the training preprocessing of MR files (RAS,
    resampled to fit 240 mm into the checkpoint's size, z-scored). Score = cosine distance between
    volume and sentence (higher = more suspect); ``issues`` = :func:`metadata_issues`.

    rank_by: "issues" (default): series with rule-based issues first (more issues first), then by
    score, since a missing tag or an impossible value is certain while the learned score is graded;
    "score": by score alone.

    A series that cannot be read (its headers, or its pixels: a truncated slice) is not scored: it is
    listed in ``unreadable`` with the reason and the others go on, as ``medvl train --skip-bad`` leaves a
    bad volume out (both through :func:`medvl.data.sources.readable_records`). With ``cache_dir`` the
    preprocessed volumes are kept under ``cache_dir/volumes``, so a second run reads no pixels twice.

    Returns ``{"series": [{"rank", "series", "score", "issues", "sentence", "description",
    "series_uid", "n_slices"}...], "unreadable": [{"series", "reason"}], "checkpoint", "model_key"}``.
    """
    from medvl.data.metadata import metadata_to_text

    emit = log if log is not None else (lambda _line: None)
    look_up_option(rank_by, RANKINGS, name="rank_by")
    device = check_device(device)
    folders = find_series_folders(folder)
    root = os.path.abspath(os.fspath(folder))
    model, run_config, head, model_key, checkpoint = load_model(checkpoint_or_model, device, prompt_head)
    if run_config.get("data_kind") != "mr":
        raise ValueError(f"qc scores MR series against their metadata sentences and needs a checkpoint trained on "
                         f"MR data (data_kind 'mr', e.g. recipe mrclip); this one was trained on "
                         f"{run_config.get('data_kind')!r} data ({run_config.get('data')})")
    if not folders:
        raise FileNotFoundError(f"no DICOM files under {root}; give the folder holding the series folders")
    size = check_size(None, run_config, tuple(int(p) for p in model.visual.patch_size), emit)
    dataset, records, unreadable = _read_series(folders, root, size, cache_dir, emit)
    was_training, home = model.training, device_of(model)
    try:
        encoder = CachedEncoder(model, EmbeddingCache(cache_dir, model_key), device=device, batch_size=batch_size,
                                prompt_head=head)
        volumes = encoder.encode_volumes(dataset, volume_ids(dataset, "dicom", size, "mr"))
        sentences = [metadata_to_text(r["metadata"]) for r in records]
        scores = cosine_distance(as_numpy(volumes.image_features), as_numpy(encoder.encode_texts(sentences)))
    finally:
        model.to(home).train(was_training)
    rows = []
    for record, sentence, score in zip(records, sentences, scores.tolist()):
        metadata = record["metadata"]
        rows.append({"series": record["meta"]["series"], "score": float(score), "issues": metadata_issues(metadata),
                     "sentence": sentence, "description": metadata.get("SeriesDescription"),
                     "series_uid": metadata.get("SeriesInstanceUID"), "n_slices": metadata.get("NumberOfSlices")})
    if rank_by == "issues":
        rows.sort(key=lambda r: (-len(r["issues"]), -r["score"], r["series"]))
    else:
        rows.sort(key=lambda r: (-r["score"], r["series"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return {"series": rows, "unreadable": unreadable, "checkpoint": None if checkpoint is None else str(checkpoint),
            "model_key": model_key, "rank_by": rank_by}


def _read_series(folders: List[str], root: str, size: Tuple[int, int, int], cache_dir,
                 log: Callable[[str], None]) -> Tuple[Any, List[Dict[str, Any]], List[Dict[str, str]]]:
    """(dataset of the series that load, their records, [{"series", "reason"}] of those that do not), each
    series preprocessed as ``medvl train`` preprocesses MR files."""
    from medvl.data.dicom import read_series_metadata
    from medvl.data.metadata import contrast_category, metadata_to_text
    from medvl.data.sources import FileVolumeDataset, file_transform, readable_records

    records, unreadable = [], []
    for path in folders:
        rel = os.path.relpath(path, root)
        try:
            metadata = read_series_metadata(path)
        except ValueError as e:
            unreadable.append({"series": rel, "reason": str(e)})
            log(f"{rel}: unreadable: {e}")
            continue
        records.append({"image": path, "metadata": metadata, "volume_loader": "file",
                        "meta": {"row": len(records) + 1, "series": rel}})
    transform, description = file_transform("mr", size, None)
    volume_cache = None if cache_dir is None else os.path.join(os.fspath(cache_dir), "volumes")

    def make(recs):
        return FileVolumeDataset(recs, transform, description, cache_dir=volume_cache, text_fn=metadata_to_text,
                                 label_fn=contrast_category)

    records, unloadable = readable_records(records, make)
    for record, reason in unloadable:
        unreadable.append({"series": record["meta"]["series"], "reason": reason})
        log(f"{record['meta']['series']}: unreadable: {reason}")
    unreadable.sort(key=lambda u: u["series"])
    if not records:
        raise ValueError(f"none of the {len(folders)} DICOM folders under {root} could be read: "
                         + "; ".join(f"{u['series']}: {u['reason']}" for u in unreadable[:5]))
    return make(records), records, unreadable
