"""Volume-text pairs for alignment training: a map-style Dataset over plain records, and its collate.

A record is a mapping::

    {
        "image": (z, y, x) numpy array / tensor (with "spacing" = (dz, dy, dx) mm, optional "orientation"
                 and "origin", see medvl.data.transforms.volume_to_metatensor), or a MetaTensor
                 (C, i, j, k) with its affine, or a file path (needs a transform built with load=True),
        "text": str                      # or "metadata" + text_fn
        "label": int                     # optional, -1 when absent; or "metadata" + label_fn
        "labels": 1-D bool-like          # optional multi-label findings
        "report": str                    # optional; entities = entity_fn(report).to_multihot()
        "meta": dict                     # optional, passed through (copied) to Sample.meta
        "metadata": Any                  # optional, fed to text_fn / label_fn
    }

The dataset imports none of the readers (DICOM, phantoms, entity extraction, metadata): the caller
builds records with them and passes the callables in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["Sample", "VolumeTextDataset", "collate"]

Entities = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Sample:
    """One transformed volume-text pair.

    volume: plain tensor (C, X, Y, Z) after the transform (int16 raw HU or float32); text: str;
    label: int class id or -1; labels: 1-D bool tensor of findings or None; entities: three 1-D bool
    tensors (entity multi-hots, in the entity extractor's order) or None; meta: the record's "meta"
    copied, plus "index" (position in the dataset) and, when the transform produced a MetaTensor,
    "affine" ((4, 4) float64 RAS affine of the transformed volume).
    """

    volume: torch.Tensor
    text: str
    label: int = -1
    labels: Optional[torch.Tensor] = None
    entities: Optional[Entities] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def _is_path(value) -> bool:
    return isinstance(value, (str, bytes)) or isinstance(value, os.PathLike)


def _as_bool_vector(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(value))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise TypeError(f"{what} must be a 1-D bool-like array, got {type(value).__name__}") from e
    if t.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex():
            if not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{what} must hold only 0/1 (or bools)")
        t = t != 0
    return t


def _as_label(value, index: int) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point():
            raise TypeError(f"record {index}: label must be an integer, got tensor {value!r}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"record {index}: label must be an int (class id, -1 for none), got {type(value).__name__}")
    value = int(value)
    if value < -1:
        raise ValueError(f"record {index}: label must be >= -1, got {value}")
    return value


def _check_spacing(spacing: Any, index: int) -> None:
    """Three finite positive millimetres: a NaN or zero spacing would resample into a silently wrong volume."""
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"record {index}: 'spacing' must be three finite positive numbers (dz, dy, dx) in mm, got "
                         f"{spacing!r}; fix the record (or the header it was read from)")


class VolumeTextDataset(Dataset):
    """Map-style dataset of :class:`Sample` built from records (see the module docstring).

    Args:
        records: sequence of mappings; validated for "image" and text up front.
        transform: called with ``{"image": ..., "spacing"/"orientation"/"origin" if present}`` and must
            return a dict with "image" (the pipelines in ``medvl.data.transforms``) or a tensor.
            Plain (z, y, x) arrays are turned into MetaTensors (``volume_to_metatensor``) before it runs.
            None: the volume is only converted (C, x, y, z), keeping its dtype.
        text_fn: when given and the record has "metadata", ``text = text_fn(record["metadata"])``;
            otherwise ``record["text"]`` is used.
        label_fn: when given and the record has "metadata", ``label = label_fn(record["metadata"])``;
            otherwise ``record.get("label", -1)``.
        entity_fn: when given and the record has "report", ``entities =
            tuple(entity_fn(report).to_multihot())`` (three 1-D bool tensors); a record may also carry
            precomputed "entities". Otherwise None.
        cache: keep each transformed :class:`Sample` in memory after its first load (for deterministic
            transforms only; the cached tensors are shared, do not modify them in place). Off by
            default; each DataLoader worker process keeps its own cache.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        transform: Optional[Callable[[Any], Any]] = None,
        *,
        text_fn: Optional[Callable[[Any], str]] = None,
        label_fn: Optional[Callable[[Any], int]] = None,
        entity_fn: Optional[Callable[[str], Any]] = None,
        cache: bool = False,
    ) -> None:
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
            raise TypeError(f"records must be a sequence (list) of dicts, got {type(records).__name__}")
        for name, fn in (("transform", transform), ("text_fn", text_fn), ("label_fn", label_fn),
                         ("entity_fn", entity_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        for i, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(f"record {i} must be a dict, got {type(record).__name__}")
            if "image" not in record:
                raise KeyError(f"record {i} has no 'image'")
            if "text" not in record and not (text_fn is not None and "metadata" in record):
                raise KeyError(f"record {i} has no 'text' (nor 'metadata' with a text_fn)")
        self.records = list(records)
        self.transform = transform
        self.text_fn, self.label_fn, self.entity_fn = text_fn, label_fn, entity_fn
        self.cache = bool(cache)
        self._cache: Dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        index = int(index) % n
        if self.cache and index in self._cache:
            return self._cache[index]
        sample = self._load(index)
        if self.cache:
            self._cache[index] = sample
        return sample

    # ------------------------------------------------------------------------------------------------------

    def _volume(self, record: Mapping[str, Any], index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        from monai.data import MetaTensor

        from medvl.data.transforms import volume_to_metatensor

        image = record["image"]
        geometry = {k: record[k] for k in ("spacing", "orientation", "origin") if record.get(k) is not None}
        if isinstance(image, MetaTensor) or _is_path(image):
            value = image
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            if "spacing" not in geometry:
                raise KeyError(f"record {index}: 'image' is a (z, y, x) array, so the record needs 'spacing' "
                               "(dz, dy, dx) in mm")
            _check_spacing(geometry["spacing"], index)
            value = volume_to_metatensor(image, geometry["spacing"], geometry.get("orientation"),
                                         geometry.get("origin"))
        else:
            raise TypeError(f"record {index}: 'image' must be a numpy array, tensor, MetaTensor or path, got "
                            f"{type(image).__name__}")
        if self.transform is None:
            if _is_path(value):
                raise TypeError(f"record {index}: 'image' is a path; pass a transform built with load=True")
            out = value
        else:
            data = {"image": value, **{k: v for k, v in geometry.items()}}
            try:
                out = self.transform(data)
            except Exception as e:
                raise RuntimeError(f"record {index}: the transform failed: {e}") from e
            if isinstance(out, Mapping):
                if "image" not in out:
                    raise KeyError(f"record {index}: the transform's output has no 'image'")
                out = out["image"]
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"record {index}: the transform must give a tensor, got {type(out).__name__}")
        affine = None
        if isinstance(out, MetaTensor):
            affine = out.affine.detach().clone().to(torch.float64)
            out = out.as_tensor()
        if out.ndim != 4:
            raise ValueError(f"record {index}: expected a channel-first (C, X, Y, Z) volume, got shape "
                             f"{tuple(out.shape)}")
        return out, affine

    def _entities(self, record: Mapping[str, Any], index: int) -> Optional[Entities]:
        raw = None
        if record.get("entities") is not None:
            raw = record["entities"]
        elif self.entity_fn is not None and record.get("report") is not None:
            report = record["report"]
            if not isinstance(report, str):
                raise TypeError(f"record {index}: 'report' must be a str, got {type(report).__name__}")
            extracted = self.entity_fn(report)
            if not hasattr(extracted, "to_multihot"):
                raise TypeError(f"record {index}: entity_fn must return an object with to_multihot(), got "
                                f"{type(extracted).__name__}")
            raw = extracted.to_multihot()
        if raw is None:
            return None
        raw = tuple(raw)
        if len(raw) != 3:
            raise ValueError(f"record {index}: entities must be three multi-hot vectors, got {len(raw)}")
        return tuple(_as_bool_vector(v, f"record {index}: entities[{k}]") for k, v in enumerate(raw))

    def text_and_labels(self, index: int, record: Optional[Mapping[str, Any]] = None
                        ) -> Tuple[str, int, Optional[torch.Tensor]]:
        """(text, label, findings labels or None) of record ``index`` as :meth:`__getitem__` gives them,
        without reading or transforming its volume. ``record``: that record when the caller holds it already
        (a phantom's record is generated when it is read)."""
        if record is None:
            record = self.records[index]
        metadata = record.get("metadata")
        if self.text_fn is not None and "metadata" in record:
            text = self.text_fn(metadata)
        else:
            text = record["text"]
        if not isinstance(text, str):
            raise TypeError(f"record {index}: text must be a str, got {type(text).__name__}")
        if self.label_fn is not None and "metadata" in record:
            label = self.label_fn(metadata)
        else:
            label = record.get("label", -1)
        label = _as_label(-1 if label is None else label, index)
        labels = record.get("labels")
        labels = None if labels is None else _as_bool_vector(labels, f"record {index}: labels")
        return text, label, labels

    def _load(self, index: int) -> Sample:
        record = self.records[index]
        volume, affine = self._volume(record, index)
        text, label, labels = self.text_and_labels(index, record)
        entities = self._entities(record, index)
        meta = record.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise TypeError(f"record {index}: 'meta' must be a dict, got {type(meta).__name__}")
        meta = dict(meta)
        meta.setdefault("index", index)
        if affine is not None:
            meta.setdefault("affine", affine)
        if _is_path(record["image"]):
            meta.setdefault("path", os.fspath(record["image"]))
        return Sample(volume=volume, text=text, label=label, labels=labels, entities=entities, meta=meta)


def _stack_optional(values: List[Optional[torch.Tensor]], what: str) -> Optional[torch.Tensor]:
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        missing = [i for i, p in enumerate(present) if not p]
        raise ValueError(f"{what}: samples {missing} have none while others do; give all or none")
    first = values[0]
    for i, v in enumerate(values):
        if v.shape != first.shape:
            raise ValueError(f"{what}: sample {i} has shape {tuple(v.shape)}, sample 0 has {tuple(first.shape)}")
    return torch.stack([v.to(torch.bool) for v in values])


def collate(samples: Sequence[Sample]) -> Dict[str, Any]:
    """Batch :class:`Sample` objects (use as ``DataLoader(collate_fn=collate)``).

    Returns ``{"volume": (B, C, X, Y, Z) same dtype, "text": list[str], "label": (B,) int64,
    "labels": (B, K) bool or None, "entities": tuple of three (B, K_kind) bool or None, "meta": list[dict]}``.
    Volumes must share shape and dtype (the pipelines' ``size`` makes them so); labels/entities must
    be present in all samples or in none.
    """
    if isinstance(samples, Sample):
        raise TypeError("collate takes a sequence of Samples, got a single Sample")
    samples = list(samples)
    if not samples:
        raise ValueError("collate got an empty batch")
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise TypeError(f"collate: item {i} is a {type(s).__name__}, not a Sample")
    first = samples[0].volume
    for i, s in enumerate(samples):
        if s.volume.shape != first.shape:
            raise ValueError(f"collate: sample {i} volume has shape {tuple(s.volume.shape)}, sample 0 has "
                             f"{tuple(first.shape)}; resize/pad to a common size (the pipelines' size=)")
        if s.volume.dtype != first.dtype:
            raise ValueError(f"collate: sample {i} volume is {s.volume.dtype}, sample 0 is {first.dtype}")
    volume = torch.stack([s.volume.as_tensor() if hasattr(s.volume, "as_tensor") else s.volume for s in samples])
    entities = None
    ent = [s.entities for s in samples]
    if any(e is not None for e in ent):
        if not all(e is not None for e in ent):
            missing = [i for i, e in enumerate(ent) if e is None]
            raise ValueError(f"collate: entities: samples {missing} have none while others do; give all or none")
        entities = tuple(_stack_optional([e[k] for e in ent], f"collate: entities[{k}]") for k in range(3))
    return {
        "volume": volume,
        "text": [s.text for s in samples],
        "label": torch.tensor([int(s.label) for s in samples], dtype=torch.long),
        "labels": _stack_optional([s.labels for s in samples], "collate: labels"),
        "entities": entities,
        "meta": [s.meta for s in samples],
    }
