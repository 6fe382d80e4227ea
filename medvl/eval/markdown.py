"""What the evaluation report and ``medvl qc`` print with: numbers as text, markdown tables, JSON blocks."""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = ["fmt", "json_block", "jsonable", "table"]


def fmt(value: Any) -> str:
    """A table cell: "-" for None, integers as they are, other numbers with three decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table, its columns padded to one width."""
    cells = [[str(h) for h in header]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """``json.dumps``'s ``default``: numpy numbers and arrays as Python ones, anything else as its str."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def json_block(value: Any) -> str:
    """``value`` as an indented JSON code block."""
    return "```\n" + json.dumps(value, indent=1, default=jsonable) + "\n```"
