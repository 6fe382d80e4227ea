"""The grid every phantom is generated on: a 3D shape and its spacing, checked once for all generators."""

from __future__ import annotations

from typing import Sequence


def checked_geometry(shape: Sequence[int], spacing: Sequence[float]
                     ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``(shape, spacing)`` as three ints and three floats; a ValueError unless each side holds at least 8 voxels
    (fewer leave no room for the anatomy) and every spacing is positive."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 8 or min(spacing) <= 0:
        raise ValueError(f"need a 3D shape (each >= 8) and positive spacing, got {shape}, {spacing}")
    return shape, spacing  # type: ignore[return-value]
