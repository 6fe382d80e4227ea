"""The evaluation set: a dataset with what each sample says (text, labels, metadata), read without loading the
volumes, and its volumes encoded once per encoder.

    data = EvalSet.from_dataset(dataset, "ct", source="synthetic-ct", size=(64, 64, 32))
    volumes = data.volumes(encoder)          # VolumeEmbeddings of every sample, through the encoder's cache
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medvl.data.dataset import VolumeTextDataset
from medvl.eval.cache import CachedEncoder, VolumeEmbeddings, volume_id
from medvl.options import look_up_option

__all__ = ["EvalSet", "class_target"]


@dataclass
class EvalSet:
    """A dataset with its per-sample text, labels and metadata, and what the cache keys its volumes by.

    ``labels``: (N, F) bool findings or None; ``label``: (N,) int64 class, -1 when absent; ``metas``:
    each record's ``meta`` (snippets, sequence, seed...); ``metadata``: each record's acquisition
    metadata (MR) or None; ``ids``: :func:`~medvl.eval.cache.volume_ids` descriptors (None entries are
    keyed by content); ``finding_names``: the label columns' names, when known.
    """

    dataset: Any
    kind: str
    source: str
    size: Tuple[int, int, int]
    texts: List[str]
    labels: Optional[np.ndarray]
    label: np.ndarray
    metas: List[Dict[str, Any]]
    metadata: List[Optional[dict]]
    ids: List[Optional[Dict[str, Any]]]
    finding_names: Optional[List[str]] = None
    _encoded: Dict[int, VolumeEmbeddings] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_dataset(cls, dataset, kind: str, *, source: Optional[str] = None,
                     size: Optional[Sequence[int]] = None) -> "EvalSet":
        """Wrap a :class:`medvl.data.VolumeTextDataset`. With ``source`` (the name given to
        ``build_dataset``) volumes are keyed by source, index and record; without, by content."""
        look_up_option(kind, ("ct", "mr"), name="kind")
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset: empty; nothing to evaluate")
        if size is None:
            size = tuple(int(s) for s in dataset[0].volume.shape[-3:])
        size = tuple(int(s) for s in size)
        texts, labels, label, metas, metadata, ids = [], [], [], [], [], []
        for i in range(n):
            if isinstance(dataset, VolumeTextDataset):
                info = _record_info(dataset, i)
            else:
                info = _sample_info(dataset[i])
            texts.append(info[0])
            labels.append(info[1])
            label.append(info[2])
            metas.append(info[3])
            metadata.append(info[4])
            # here, not in a pass of its own: a phantom's record is generated when read and only the last few
            # hundred are kept, so a second pass over a larger set would generate every phantom again
            ids.append(volume_id(dataset, i, source, size, kind) if source is not None else None)
        have = [x is not None for x in labels]
        if any(have) and not all(have):
            raise ValueError(f"dataset: samples {[i for i, h in enumerate(have) if not h][:5]} have no findings "
                             "labels while others do")
        label_arr = np.stack(labels).astype(bool) if all(have) else None
        names = _finding_names(source, label_arr)
        return cls(dataset, kind, source or "dataset", size, texts, label_arr, np.asarray(label, dtype=np.int64),
                   metas, metadata, ids, names)

    def volumes(self, encoder: CachedEncoder) -> VolumeEmbeddings:
        """Every volume encoded (once per encoder; the encoder's cache serves later runs)."""
        key = id(encoder)
        if key not in self._encoded:
            self._encoded[key] = encoder.encode_volumes(self.dataset, self.ids)
        return self._encoded[key]


def _record_info(dataset: VolumeTextDataset, index: int):
    """(text, findings, label, meta, metadata) of a record, read without its volume."""
    record = dataset.records[index]
    text, label, findings = dataset.text_and_labels(index, record)
    findings = None if findings is None else findings.numpy()
    return text, findings, label, dict(record.get("meta") or {}), record.get("metadata")


def _sample_info(sample):
    labels = None if sample.labels is None else sample.labels.detach().cpu().numpy().astype(bool)
    return sample.text, labels, int(sample.label), dict(sample.meta or {}), (sample.meta or {}).get("metadata")


def _finding_names(source: Optional[str], labels: Optional[np.ndarray]) -> Optional[List[str]]:
    from medvl.data import CT_FINDINGS, CT_RATE_FINDINGS
    from medvl.data.sources import synthetic_source

    if labels is None:
        return None
    if source == synthetic_source("ct") and labels.shape[1] == len(CT_FINDINGS):
        return list(CT_FINDINGS)
    if labels.shape[1] == len(CT_RATE_FINDINGS):
        return list(CT_RATE_FINDINGS)
    return None


def class_target(data: EvalSet) -> Tuple[Optional[np.ndarray], Optional[List[Any]], str]:
    """(int labels, class names, what they are) of the probes, or (None, None, why not).

    The MR sequence name when every sample carries one (phantoms), else the integer class label (MR
    contrast category, or a manifest's ``label``)."""
    sequences = [m.get("sequence") for m in data.metas]
    if all(isinstance(s, str) and s for s in sequences):
        names = sorted(set(sequences))
        return np.asarray([names.index(s) for s in sequences], dtype=np.int64), names, "sequence"
    if (data.label >= 0).all():
        what = "contrast category" if data.kind == "mr" else "label"
        return data.label.copy(), None, what
    return None, None, "no single-label class on every sample"
