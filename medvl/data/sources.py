"""Dataset sources: synthetic phantoms or real volumes turned into a :class:`VolumeTextDataset` (what training
and evaluation read).

    ds = synthetic_dataset("ct", n=64, seed=0, size=(64, 64, 32))   # raw int16 HU volumes (1, X, Y, Z)
    ds = synthetic_dataset("mr", n=64, seed=0, size=(64, 64, 32))   # z-scored float32 volumes
    ds, info = build_dataset("data/train.csv", "ct", cache_dir="~/.cache/medvl/volumes", skip_bad=True)

Sources of :func:`build_dataset`: "synthetic-ct" / "synthetic-mr" (the phantoms), a manifest
(``.csv`` / ``.jsonl`` / ``.ndjson``, see :mod:`medvl.data.manifest`), a CT-RATE root folder (it has a
``radiology_text_reports`` subfolder, see :mod:`medvl.data.ct_rate`) or a folder of MR NIfTI files with
dcm2niix JSON sidecars (see :mod:`medvl.data.nifti_sidecar`).

Samples, whatever the source:

- ``kind="ct"``: volume = raw int16 HU (``ct_transforms(window=None)``: the model applies the HU window
  inside its fused patch embedding); text = the report; labels = findings multi-hot (when the source
  has them); entities = ``extract_entities(report)``.
- ``kind="mr"``: volume = z-scored float32 (``mr_transforms``); text = ``metadata_to_text(metadata)``;
  label = ``contrast_category(metadata)``.
- ``meta["snippets"]``: for synthetic CT, one ``{"finding", "text", "depth_index"}`` per drawn finding
  (the report sentence describing it without its "(image N)" reference, and the index of its slice
  along the last axis of the volume tensor); empty for every other source. ``meta["n_slices"]`` is that
  axis' length.

The phantoms are generated at the target size (``size`` is (X, Y, Z); the generators take (z, y, x)), so
resizing them is a no-op crop/pad. Real volumes are reoriented to RAS, resampled to ``spacing`` (by
default the spacing that fits a typical field of view, :data:`CT_FIELD_OF_VIEW_MM` or
:data:`MR_FIELD_OF_VIEW_MM`, into ``size``) and padded/cropped symmetrically to ``size``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict, abc
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from medvl.data.ct_rate import ct_rate_records, ct_rate_volume_path, load_ct_rate_volume
from medvl.data.dataset import Sample, VolumeTextDataset
from medvl.data.dicom import read_dicom_series
from medvl.data.entities import extract_entities
from medvl.data.manifest import load_manifest, load_volume, not_utf8_error
from medvl.data.metadata import contrast_category, metadata_to_text
from medvl.data.nifti_sidecar import mr_nifti_records, read_sidecar, sidecar_path
from medvl.data.phantom_share import PhantomShare
from medvl.data.phantoms import finding_sentence, make_ct_phantom, make_mr_phantom, phantom_seeds, \
    without_image_reference
from medvl.data.transforms import AIR_HU, affine_from_spacing, ct_transforms, light_augment, mr_transforms, \
    volume_to_metatensor
from medvl.data.volume_cache import VolumeCache
from medvl.options import look_up_option, parse_size

__all__ = [
    "BadVolumeError",
    "CT_FIELD_OF_VIEW_MM",
    "DATA_KINDS",
    "FileVolumeDataset",
    "MR_FIELD_OF_VIEW_MM",
    "PhantomDataset",
    "SYNTHETIC_SOURCES",
    "build_dataset",
    "file_transform",
    "finding_snippets",
    "readable_records",
    "slice_depth_indices",
    "synthetic_dataset",
    "synthetic_source",
]

DATA_KINDS = ("ct", "mr")
#: The phantom sources by name (what ``build_dataset`` and ``--data`` take; any other source is a path) and
#: the data kind each holds.
SYNTHETIC_SOURCES = {"synthetic-ct": "ct", "synthetic-mr": "mr"}
# (X, Y, Z) mm that the default resampling fits into `size`: a chest CT and an adult head.
CT_FIELD_OF_VIEW_MM = (350.0, 350.0, 350.0)
MR_FIELD_OF_VIEW_MM = (240.0, 240.0, 240.0)

_MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Bump when the loading/preprocessing code changes what a cached volume holds: old entries are then
# never read again.
_CACHE_FORMAT = 1
_ACCEPTED_SOURCES = (" or ".join(map(repr, SYNTHETIC_SOURCES)) + "; a manifest file (.csv, .jsonl or .ndjson); "
                     "a CT-RATE root folder (holding radiology_text_reports/); or a folder of MR NIfTI files (.nii / "
                     ".nii.gz) with dcm2niix .json sidecars")
_SKIP_HINT = "fix or remove it, or pass --skip-bad (skip_bad=True) to drop unreadable rows and report them"


class BadVolumeError(ValueError):
    """A row whose volume cannot be loaded or preprocessed (the message names the row and the path)."""


def synthetic_source(kind: str) -> str:
    """The name of the phantom source of data kind ``kind`` ("ct" or "mr")."""
    look_up_option(kind, DATA_KINDS, name="kind")
    return next(name for name, source_kind in SYNTHETIC_SOURCES.items() if source_kind == kind)


# ----------------------------------------------------------------------------------------------------------
# Synthetic phantoms, with finding localization for CT
# ----------------------------------------------------------------------------------------------------------

class _PhantomRecords(abc.Sequence):
    """The records of ``len(seeds)`` phantoms, each generated when it is read (the last ``keep`` are kept,
    so that reading a record's text and then its volume generates it once)."""

    def __init__(self, make: Callable[[int], Dict[str, Any]], n: int, keep: int = 256):
        self._make, self._n, self._keep = make, int(n), int(keep)
        self._recent: "OrderedDict[int, Dict[str, Any]]" = OrderedDict()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._n))]
        index = int(index)
        if not -self._n <= index < self._n:
            raise IndexError(f"phantom {index} out of range for {self._n}")
        index %= self._n
        record = self._recent.pop(index, None)
        if record is None:
            record = self._make(index)
        self.keep(index, record)
        return record

    def holds(self, index: int) -> bool:
        """Whether record ``index`` (in range) is kept, so that reading it generates nothing."""
        return int(index) % self._n in self._recent

    def keep(self, index: int, record: Dict[str, Any]) -> None:
        """Keep ``record`` as record ``index`` (in range), made elsewhere (:meth:`PhantomDataset.__getitems__`)."""
        self._recent[int(index) % self._n] = record
        while len(self._recent) > self._keep:
            self._recent.popitem(last=False)

    def __getstate__(self):  # DataLoader workers get the recipe, not the kept records
        state = dict(self.__dict__)
        state["_recent"] = OrderedDict()
        return state


