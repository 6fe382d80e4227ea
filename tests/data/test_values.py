"""finite_float: the one rule the DICOM, sidecar, metadata and CT-RATE readers read a number by."""

from __future__ import annotations

import math

import pytest
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from medvl.data.values import finite_float


@pytest.mark.parametrize("value, expected", [
    (2.5, 2.5), (3, 3.0), ("  4.5 ", 4.5), (b"1.5", 1.5), (DSfloat("30"), 30.0),
    ([0.012, 0.024], 0.012), ((7,), 7.0), (MultiValue(DSfloat, ["2", "3"]), 2.0),
])
def test_a_number_or_the_first_of_several(value, expected):
    assert finite_float(value) == expected


@pytest.mark.parametrize("value", [None, "", "   ", b"", [], (), True, False, "abc", float("nan"), "inf", -math.inf,
                                   "1e999", {"a": 1}, [None]])
def test_absent_or_damaged_reads_as_none(value):
    assert finite_float(value) is None


@pytest.mark.parametrize("value, problem", [("abc", "not a number"), ("inf", "not finite"), ("1e999", "not finite"),
                                            (float("nan"), "not finite")])
def test_a_damaged_value_raises_what_the_reader_builds(value, problem):
    with pytest.raises(ValueError, match=f"^cell: {problem}$"):
        finite_float(value, error=lambda p: ValueError(f"cell: {p}"))
    assert finite_float("", error=lambda p: ValueError(p)) is None  # absent is not damaged
