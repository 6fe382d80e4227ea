"""kernels/_common.py: what every Triton kernel shares."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from medvl.kernels._common import fp32_dot_precision  # noqa: E402


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_fp32_dot_precision_follows_torch(precision, expected):
    # torch's default ("highest") keeps IEEE fp32 products: TF32 only where the user allows it.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        assert fp32_dot_precision(torch.device("cuda")) == expected
        assert fp32_dot_precision(torch.device("cpu")) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