def _zscore_nonzero(data: Mapping[str, Any]):
    """What ``mr_transforms``' ``NormalizeIntensityd(nonzero=True, channel_wise=True)`` does to a phantom: each
    channel's nonzero voxels to mean 0 and standard deviation 1 (zeros stay 0), float32."""
    image = data["image"]
    out = image.to(torch.float32).clone()
    for c in range(out.shape[0]):
        channel = out[c]
        nonzero = channel != 0
        if nonzero.any():
            values = channel[nonzero]
            std = values.std(unbiased=False)
            channel[nonzero] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


class PhantomDataset(VolumeTextDataset):
    """``n`` phantoms of ``kind`` "ct" or "mr", generated when read, never all held in memory.

    Phantom i is ``make_ct_phantom`` / ``make_mr_phantom`` of the i-th seed that
    :func:`~medvl.data.phantoms.phantom_seeds` draws from ``seed`` (so the set is prefix-stable and the same as
    ``make_phantom_set(n)`` gives). ``augment``: each phantom's volume goes through
    :func:`~medvl.data.transforms.light_augment` with a generator seeded by (``seed``, i), before the
    transform (same draws on every read, in every process). ``share``: a
    :class:`~medvl.data.phantom_share.PhantomShare` of processes reading this same set at the same time, so that
    each phantom is generated by one of them (the records are the same with and without it).
    """

    def __init__(self, kind: str, n: int, seed: int, size: Sequence[int], *, augment: bool = False,
                 cache: bool = False, share: Optional[PhantomShare] = None):
        look_up_option(kind, DATA_KINDS, name="kind")
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        x, y, z = parse_size(size)
        self.kind, self.seed, self.augment, self.size = kind, int(seed), bool(augment), (x, y, z)
        self.shape = (z, y, x)  # phantom generators take (slices, rows, cols)
        self.seeds = phantom_seeds(kind, self.seed, int(n))
        # The phantoms are generated at the target size in the RAS layout, so the MONAI pipelines of real
        # volumes (ct_transforms / mr_transforms with spacing=None) change nothing but the layout and, for
        # MR, the intensity: they are replaced by that (a test checks the equality), at a fifth of the time.
        if kind == "ct":
            self.pipeline = ct_transforms(spacing=None, size=(x, y, z), window=None)
            super().__init__([], None, entity_fn=extract_entities, cache=cache)
            self._depths: Dict[Tuple, Tuple[List[int], int]] = {}  # one probe per phantom geometry
        else:
            self.pipeline = mr_transforms(spacing=None, size=(x, y, z))
            super().__init__([], _zscore_nonzero, text_fn=metadata_to_text, label_fn=contrast_category, cache=cache)
        if share is not None and not isinstance(share, PhantomShare):
            raise TypeError(f"share must be a PhantomShare or None, got {type(share).__name__}")
        self.share = share
        self.records = _PhantomRecords(self._record if share is None else self._shared_record, len(self.seeds))

    @property
    def share_key(self) -> str:
        """The name of this phantom set in a :class:`PhantomShare`: what decides its records besides the index."""
        x, y, z = self.size
        return f"{self.kind}-seed{self.seed}-{x}x{y}x{z}-{'augmented' if self.augment else 'plain'}"

    def _shared_record(self, index: int) -> Dict[str, Any]:
        return self.share.records(self.share_key, [index], self._record)[0]

    def __getitems__(self, indices: Sequence[int]) -> List[Sample]:
        """The samples of a batch (what DataLoader asks for): with a share, their records are fetched a batch at
        a time (:meth:`PhantomShare.records`)."""
        if self.share is not None:
            wanted = [int(i) for i in indices]
            missing = [i for i in wanted if not self.records.holds(i)]
            for index, record in zip(missing, self.share.records(self.share_key, missing, self._record)):
                self.records.keep(index, record)
        return [self[i] for i in indices]

    def _augmented(self, volume: np.ndarray, index: int) -> np.ndarray:
        if not self.augment:
            return volume
        rng = np.random.default_rng([self.seed, 1 if self.kind == "ct" else 2, index, 0xA6])
        return light_augment(volume, self.kind, rng)

    def _record(self, index: int) -> Dict[str, Any]:
        phantom_seed = self.seeds[index]
        if self.kind == "ct":
            p = make_ct_phantom(phantom_seed, shape=self.shape)
            geometry = (tuple(p.volume.shape), tuple(p.spacing))
            if geometry not in self._depths:
                self._depths[geometry] = slice_depth_indices(p.volume.shape, p.spacing, self.pipeline)
            depth_of_slice, n_slices = self._depths[geometry]
            meta = {"seed": phantom_seed, "snippets": finding_snippets(p, depth_of_slice), "n_slices": n_slices}
            return {"image": self._augmented(p.volume, index), "spacing": tuple(p.spacing), "text": p.report,
                    "report": p.report, "labels": p.labels, "meta": meta}
        p = make_mr_phantom(phantom_seed, shape=self.shape)
        return {"image": self._augmented(p.volume, index), "spacing": tuple(p.spacing), "metadata": p.metadata,
                "meta": {"seed": phantom_seed, "sequence": p.sequence, "snippets": [], "n_slices": self.size[2]}}


