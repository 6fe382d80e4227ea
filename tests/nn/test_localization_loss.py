"""LocalizationLoss against its reference in value and gradient, the Gaussian bin targets (the default one
sharp), and rows without a target or with one on an invalid bin."""

import math

import pytest
import torch

from medvl.nn.localization_loss import LOCALIZATION_SIGMA_BINS, LocalizationLoss, gaussian_bin_targets
from medvl.reference.localization_loss import localization_loss
from tests.utils import assert_matches_reference


def test_gaussian_targets():
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    target = torch.tensor([4, 5, -1])
    q = gaussian_bin_targets(target, mask, sigma=2.0)
    torch.testing.assert_close(q[:2].sum(1), torch.ones(2))
    assert q[0].argmax() == 4 and q[1].argmax() == 5
    assert torch.all(q[1, 6:] == 0) and torch.all(q[2] == 0)
    assert q[0, 2] / q[0, 4] == pytest.approx(math.exp(-4 / 8), rel=1e-6)
    torch.testing.assert_close(q[0], q[0].flip(0))          # symmetric around the centre bin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_localization_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    B, n_z, D = 5, 7, 4
    snippets, depth = torch.randn(B, D, generator=g), torch.randn(B, n_z, D, generator=g)
    mask = torch.ones(B, n_z, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, :2] = False
    target = torch.tensor([0, 4, -1, 2, 6])
    for sigma in (2.0, LOCALIZATION_SIGMA_BINS):
        loss = LocalizationLoss(temperature=0.1, sigma=sigma)
        assert_matches_reference(lambda s, d: loss(s, d, target, mask),
                                 lambda s, d: localization_loss(s, d, target, mask, temperature=0.1, sigma=sigma),
                                 (snippets, depth), dtype)


def test_default_localization_target_is_sharp():
    """Over the tiny model's 4 depth bins, sigma = 2 bins left the target about (0.26, 0.30, 0.26, 0.18), at
    most 0.075 nats from uniform: the term hardly said where a finding is. The default puts most of the mass
    on the true bin and a little on its neighbours."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    flat = gaussian_bin_targets(torch.tensor([1]), mask, sigma=2.0)[0]
    sharp = gaussian_bin_targets(torch.tensor([1]), mask)[0]
    kl = lambda q: float((q * (q * 4).log()).sum())  # noqa: E731 - KL divergence from the uniform guess
    assert kl(flat) < 0.08 and flat.max() < 0.31
    assert sharp[1] > 0.75 and sharp[0] == pytest.approx(sharp[2]) and sharp[3] < 0.01 and kl(sharp) > 0.6


def test_localization_edge_cases():
    loss = LocalizationLoss()
    s, d = torch.randn(2, 3, requires_grad=True), torch.randn(2, 4, 3)
    out = loss(s, d, torch.tensor([-1, -1]))
    out.backward()
    assert out.item() == 0.0
    with pytest.raises(ValueError, match="invalid"):
        loss(s, d, torch.tensor([3, 0]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    with pytest.raises(ValueError):
        loss(s, d, torch.tensor([4, 0]))
