"""DiseasePromptLoss against its reference in value and gradient, the class-balancing weight, unknown labels
and the head copied from the image projection."""

import pytest
import torch

from medvl.nn.disease_prompt_loss import DiseasePromptLoss, prompt_pos_weight
from medvl.reference.disease_prompt_loss import disease_prompt_loss
from tests.utils import MODULE_TOLERANCES, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disease_prompt_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    B, n_f, E, D = 6, 4, 5, 3
    x, pos, neg = torch.randn(B, E, generator=g), torch.randn(n_f, D, generator=g), torch.randn(n_f, D, generator=g)
    labels = torch.randint(-1, 2, (B, n_f), generator=g)
    labels[:, 0] = torch.tensor([1, 0, 0, 0, -1, 0])       # ratio 4
    labels[:, 1] = torch.tensor([1, -1, 1, 1, -1, 1])      # no negative -> weight 1
    labels[:, 2] = torch.tensor([0, 0, -1, 0, 0, 0])       # no positive -> weight 1
    loss = DiseasePromptLoss(E, D).to(dtype)
    weight = loss.head.weight.detach().clone()

    a = leaves(x, pos, neg, dtype=dtype)
    b = leaves(x, pos, neg, weight, dtype=dtype)
    with torch.no_grad():
        loss.head.weight.copy_(weight)
    out = loss(*a, labels, 7.0)
    expected = disease_prompt_loss(*b[:3], labels, 7.0, head_weight=b[3])
    tol = MODULE_TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, **tol)
    out.backward()
    expected.backward()
    for u, v in zip(a, b[:3]):
        torch.testing.assert_close(u.grad, v.grad, **tol)
    torch.testing.assert_close(loss.head.weight.grad, b[3].grad, **tol)


def test_pos_weight_rule():
    labels = torch.tensor([[1, 1, 0, -1, 1],
                           [0, 1, 0, -1, 0],
                           [0, 1, 0, 1, 0],
                           [-1, 1, 0, 0, 0]])
    labels = torch.cat([labels, torch.zeros(40, 5, dtype=torch.long)])
    labels[4:, 1] = -1                                       # finding 1: all known are positive
    w = prompt_pos_weight(labels)
    assert w[0] == pytest.approx(min(42 / 1, 20.0))        # capped at 20
    assert w[1] == 1.0                                       # n_neg = 0
    assert w[2] == 1.0                                       # n_pos = 0
    assert w[3] == pytest.approx(20.0)                       # 41 / 1 capped
    labels2 = torch.tensor([[1], [1], [0], [0], [0], [-1]])
    assert prompt_pos_weight(labels2)[0] == pytest.approx(1.5)


def test_disease_prompt_masks_unknown():
    g = torch.Generator().manual_seed(1)
    x, pos, neg = torch.randn(4, 3, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    labels = torch.tensor([[1, 0], [0, -1], [-1, 1], [0, 0]])
    loss = DiseasePromptLoss()
    base = loss(x, pos, neg, labels, 5.0)
    # changing an unknown row's embedding only affects entries with known labels
    x2 = x.clone().requires_grad_(True)
    all_unknown = torch.full_like(labels, -1)
    out = loss(x2, pos, neg, all_unknown, 5.0)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(x2.grad) == 0
    # a fully unknown finding column changes nothing about the other columns' mean
    extended = torch.cat([labels, torch.full((4, 1), -1)], 1)
    pos3, neg3 = torch.cat([pos, torch.randn(1, 3)]), torch.cat([neg, torch.randn(1, 3)])
    torch.testing.assert_close(loss(x, pos3, neg3, extended, 5.0), base)


def test_disease_prompt_init_from():
    proj = torch.nn.Linear(5, 3, bias=False)
    loss = DiseasePromptLoss(5, 3).init_from(proj)
    torch.testing.assert_close(loss.head.weight, proj.weight)
    assert loss.head.weight.data_ptr() != proj.weight.data_ptr()
    with pytest.raises(ValueError):
        DiseasePromptLoss(4, 3).init_from(proj)