def synthetic_dataset(kind: str = "ct", n: int = 256, seed: int = 0,
                      size: Optional[Sequence[int]] = (64, 64, 32), *, augment: bool = False,
                      cache: bool = False, share: Optional[PhantomShare] = None) -> PhantomDataset:
    """``n`` phantom volume-text pairs of ``kind`` "ct" or "mr", deterministic by ``seed`` (a
    :class:`PhantomDataset`: generated when read).

    CT: text = the phantom's report, labels = its findings multi-hot, entities from the report,
    ``meta["snippets"]`` the findings' sentences and depth indices (see the module docstring).
    MR: text = ``metadata_to_text(metadata)``, label = ``contrast_category(metadata)``.
    ``size`` (X, Y, Z) is the transformed volume size. ``augment``: light augmentation (training).
    ``cache`` keeps transformed samples in memory (for a small set read many times). ``share``: see
    :class:`PhantomDataset`.
    """
    return PhantomDataset(kind, n, seed, size, augment=augment, cache=cache, share=share)


def slice_depth_indices(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], transform: Callable,
                        orientation=None) -> Tuple[List[int], int]:
    """Where each axial slice of a (z, y, x) array ends up along the last axis (Z) of the transformed
    (C, X, Y, Z) tensor: ``(depth_of_slice, Z)``, ``depth_of_slice[s]`` = -1 when slice ``s`` was cropped away.

    Worked out from geometry rather than assumed: an empty volume of the same shape, spacing and
    ``orientation`` goes through ``transform``; the input affine (``affine_from_spacing``) takes the centre
    voxel of slice ``s`` to world millimetres and the inverse of the output affine (which MONAI updates
    for the reorientation, resampling and pad/crop) takes it back to output voxel indices. For the phantoms
    (orientation None, i.e. read as RAS, and generated at the target size) every step is a no-op and the
    depth index equals the slice index; an "LPI" array (z head to feet) gives ``Z - 1 - s`` instead.
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    probe = volume_to_metatensor(np.zeros((nz, ny, nx), np.int16), spacing_zyx, orientation)
    out = transform({"image": probe})
    out = out["image"] if isinstance(out, Mapping) else out
    if not hasattr(out, "affine") or out.ndim != 4:
        raise TypeError("slice_depth_indices needs a transform that returns a channel-first MetaTensor "
                        "(C, X, Y, Z), as medvl.data.transforms' pipelines do")
    n_slices = int(out.shape[-1])
    to_output = np.linalg.inv(out.affine.detach().cpu().numpy().astype(np.float64)) @ \
        affine_from_spacing(spacing_zyx, orientation).numpy()
    depth_of_slice = []
    for s in range(nz):
        k = float((to_output @ np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, s, 1.0]))[2])
        d = int(np.floor(k + 0.5))
        depth_of_slice.append(d if 0 <= d < n_slices else -1)
    return depth_of_slice, n_slices


def finding_snippets(phantom, depth_of_slice: Sequence[int]) -> List[Dict[str, Any]]:
    """``[{"finding": name, "text": sentence without its "(image N)" reference, "depth_index": z}, ...]``,
    one per finding of a :class:`~medvl.data.phantoms.CTPhantom` with a slice index, in the phantom's
    order. ``depth_of_slice`` comes from :func:`slice_depth_indices`; findings whose slice was cropped away
    are left out (their text describes nothing in the volume)."""
    snippets = []
    for f in phantom.findings:
        if f.slice_index < 0:
            continue
        depth = depth_of_slice[f.slice_index]
        if depth < 0:
            continue
        sentence = finding_sentence(phantom.report, f)
        if sentence is None:
            raise RuntimeError(f"phantom seed {phantom.seed}: no sentence of its report describes the finding "
                               f"{f.name!r} at image {f.slice_index + 1}")
        snippets.append({"finding": f.name, "text": without_image_reference(sentence), "depth_index": int(depth)})
    return snippets


# ----------------------------------------------------------------------------------------------------------
# Real volumes: a dataset that loads files with the right reader and caches the preprocessed result
# ----------------------------------------------------------------------------------------------------------

def _load_record_volume(record: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of ``record`` whose "image" is the (z, y, x) array (plus its spacing and geometry)."""
    path = os.fspath(record["image"])
    if record.get("volume_loader") == "ct_rate":
        # load_ct_rate_volume notes which rescale it used in the record's meta: give it a copy
        loaded = dict(record)
        loaded["meta"] = dict(record.get("meta") or {})
        volume, spacing = load_ct_rate_volume(loaded)
        loaded["image"], loaded["spacing"] = volume, spacing
        return loaded
    if os.path.isdir(path):
        # load_volume keeps a DICOM series in its own layout without saying which: read the series
        # directly so that its orientation cosines and position reach the RAS reorientation.
        series = read_dicom_series(path)
        return {**record, "image": series.volume.astype(np.float32, copy=False), "spacing": tuple(series.spacing),
                "orientation": tuple(series.orientation), "origin": tuple(series.position)}
    volume, spacing = load_volume(path)  # NIfTI, reoriented to RAS (z, y, x)
    return {**record, "image": volume, "spacing": spacing}


