"""Synthetic training data for the trainer: CT / MR phantoms turned into a :class:`VolumeTextDataset`.

    ds = synthetic_dataset("ct", n=64, seed=0, size=(64, 64, 32))   # raw int16 HU volumes (1, X, Y, Z)
    ds = synthetic_dataset("mr", n=64, seed=0, size=(64, 64, 32))   # z-scored float32 volumes

CT volumes stay raw int16 (``ct_transforms(window=None)``): the model applies the HU window inside its
fused patch embedding. The phantoms are generated at the target size (``size`` is (X, Y, Z); the phantom
generators take (z, y, x)), so resizing is a no-op crop/pad.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from medvl.data import VolumeTextDataset, contrast_category, ct_transforms, extract_entities, make_phantom_set, \
    metadata_to_text, mr_transforms

__all__ = ["synthetic_dataset", "parse_size", "DATA_KINDS"]

DATA_KINDS = ("ct", "mr")


def parse_size(size) -> Tuple[int, int, int]:
    """(X, Y, Z) from a string "64,64,32", a sequence of three ints, or one int (a cube)."""
    if isinstance(size, str):
        try:
            parts = [int(p) for p in size.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"size must be three integers 'X,Y,Z' (e.g. '64,64,32'), got {size!r}") from None
    elif isinstance(size, int):
        parts = [size] * 3
    else:
        parts = [int(p) for p in size]
    if len(parts) != 3 or any(p < 1 for p in parts):
        raise ValueError(f"size must be three positive integers 'X,Y,Z' (e.g. '64,64,32'), got {size!r}")
    return tuple(parts)


def synthetic_dataset(kind: str = "ct", n: int = 256, seed: int = 0,
                      size: Optional[Sequence[int]] = (64, 64, 32), *, cache: bool = True) -> VolumeTextDataset:
    """``n`` phantom volume-text pairs of ``kind`` "ct" or "mr", deterministic by ``seed``.

    CT: text = the phantom's report, labels = its findings multi-hot, entities from the report.
    MR: text = ``metadata_to_text(metadata)``, label = ``contrast_category(metadata)``.
    ``size`` (X, Y, Z) is the transformed volume size. ``cache`` keeps transformed samples in memory
    (the transforms are deterministic).
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown synthetic data kind {kind!r}; choose 'ct' or 'mr'")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    x, y, z = parse_size(size)
    shape = (z, y, x)  # phantom generators take (slices, rows, cols)
    if kind == "ct":
        cts, _ = make_phantom_set(int(n), 0, seed=seed, ct_kwargs={"shape": shape})
        records = [{"image": p.volume, "spacing": tuple(p.spacing), "text": p.report, "report": p.report,
                    "labels": p.labels, "meta": {"seed": int(p.seed)}} for p in cts]
        transform = ct_transforms(spacing=None, size=(x, y, z), window=None)
        return VolumeTextDataset(records, transform, entity_fn=extract_entities, cache=cache)
    _, mrs = make_phantom_set(0, int(n), seed=seed, mr_kwargs={"shape": shape})
    records = [{"image": p.volume, "spacing": tuple(p.spacing), "metadata": p.metadata,
                "meta": {"seed": int(p.seed), "sequence": p.sequence}} for p in mrs]
    transform = mr_transforms(spacing=None, size=(x, y, z))
    return VolumeTextDataset(records, transform, text_fn=metadata_to_text, label_fn=contrast_category, cache=cache)
