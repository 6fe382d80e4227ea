"""The recipes: their terms and weights, the loss each builds, overrides and what a missing input says."""

import pytest
import torch
import torch.nn.functional as F

from medvl.reference.disease_prompt_loss import disease_prompt_loss
from medvl.train.recipes import LOSS_TERMS, PROMPT_SCALE, RECIPES, create_loss, get_recipe

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
    total = result["contrastive"] + result["prompts"] + result["report_prompts"] + result["localization"]
    torch.testing.assert_close(result["loss"], total)
    expected = disease_prompt_loss(outputs["volume_embeddings"], outputs["prompt_positive"], outputs["prompt_negative"],
                                   batch["labels"].long(), PROMPT_SCALE, head_weight=proj.weight)
    torch.testing.assert_close(result["prompts"], expected)
    # the paired reports along the same prompt directions, with the same labels, without the head
    on_reports = disease_prompt_loss(outputs["text_features"], outputs["prompt_positive"], outputs["prompt_negative"],
                                     batch["labels"].long(), PROMPT_SCALE)
    torch.testing.assert_close(result["report_prompts"], on_reports)
    assert any(p is loss_fn.prompts.head.weight for p in loss_fn.parameters())


def test_prompt_terms_have_their_own_learnt_scale():
    outputs, batch = _fake(6)
    loss_fn = create_loss(get_recipe("siglip", loss_options={"prompt_scale": 12.0}), embed_dim=E, proj_dim=D)
    result = loss_fn(outputs, batch)
    # the contrastive term's logit_scale (10) is not the prompt terms'
    expected = disease_prompt_loss(outputs["text_features"], outputs["prompt_positive"], outputs["prompt_negative"],
                                   batch["labels"].long(), 12.0)
    torch.testing.assert_close(result["report_prompts"], expected)
    (result["prompts"] + result["report_prompts"]).backward()
    assert loss_fn.prompt_log_scale.grad is not None and loss_fn.prompt_log_scale.grad != 0
    assert any(p is loss_fn.prompt_log_scale for p in loss_fn.parameters())
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prompt_scale must be a finite number > 0"):
            create_loss(get_recipe("siglip", loss_options={"prompt_scale": bad}), embed_dim=E, proj_dim=D)


def test_report_prompt_term_trains_the_text_side_only():
    outputs, batch = _fake(5)
    outputs["prompt_positive"] = outputs["prompt_positive"].clone().requires_grad_(True)
    loss_fn = create_loss(get_recipe("siglip", loss_weights={"contrastive": 0.0, "prompts": 0.0, "localization": 0.0}),
                          embed_dim=E, proj_dim=D)
    result = loss_fn(outputs, batch)
    assert set(result) == {"loss", "report_prompts"}
    result["loss"].backward()
    assert outputs["text_features"].grad.abs().sum() > 0 and outputs["prompt_positive"].grad.abs().sum() > 0
    assert outputs["image_features"].grad is None and loss_fn.prompts.head.weight.grad is None


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
    recipe = get_recipe("siglip", loss_weights={"prompts": 0.0, "report_prompts": 0.0, "localization": 0})
    result = create_loss(recipe)(outputs, batch)
    assert set(result) == {"loss", "contrastive"}
    torch.testing.assert_close(result["loss"], result["contrastive"])
    with pytest.raises(KeyError, match="volume_embeddings"):
        create_loss("siglip")(outputs, batch)
    only_loc = get_recipe("siglip", loss_weights={"prompts": 0.0, "report_prompts": 0.0, "contrastive": 0.0})
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
    with pytest.raises(ValueError, match="loss must be one of"):
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
