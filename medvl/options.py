"""Options given by name or on the command line: closed option sets, volume sizes, and the argparse types
that ``medvl train``, ``medvl eval`` and ``medvl qc`` share.

    strategy = look_up_option(strategy, STRATEGIES, name="strategy")   # the value, or a ValueError that
                                                                         # names the argument and the choices
    p.add_argument("--size", type=size_argument)                         # "64,64,32" -> (64, 64, 32)

It imports nothing of medvl, so every layer above the Triton kernels may use it.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any, Collection, Tuple, TypeVar

__all__ = ["look_up_option", "non_negative_int", "parse_size", "positive_int", "size_argument", "unknown_option"]

T = TypeVar("T")


def unknown_option(value: Any, options: Collection[Any], *, name: str) -> ValueError:
    """The error of a ``value`` that is not one of ``options``: it names the argument, the value, every
    allowed value and, for a string close to one of them, that one (a likely typo)."""
    allowed = ", ".join(repr(option) for option in options)
    message = f"{name} must be one of {allowed}, got {value!r}"
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(option) for option in options], n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    return ValueError(message)


def look_up_option(value: T, options: Collection[Any], *, name: str) -> T:
    """``value`` when it is one of ``options``, else a ValueError from :func:`unknown_option`."""
    if value not in options:
        raise unknown_option(value, options, name=name)
    return value


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


def size_argument(text: str) -> Tuple[int, int, int]:
    """argparse type: (X, Y, Z) from "64,64,32"."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value
