"""MultiPositiveContrastiveLoss against its reference in value and gradient, plain CLIP when no two samples
share a category, the capped scale, and a process group of one rank."""

import math

import pytest
import torch
import torch.nn.functional as F

from medvl.nn.multi_positive_loss import MultiPositiveContrastiveLoss
from medvl.reference.multi_positive_loss import multi_positive_loss
from tests.utils import assert_matches_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_positive_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    B, D = 7, 5
    v = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    t = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, -1, 1, -1])
    loss = MultiPositiveContrastiveLoss().to(dtype)
    scale = loss.scale.detach()
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert_matches_reference(lambda a, b: loss(a, b, labels), lambda a, b: multi_positive_loss(a, b, labels, scale),
                             (v, t), dtype)
    assert loss.log_scale.grad is not None and torch.isfinite(loss.log_scale.grad)


def test_multi_positive_reduces_to_clip_with_distinct_labels():
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = MultiPositiveContrastiveLoss(init_scale=10.0)
    logits = 10.0 * v @ t.t()
    clip = 0.5 * F.cross_entropy(logits, torch.arange(6)) + 0.5 * F.cross_entropy(logits.t(), torch.arange(6))
    torch.testing.assert_close(loss(v, t, torch.arange(6)), clip)
    torch.testing.assert_close(loss(v, t, torch.full((6,), -1)), clip)


def test_logit_scale_cap():
    loss = MultiPositiveContrastiveLoss()
    assert loss.scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))
    assert loss.scale.item() == pytest.approx(100.0)
    v, t = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 3), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(loss(v, t, labels), multi_positive_loss(v, t, labels, 100.0))
    loss(v, t, labels).backward()
    assert loss.log_scale.grad.item() == 0.0


def test_multi_positive_group_of_one(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        v = F.normalize(torch.randn(5, 4), dim=-1).requires_grad_(True)
        t = F.normalize(torch.randn(5, 4), dim=-1).requires_grad_(True)
        labels = torch.tensor([0, 1, 0, -1, 1])
        out = MultiPositiveContrastiveLoss(group=dist.group.WORLD)(v, t, labels)
        out.backward()
        v2, t2 = v.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
        expected = MultiPositiveContrastiveLoss()(v2, t2, labels)
        expected.backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(v.grad, v2.grad)
        torch.testing.assert_close(t.grad, t2.grad)
    finally:
        dist.destroy_process_group()