def _record_description(record: Mapping[str, Any], transform_description: str) -> str:
    loader = record.get("volume_loader", "file")
    extra: Dict[str, Any] = {"loader": loader}
    if loader == "ct_rate":
        # CT-RATE's HU and spacing may come from its metadata CSV rather than the file
        meta = record.get("meta") or {}
        extra["rescale"] = meta.get("rescale")
        extra["spacing_csv"] = meta.get("spacing_csv")
    return transform_description + "|" + json.dumps(extra, sort_keys=True, default=str)


class FileVolumeDataset(VolumeTextDataset):
    """:class:`VolumeTextDataset` over records whose "image" is a file or DICOM folder path.

    Each volume is read with the reader its source needs (NIfTI reoriented to RAS, DICOM series with
    its orientation, CT-RATE with its HU rescale), transformed, and, with ``cache_dir``, stored in and
    later read from a :class:`~medvl.data.volume_cache.VolumeCache` (keyed by the file's path, size and
    mtime and ``transform_description``). A volume that cannot be read raises :class:`BadVolumeError`
    naming the record's ``meta["row"]`` and its path. Picklable (DataLoader workers share the cache
    folder, not open files).
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], transform: Callable, transform_description: str, *,
                 cache_dir=None, **kwargs: Any) -> None:
        super().__init__(records, transform, **kwargs)
        for i, record in enumerate(self.records):
            if not isinstance(record["image"], (str, os.PathLike)):
                raise TypeError(f"record {i}: FileVolumeDataset needs a file path as 'image', got "
                                f"{type(record['image']).__name__}; use VolumeTextDataset for arrays")
        self.transform_description = str(transform_description)
        self.volume_cache = None if cache_dir is None else VolumeCache(cache_dir)

    def _volume(self, record, index):
        path = os.fspath(record["image"])
        row = (record.get("meta") or {}).get("row", index + 1)
        key = description = None
        try:
            if self.volume_cache is not None:
                description = _record_description(record, self.transform_description)
                key = self.volume_cache.key_for(path, description)
                entry = self.volume_cache.get(key)
                if entry is not None and "volume" in entry:
                    return entry["volume"], entry.get("affine")
            volume, affine = super()._volume(_load_record_volume(record), index)
        except Exception as e:
            raise BadVolumeError(f"row {row}: cannot read the volume {path}: {e}; {_SKIP_HINT}") from e
        if key is not None:
            tensors = {"volume": volume} if affine is None else {"volume": volume, "affine": affine}
            self.volume_cache.put(key, tensors, description=f"{path}|{description}")
        return volume, affine


def readable_records(records: Sequence[Mapping[str, Any]], make: Callable[[List[Mapping[str, Any]]], Any]
                     ) -> Tuple[List[Mapping[str, Any]], List[Tuple[Mapping[str, Any], str]]]:
    """``(records that load, [(record, reason)] for each that does not)``: every volume is read and
    preprocessed once through ``make(records)`` (a :class:`FileVolumeDataset`, which fills its cache when it
    has one). A corrupt payload behind a valid header shows only then. The one behaviour of
    ``medvl train --skip-bad`` and ``medvl qc``: a bad volume is left out with its reason, the rest go on."""
    probe, good, bad = make(list(records)), [], []
    for i, record in enumerate(records):
        try:
            probe[i]
        except Exception as e:  # noqa: BLE001 - any failure makes the volume bad; the caller reports each
            reason = e.__cause__ if isinstance(e, BadVolumeError) and e.__cause__ is not None else e
            bad.append((record, str(reason)))
        else:
            good.append(record)
    return good, bad


def file_transform(kind: str, size: Tuple[int, int, int], spacing) -> Tuple[Callable, str]:
    """The preprocessing of real volumes and its description (every parameter that changes the result)."""
    import monai

    if spacing is None:
        fov = CT_FIELD_OF_VIEW_MM if kind == "ct" else MR_FIELD_OF_VIEW_MM
        spacing = tuple(round(f / s, 6) for f, s in zip(fov, size))
    else:
        spacing = _parse_spacing(spacing)
    if kind == "ct":
        params = {"spacing": spacing, "size": size, "window": None, "orientation": "RAS", "pad_hu": AIR_HU,
                  "mode": "bilinear"}
        transform = ct_transforms(**params)
    else:
        params = {"spacing": spacing, "size": size, "orientation": "RAS", "normalize": "zscore", "mode": "bilinear"}
        transform = mr_transforms(**params)
    description = json.dumps({"format": _CACHE_FORMAT, "pipeline": f"{kind}_transforms", "monai": monai.__version__,
                              **params}, sort_keys=True)
    return transform, description


def _parse_spacing(spacing) -> Tuple[float, float, float]:
    """(X, Y, Z) mm from "1.5,1.5,3", three numbers, or one number (isotropic)."""
    if isinstance(spacing, str):
        try:
            parts = [float(p) for p in spacing.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"spacing must be three numbers 'X,Y,Z' in mm (e.g. '1.5,1.5,3'), got {spacing!r}") \
                from None
    elif isinstance(spacing, (int, float)):
        parts = [float(spacing)] * 3
    else:
        parts = [float(p) for p in spacing]
    if len(parts) != 3 or any(not np.isfinite(p) or p <= 0 for p in parts):
        raise ValueError(f"spacing must be three positive numbers 'X,Y,Z' in mm, got {spacing!r}")
    return tuple(parts)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------

def _skipped(row, path, reason) -> Dict[str, Any]:
    return {"row": row, "path": None if path is None else os.fspath(path), "reason": str(reason)}


def _manifest_records(path: str, skip_bad: bool) -> Tuple[List[dict], List[dict]]:
    try:
        manifest = load_manifest(path, skip_bad=skip_bad)
    except ValueError as e:
        if "bad row" in str(e):  # rows load_manifest checked up front (missing file, bad header, bad labels)
            raise ValueError(f"{e}; fix or remove those rows, or pass --skip-bad (skip_bad=True) to drop them "
                             "and report them") from None
        raise
    records = []
    for record in manifest.records:
        record = dict(record)
        record["volume_loader"] = "file"
        if record.get("labels") is not None:
            # the manifest allows -1 (uncertain); a multi-hot target counts only certain positives
            record["labels"] = [v == 1 for v in record["labels"]]
        records.append(record)
    return records, [_skipped(s.row, s.path, s.reason) for s in manifest.skipped]


def _ct_rate_records(root: str, split: str, skip_bad: bool) -> Tuple[List[dict], List[dict]]:
    long_split = {"train": "train", "valid": "validation", "validation": "validation"}.get(str(split).lower())
    if long_split is None:
        raise ValueError(f"split must be 'train' or 'valid' for a CT-RATE source, got {split!r}")
    reports = os.path.join(root, "radiology_text_reports", f"{long_split}_reports.csv")
    if not os.path.isfile(reports):
        raise FileNotFoundError(f"CT-RATE root {root} has no {long_split}_reports.csv in radiology_text_reports/ "
                                f"(split {split!r}); pick the split whose reports are there")
    rows: Dict[str, int] = {}
    try:
        with open(reports, newline="", encoding="utf-8-sig") as f:
            for n, row in enumerate(csv.DictReader(f), start=1):
                name = (row.get("VolumeName") or "").strip()
                if name:
                    rows.setdefault(name, n)
    except UnicodeDecodeError as e:
        raise not_utf8_error(reports, "CT-RATE reports file", e) from None
    try:
        found = ct_rate_records(root, split, skip_missing=skip_bad)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; restore those volumes, or pass --skip-bad (skip_bad=True) to drop them "
                                "and report them") from None
    records = []
    for record in found:
        record = dict(record)
        record["meta"] = {**record["meta"], "row": rows.get(record["meta"]["volume_name"])}
        record["volume_loader"] = "ct_rate"
        if record.get("labels") is not None:
            record["labels"] = [v == 1 for v in record["labels"]]
        records.append(record)
    present = {r["meta"]["volume_name"] for r in records}
    skipped = []
    for name, n in rows.items():
        if name not in present:
            try:
                where = ct_rate_volume_path(root, split, name, False)
            except ValueError:
                where = None
            reason = "volume not found (in neither dataset/<split>_fixed nor dataset/<split>)"
            skipped.append(_skipped(n, where, reason))
    return records, skipped


def _nifti_files(folder: str) -> List[str]:
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if not name.startswith(".") and name.lower().endswith(_NIFTI_SUFFIXES)
            and os.path.isfile(os.path.join(folder, name))]


def _mr_folder_records(folder: str, skip_bad: bool) -> Tuple[List[dict], List[dict]]:
    rows = {path: n for n, path in enumerate(_nifti_files(folder), start=1)}
    try:
        found = mr_nifti_records(folder, skip_bad=skip_bad)
    except ValueError as e:
        raise ValueError(f"{e}; add the sidecars, or pass --skip-bad (skip_bad=True) to drop those files and "
                         "report them") from None
    records = []
    for record in found:
        record = dict(record)
        record["meta"] = {**record["meta"], "row": rows.get(record["image"])}
        record["volume_loader"] = "file"
        records.append(record)
    present = {r["image"] for r in records}
    skipped = []
    for path, n in rows.items():
        if path in present:
            continue
        json_path = sidecar_path(path)
        try:
            read_sidecar(json_path)
            reason = "no usable sidecar"
        except (OSError, ValueError) as e:
            reason = f"no usable sidecar: {e}"
        skipped.append(_skipped(n, path, reason))
    return records, skipped


def _file_source(source: str, kind: str, split: str, skip_bad: bool) -> Tuple[str, List[dict], List[dict]]:
    """(what the source is, its records, the rows dropped while reading it)."""
    if source.lower().endswith(_MANIFEST_SUFFIXES):
        path = os.path.abspath(os.path.expanduser(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest not found: {path} (source {source!r}); check the path")
        return ("manifest",) + _manifest_records(path, skip_bad)
    folder = os.path.abspath(os.path.expanduser(source))
    if os.path.isdir(folder):
        if os.path.isdir(os.path.join(folder, "radiology_text_reports")):
            if kind != "ct":
                raise ValueError(f"source {source!r} is a CT-RATE root (CT volumes with reports) but kind is {kind!r}; "
                                 "use kind 'ct' (a CT recipe)")
            return ("ct-rate",) + _ct_rate_records(folder, split, skip_bad)
        if _nifti_files(folder):
            if kind != "mr":
                raise ValueError(f"source {source!r} is a folder of MR NIfTI files with sidecars (MR metadata, no "
                                 f"reports) but kind is {kind!r}; use kind 'mr' (the mrclip recipe), or list CT "
                                 "volumes with their reports in a manifest")
            return ("mr-folder",) + _mr_folder_records(folder, skip_bad)
        raise ValueError(f"source {source!r} is a folder with neither radiology_text_reports/ (CT-RATE) nor .nii / "
                         f".nii.gz files directly inside; accepted sources: {_ACCEPTED_SOURCES}")
    what = "not found" if not os.path.exists(folder) else "not a manifest or folder"
    raise ValueError(f"unknown data source {source!r} ({what}); accepted sources: {_ACCEPTED_SOURCES}")


def _check_records(records: List[dict], kind: str, skip_bad: bool, skipped: List[dict]) -> List[dict]:
    """Drop (skip_bad) or refuse rows with no text to train on; check labels agree across rows."""
    good = []
    for record in records:
        meta = record.get("meta") or {}
        if kind == "mr" and record.get("metadata") is not None:
            good.append(record)
            continue
        text = record.get("text")
        if isinstance(text, str) and text.strip():
            good.append(record)
            continue
        reason = "no report/text" + (" and no metadata" if kind == "mr" else "")
        if not skip_bad:
            raise ValueError(f"row {meta.get('row')}: {record['image']}: {reason}; {_SKIP_HINT}")
        skipped.append(_skipped(meta.get("row"), record["image"], reason))
    with_labels = [r for r in good if r.get("labels") is not None]
    if with_labels and len(with_labels) != len(good):
        missing = next(r for r in good if r.get("labels") is None)
        raise ValueError(f"row {missing['meta'].get('row')} ({missing['image']}) has no labels while other rows do; "
                         "give labels in every row or in none (a batch needs all or none)")
    lengths = {len(r["labels"]) for r in with_labels}
    if len(lengths) > 1:
        first = len(with_labels[0]["labels"])
        odd = next(r for r in with_labels if len(r["labels"]) != first)
        raise ValueError(f"row {odd['meta'].get('row')} ({odd['image']}) has {len(odd['labels'])} labels, row "
                         f"{with_labels[0]['meta'].get('row')} has {first}; every row needs the same findings")
    return good


def build_dataset(source, kind: str, *, n: Optional[int] = 256, seed: int = 0,
                  size: Sequence[int] = (64, 64, 32), cache_dir=None, skip_bad: bool = False, split: str = "train",
                  log: Optional[Callable[[str], None]] = None,
                  spacing=None, augment: bool = False,
                  share: Optional[PhantomShare] = None) -> Tuple[VolumeTextDataset, Dict[str, Any]]:
    """The dataset of ``source`` for ``kind`` "ct" or "mr", and a summary of how it was built.

    Args:
        source: "synthetic-ct" / "synthetic-mr", a manifest path (.csv / .jsonl / .ndjson), a CT-RATE root
            folder or a folder of MR NIfTI files with dcm2niix sidecars (see the module docstring).
        kind: "ct" (samples from reports) or "mr" (samples from acquisition metadata); the recipe decides.
            A synthetic source, CT-RATE and an MR folder each fit only one kind.
        n: synthetic: how many phantoms. Files: at most this many rows, the first ones (None: all);
            a cut is logged.
        seed: the phantoms' seed (files are read in order, unshuffled).
        size: (X, Y, Z) of every volume tensor.
        cache_dir: a folder for preprocessed real volumes (:class:`~medvl.data.volume_cache.VolumeCache`);
            later builds and DataLoader workers read them from there. Not used for synthetic sources.
        skip_bad: False: a row that cannot be read raises an error naming the row and its path (rows checked
            up front by the readers at once, a corrupt volume payload when it is first loaded). True: every
            volume is loaded and preprocessed now (into the cache when there is one), bad rows are dropped,
            logged and listed in ``info["skipped"]``.
        split: CT-RATE split, "train" or "valid".
        log: called with one line of text per skipped row and a summary; None for quiet.
        spacing: (X, Y, Z) mm that real volumes are resampled to; None fits :data:`CT_FIELD_OF_VIEW_MM` /
            :data:`MR_FIELD_OF_VIEW_MM` into ``size``.
        augment: light augmentation of the phantoms (:func:`~medvl.data.transforms.light_augment`; the
            trainer asks for it). Real volumes are used as read (a note is logged).
        share: synthetic sources: a :class:`~medvl.data.phantom_share.PhantomShare` of the processes reading the
            same phantoms side by side (each phantom is generated by one of them). Not used for files (logged).

    Returns ``(dataset, info)`` with info ``{"source", "kind", "n", "skipped": [{"row", "path", "reason"}],
    "cache_dir"}``.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"kind must be 'ct' or 'mr', got {kind!r}")
    if log is not None and not callable(log):
        raise TypeError(f"log must be a callable taking one str, or None; got {type(log).__name__}")
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise ValueError(f"n must be a positive integer (or None for every row), got {n!r}")
    emit = log if log is not None else (lambda _line: None)
    size = parse_size(size)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a name or a path; accepted sources: {_ACCEPTED_SOURCES}; got {source!r}")

    if source in SYNTHETIC_SOURCES:
        if SYNTHETIC_SOURCES[source] != kind:
            raise ValueError(f"source {source!r} holds {SYNTHETIC_SOURCES[source].upper()} data but kind is "
                             f"{kind!r}; use {synthetic_source(kind)!r} or kind {SYNTHETIC_SOURCES[source]!r}")
        if cache_dir is not None:
            emit(f"{source}: cache_dir is not used (phantoms are generated in memory)")
        dataset = synthetic_dataset(kind, 256 if n is None else int(n), seed, size, augment=augment, share=share)
        emit(f"{source}: {len(dataset)} phantoms of size {size}, generated when read"
             + (", lightly augmented" if augment else "")
             + (f"; each generated by one of the {share.consumers} processes reading them" if share else ""))
        return dataset, {"source": source, "kind": kind, "n": len(dataset), "skipped": [], "cache_dir": None}

    if augment:
        emit(f"{source}: augmentation applies to the phantoms only; real volumes are used as read")
    if share is not None:
        emit(f"{source}: the phantom share is not used (it is for phantoms generated side by side)")
    what, records, skipped = _file_source(source, kind, split, skip_bad)
    records = _check_records(records, kind, skip_bad, skipped)
    if n is not None and len(records) > n:
        emit(f"{source}: using the first {int(n)} of {len(records)} rows (n={int(n)})")
        records = records[: int(n)]
    for record in records:
        record["meta"] = {**(record.get("meta") or {}), "snippets": [], "n_slices": size[2]}

    transform, description = file_transform(kind, size, spacing)
    cache_root = None if cache_dir is None else os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    fns = ({"entity_fn": extract_entities} if kind == "ct"
           else {"text_fn": metadata_to_text, "label_fn": contrast_category})

    def make(recs):
        return FileVolumeDataset(recs, transform, description, cache_dir=cache_root, **fns)

    if skip_bad:
        records, unreadable = readable_records(records, make)
        skipped.extend(_skipped(record["meta"].get("row"), record["image"], reason) for record, reason in unreadable)
    skipped.sort(key=lambda s: (s["row"] is None, s["row"] if s["row"] is not None else 0))
    for s in skipped:
        emit(f"{source}: skipped row {s['row']} ({s['path'] or '-'}): {s['reason']}")
    if not records:
        reasons = "; ".join(f"row {s['row']}: {s['reason']}" for s in skipped[:5])
        raise ValueError(f"{source}: no usable rows ({len(skipped)} skipped: {reasons}"
                         + ("; ..." if len(skipped) > 5 else "") + ")")
    dataset = make(records)
    emit(f"{source}: {len(dataset)} {kind.upper()} volumes from a {what}"
         + (f", {len(skipped)} row(s) skipped" if skipped else "") + (f", cache {cache_root}" if cache_root else ""))
    return dataset, {"source": source, "kind": kind, "n": len(dataset), "skipped": skipped, "cache_dir": cache_root}
