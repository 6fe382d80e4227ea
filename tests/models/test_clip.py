"""CLIPModel and the model factory: configs as files, overrides, the forward dict, SigLIP on top."""

from __future__ import annotations

import math

import pytest
import torch

import medvl
from medvl.models import CLIPModel, VolumeEncoder, create_model, list_models
from medvl.models.factory import model_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("vit3d-tiny")


def test_packaged_configs():
    assert {"vit3d-tiny", "vit3d-small", "vit3d-base"} <= set(list_models())
    with pytest.raises(ValueError, match="model must be one of 'vit3d-"):
        create_model("vit3d-huge")
    with pytest.raises(ValueError, match="unknown override"):
        model_config("vit3d-tiny", depth=3)
    assert model_config("vit3d-tiny", vision={"depth": 1})["vision"]["depth"] == 1


def test_forward_dict_and_siglip_initialisation(tiny):
    volume = torch.randint(-1024, 2000, (2, 1, 64, 64, 32), dtype=torch.int16)
    out = tiny(volume, ["small nodule in the right upper lobe.", "no pleural effusion."])
    assert out["image_features"].shape == out["text_features"].shape == (2, tiny.embed_dim)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    # the tiny model's bias starts at the log-odds of a positive pair in its small batches (its config says why)
    bias = model_config("vit3d-tiny")["init_logit_bias"]
    assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-6) and out["logit_bias"].item() == pytest.approx(bias)
    assert -4.0 < bias < -2.0
    loss = medvl.nn.SigLIPLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    for name in ("logit_scale", "logit_bias"):
        assert getattr(tiny, name).grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.visual.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.text.parameters())
    tiny.zero_grad(set_to_none=True)


def test_standardising_towers_hand_over_raw_projections(tiny):
    """The losses standardise ``*_embeddings`` over their batch; the features use the stored statistics, so a
    volume is encoded the same alone as in a batch (eval mode: nothing else changes either)."""
    assert tiny.standardizes
    volume = torch.randint(-1024, 2000, (3, 1, 64, 64, 32), dtype=torch.int16)
    tiny.eval()
    with torch.no_grad():
        out = tiny(volume, ["a nodule.", "no effusion.", "cardiomegaly."], extra_texts={"prompt": ["x is present."]})
        alone = tiny(volume[:1], ["a nodule."])
    tiny.train()
    assert {"image_embeddings", "text_embeddings", "prompt_embeddings"} <= set(out)
    torch.testing.assert_close(alone["image_features"], out["image_features"][:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["text_features"], out["text_features"][:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["image_features"],
                               torch.nn.functional.normalize(tiny.visual.standardizer(out["image_embeddings"]), dim=-1))
    plain = create_model("vit3d-tiny", vision={"standardize": False}, text={"standardize": False})
    assert not plain.standardizes and "image_embeddings" not in plain(volume[:2], ["a", "b"])


def test_no_weight_decay_names_exist(tiny):
    names = dict(tiny.named_parameters())
    skipped = tiny.no_weight_decay()
    assert {"logit_scale", "logit_bias"} <= skipped
    assert skipped <= set(names), sorted(skipped - set(names))[:5]


def test_base_config_is_vit_b_sized():
    config = model_config("vit3d-base")
    with torch.device("meta"):
        visual = VolumeEncoder(output_dim=config["embed_dim"],
                               **{k: tuple(v) if isinstance(v, list) else v for k, v in config["vision"].items()})
    blocks = sum(p.numel() for n, p in visual.named_parameters() if "block" in n)
    assert 84e6 < blocks < 86e6, blocks  # 12 ViT-B blocks: 85.0M


def test_towers_must_agree_on_the_shared_size(tiny):
    other = VolumeEncoder(img_size=(32, 32, 16), patch_size=(8, 8, 4), embed_dim=24, depth=1, num_heads=2,
                          output_dim=tiny.embed_dim + 1)
    with pytest.raises(ValueError, match="different sizes"):
        CLIPModel(other, tiny.text)
