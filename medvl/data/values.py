"""One rule for a number read from a DICOM header, a dcm2niix sidecar, a metadata dict or a CSV cell, where it
may be absent and may be damaged."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional


def finite_float(value: Any, error: Optional[Callable[[str], Exception]] = None) -> Optional[float]:
    """``value`` as a finite float, or None when it is absent (None, blank text, an empty list) or a bool (a
    flag, never a measurement).

    Of several values (a DICOM multi-value, a list in a sidecar) the first counts. A value that is present but
    no finite number (text that does not parse, NaN, an infinity) reads as None as well, unless ``error`` is
    given: then ``error(problem)``, with problem "not a number" or "not finite", is raised (for the readers
    that refuse a damaged value rather than take it for a missing one)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":  # pydicom's multi-value
        value = value[0] if len(value) else None
    if value is None or isinstance(value, bool) or (isinstance(value, (str, bytes)) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        if error is not None:
            raise error("not a number") from None
        return None
    if not math.isfinite(number):
        if error is not None:
            raise error("not finite")
        return None
    return number
