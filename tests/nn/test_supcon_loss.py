"""SupConLoss argument checks (its values are compared with pytorch-metric-learning in test_triplet_losses.py)."""

import pytest
import torch

import medvl
from medvl.nn.supcon_loss import supcon_loss


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    """chunk_size=0 failed inside range() ("arg 3 must not be zero") at the first forward."""
    with pytest.raises(ValueError, match="chunk_size must be a positive integer.*got"):
        medvl.nn.SupConLoss(chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        supcon_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), chunk_size=chunk_size)


def test_temperature_is_checked_when_the_module_is_made():
    with pytest.raises(ValueError, match="temperature must be positive"):
        medvl.nn.SupConLoss(temperature=0.0)
