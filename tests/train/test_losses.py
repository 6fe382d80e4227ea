import math

import pytest
import torch
import torch.nn.functional as F

from medvl.train import (RECIPES, DiseasePromptLoss, LocalizationLoss, MultiPositiveContrastiveLoss, create_loss,
                         get_recipe)
from medvl.train.losses import (LOCALIZATION_SIGMA_BINS, gaussian_bin_targets, prompt_pos_weight,
                                reference_disease_prompt_loss, reference_localization_loss,
                                reference_multi_positive_loss)
from medvl.train.recipes import LOSS_TERMS


def _leaves(*tensors, dtype):
    return [t.to(dtype).clone().requires_grad_(True) for t in tensors]


def _compare(fn, ref, inputs, dtype):
    a = _leaves(*inputs, dtype=dtype)
    b = _leaves(*inputs, dtype=dtype)
    out, expected = fn(*a), ref(*b)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    out.backward()
    expected.backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **tol)


# --- disease prompts -------------------------------------------------------------------------

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

    a = _leaves(x, pos, neg, dtype=dtype)
    b = _leaves(x, pos, neg, weight, dtype=dtype)
    with torch.no_grad():
        loss.head.weight.copy_(weight)
    out = loss(*a, labels, 7.0)
    expected = reference_disease_prompt_loss(*b[:3], labels, 7.0, head_weight=b[3])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
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


# --- localization ----------------------------------------------------------------------------

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
        _compare(lambda s, d: loss(s, d, target, mask),
                 lambda s, d: reference_localization_loss(s, d, target, mask, sigma=sigma), (snippets, depth), dtype)


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


# --- multi-positive contrastive -------------------------------------------------------------

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
    _compare(lambda a, b: loss(a, b, labels), lambda a, b: reference_multi_positive_loss(a, b, labels, scale),
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
    torch.testing.assert_close(loss(v, t, labels), reference_multi_positive_loss(v, t, labels, 100.0))
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


# --- recipes ---------------------------------------------------------------------------------

B, D, E, NZ, NF = 4, 8, 6, 5, 3


def _fake(seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    outputs = {
        "image_features": unit(B, D).requires_grad_(True), "text_features": unit(B, D).requires_grad_(True),
        "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0),
        "volume_embeddings": torch.randn(B, E, generator=g), "prompt_positive": unit(NF, D),
        "prompt_negative": unit(NF, D), "depth_features": torch.randn(B, NZ, E, generator=g),
        "snippet_features": unit(B, D), "depth_target": torch.tensor([0, 2, -1, 4]),
        "depth_mask": torch.ones(B, NZ, dtype=torch.bool),
    }
    batch = {
        "label": torch.tensor([0, 1, 0, 2]),
        "labels": torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool),
        "entities": (torch.rand(B, 14, generator=g) < 0.4, torch.rand(B, 6, generator=g) < 0.4,
                     torch.rand(B, 9, generator=g) < 0.4),
    }
    return outputs, batch


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_runs(name):
    outputs, batch = _fake()
    recipe = get_recipe(name)
    loss_fn = create_loss(recipe, embed_dim=E, proj_dim=D)
    result = loss_fn(outputs, batch)
    assert set(result) == {"loss", *LOSS_TERMS[recipe.loss]}
    assert result["loss"].dim() == 0 and torch.isfinite(result["loss"])
    result["loss"].backward()
    assert outputs["image_features"].grad is not None


def test_siglip_recipe_total_and_head():
    outputs, batch = _fake(1)
    loss_fn = create_loss("siglip", embed_dim=E, proj_dim=D)
    proj = torch.nn.Linear(E, D, bias=False)
    loss_fn.prompts.init_from(proj)
    result = loss_fn(outputs, batch)
    total = result["contrastive"] + result["prompts"] + result["localization"]
    torch.testing.assert_close(result["loss"], total)
    expected = reference_disease_prompt_loss(outputs["volume_embeddings"], outputs["prompt_positive"],
                                             outputs["prompt_negative"], batch["labels"].long(), 10.0,
                                             head_weight=proj.weight)
    torch.testing.assert_close(result["prompts"], expected)
    assert any(p is loss_fn.prompts.head.weight for p in loss_fn.parameters())


def test_recipe_variants():
    outputs, batch = _fake(2)
    label = create_loss(get_recipe("mrclip", loss="siglip-label"))(outputs, batch)
    assert set(label) == {"loss", "contrastive"} and torch.isfinite(label["loss"])
    trim = get_recipe("medtrim")
    assert trim.loss_options["margin"] == 0.3 and create_loss(trim).triplet.margin == 0.3


def test_zero_weights_switch_terms_off():
    outputs, batch = _fake(3)
    for key in ("volume_embeddings", "prompt_positive", "depth_features", "snippet_features", "depth_target"):
        outputs.pop(key)
    recipe = get_recipe("siglip", loss_weights={"prompts": 0.0, "localization": 0})
    result = create_loss(recipe)(outputs, batch)
    assert set(result) == {"loss", "contrastive"}
    torch.testing.assert_close(result["loss"], result["contrastive"])
    with pytest.raises(KeyError, match="volume_embeddings"):
        create_loss("siglip")(outputs, batch)
    only_loc = get_recipe("siglip", loss_weights={"prompts": 0.0, "contrastive": 0.0})
    with pytest.raises(KeyError, match="depth_features"):
        create_loss(only_loc)(outputs, batch)
    trim = get_recipe("medtrim", loss_weights={"text_text": 0.0, "image_image": 0.0})
    out2, batch2 = _fake(3)
    result = create_loss(trim)(out2, batch2)
    assert set(result) == {"loss", "image_text", "text_image"}
    torch.testing.assert_close(result["loss"], result["image_text"] + result["text_image"])


def test_missing_batch_key_named():
    outputs, batch = _fake(4)
    with pytest.raises(KeyError, match="'label'"):
        create_loss("mrclip")(outputs, {})
    with pytest.raises(KeyError, match="entities"):
        create_loss("medtrim")(outputs, {"label": batch["label"]})


def test_bad_names_and_overrides():
    with pytest.raises(KeyError, match="unknown recipe"):
        get_recipe("nope")
    with pytest.raises(TypeError, match="unknown field"):
        get_recipe("siglip", learning_rate=1.0)
    with pytest.raises(ValueError, match="unknown loss"):
        get_recipe("mrclip", loss="infonce")
    with pytest.raises(ValueError, match="no term"):
        get_recipe("siglip", loss_weights={"triplet": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        get_recipe("soft", loss_weights={"contrastive": 0.0})
    with pytest.raises(ValueError, match="unknown data"):
        get_recipe("soft", data="mnist")
    with pytest.raises(ValueError, match="takes no option"):
        create_loss(get_recipe("soft", loss_options={"margin": 1.0}))
    with pytest.raises(TypeError):
        create_loss(42)
    assert get_recipe("siglip", lr=3e-4).lr == 3e-4 and RECIPES["siglip"].lr != 3e-4
