"""VolumeEncoder: shapes, position-table resampling through the fused op, depth features, checkpointing."""

import pytest
import torch
import torch.nn.functional as F

from medvl.models.volume_encoder import VolumeEncoder, interpolate_pos_embed3d

TINY = dict(img_size=(32, 32, 16), patch_size=(8, 8, 4), embed_dim=24, depth=2, num_heads=2, output_dim=16)
GRID = (4, 4, 4)


def encoder(**overrides) -> VolumeEncoder:
    torch.manual_seed(0)
    return VolumeEncoder(**{**TINY, **overrides})


def ct(*spatial, batch=2, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1024, 2000, (batch, 1, *spatial), dtype=torch.int16, generator=generator)


def zero_blocks(model: VolumeEncoder) -> None:
    """Blocks whose every weight is zero are the identity (the residual branches output 0)."""
    with torch.no_grad():
        for block in model.blocks:
            for param in block.parameters():
                param.zero_()


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("pos_embed", ["learnable", "sincos"])
def test_output_shapes(pool, pos_embed):
    model = encoder(pool=pool, pos_embed=pos_embed).eval()
    out = model(ct(32, 32, 16), return_tokens=True, return_depth=True)
    assert set(out) == {"embedding", "projected", "pooled", "tokens", "depth"}
    assert out["embedding"].shape == out["projected"].shape == (2, 16)
    assert out["pooled"].shape == (2, 24)
    assert out["tokens"].shape == (2, 64, 24)
    assert out["depth"].shape == (2, 4, 24)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out.values())
    assert set(model(ct(32, 32, 16))) == {"embedding", "projected", "pooled"}


def test_float_input_without_window():
    model = encoder(window=None, pool="mean").eval()
    volume = torch.rand(2, 1, 32, 32, 16)
    out = model(volume, return_tokens=True)
    assert out["embedding"].shape == (2, 16) and out["tokens"].shape == (2, 64, 24)
    # Mean pooling is the mean of the final-norm tokens, projected.
    torch.testing.assert_close(out["pooled"], out["tokens"].mean(1))
    torch.testing.assert_close(out["embedding"], out["pooled"] @ model.proj.weight.T)


def test_window_is_applied_inside():
    """An int16 volume with a window equals the pre-windowed float volume without one."""
    windowed = encoder().eval()
    raw = encoder(window=None).eval()
    raw.load_state_dict(windowed.state_dict())
    volume = ct(32, 32, 16)
    scaled = ((volume.float().clamp(-1000, 400) + 1000) / 1400)
    torch.testing.assert_close(windowed(volume)["embedding"], raw(scaled)["embedding"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_other_size_uses_interpolated_table(pool):
    model = encoder(pool=pool).eval()
    volume = ct(48, 32, 24)
    out = model(volume, return_tokens=True, return_depth=True)
    assert out["tokens"].shape == (2, 6 * 4 * 6, 24) and out["depth"].shape == (2, 6, 24)
    # Independent resampling of the table, then an encoder built for that size with it as its table.
    table = model.patch_embed.pos_embed.detach().reshape(1, *GRID, 24).permute(0, 4, 1, 2, 3)
    table = F.interpolate(table, size=(6, 4, 6), mode="trilinear", align_corners=False)
    table = table.permute(0, 2, 3, 4, 1).reshape(1, 6 * 4 * 6, 24)
    big = encoder(pool=pool, img_size=(48, 32, 24)).eval()
    state = model.state_dict()
    state["patch_embed.pos_embed"] = table
    big.load_state_dict(state)
    expected = big(volume, return_tokens=True, return_depth=True)
    for key in out:
        torch.testing.assert_close(out[key], expected[key], atol=1e-5, rtol=1e-5)


def test_same_size_uses_exact_table():
    model = encoder()
    table = model.position_embedding(GRID)
    assert table.data_ptr() == model.patch_embed.pos_embed.data_ptr()
    torch.testing.assert_close(table, model.patch_embed.pos_embed[0], rtol=0, atol=0)
    assert torch.equal(interpolate_pos_embed3d(model.patch_embed.pos_embed, GRID, GRID),
                       model.patch_embed.pos_embed[0])
    # And the forward's patch tokens are the module's own fused patch embedding (table added once).
    model = encoder(pool="mean").eval()
    zero_blocks(model)
    volume = ct(32, 32, 16)
    tokens = model(volume, return_tokens=True)["tokens"]
    torch.testing.assert_close(tokens, F.layer_norm(model.patch_embed(volume), (24,), eps=1e-6))


def test_interpolated_sincos_table_runs():
    model = encoder(pos_embed="sincos", pool="mean").eval()
    assert "patch_embed.pos_embed" not in dict(model.named_parameters())
    assert model(ct(40, 32, 20))["embedding"].shape == (2, 16)


def test_bad_sizes_raise():
    model = encoder()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(ct(30, 32, 16))
    with pytest.raises(ValueError, match="5-D"):
        model(ct(32, 32, 16)[0])
    with pytest.raises(ValueError, match="pool"):
        encoder(pool="attention")
    with pytest.raises(ValueError, match="num_heads"):
        encoder(num_heads=5)


def test_max_pool_is_the_featurewise_maximum_of_the_tokens():
    model = encoder(pool="max").eval()
    out = model(ct(32, 32, 16), return_tokens=True)
    torch.testing.assert_close(out["pooled"], out["tokens"].amax(1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_depth_features_are_in_plane_means(pool):
    model = encoder(pool=pool).eval()
    volume = ct(32, 32, 24)  # grid (4, 4, 6)
    out = model(volume, return_tokens=True, return_depth=True)
    tokens = out["tokens"]
    expected = torch.stack([
        torch.stack([tokens[b, [(ix * 4 + iy) * 6 + iz for ix in range(4) for iy in range(4)]].mean(0)
                     for iz in range(6)]) for b in range(2)])
    torch.testing.assert_close(out["depth"], expected)


def test_depth_rows_follow_the_last_axis():
    """With identity blocks and no position table the tokens depend only on their patch's contents:
    a volume varying only along Z gives one distinct depth row per axial patch row (each equal to the
    patch embedding of that slab); one varying only along X gives identical rows."""
    model = encoder(pool="mean", window=None).eval()
    zero_blocks(model)
    with torch.no_grad():
        model.patch_embed.pos_embed.zero_()
    z_ramp = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 1, 16).expand(2, 1, 32, 32, 16)
    depth = model(z_ramp.contiguous(), return_depth=True)["depth"]
    tokens = F.layer_norm(model.patch_embed(z_ramp.contiguous()), (24,), eps=1e-6).reshape(2, 4, 4, 4, 24)
    torch.testing.assert_close(depth, tokens[:, 0, 0])  # row d: slices [4d, 4d + 4)
    assert (depth[:, 1:] - depth[:, :-1]).abs().amax() > 1e-3
    x_ramp = torch.arange(32, dtype=torch.float32).reshape(1, 1, 32, 1, 1).expand(2, 1, 32, 32, 16)
    depth = model(x_ramp.contiguous(), return_depth=True)["depth"]
    torch.testing.assert_close(depth, depth[:, :1].expand_as(depth))
    # ... and a change confined to slices [8, 12) changes only depth row 2.
    base = torch.zeros(1, 1, 32, 32, 16)
    bumped = base.clone()
    bumped[..., 8:12] = 5.0
    delta = (model(bumped, return_depth=True)["depth"] - model(base, return_depth=True)["depth"]).abs().amax(-1)
    assert delta[0, 2] > 1e-3 and torch.all(delta[0, [0, 1, 3]] == 0)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpointing_matches(pool, dropout):
    plain = encoder(pool=pool, dropout=dropout).train()
    ckpt = encoder(pool=pool, dropout=dropout).train()
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and encoder(grad_checkpointing=True).grad_checkpointing
    volume = ct(32, 32, 16)
    losses, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(volume, return_depth=True)
        loss = out["embedding"].square().sum() + out["depth"].sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_backward_reaches_embedding_parameters():
    model = encoder(pool="cls").train()
    model(ct(48, 32, 24))["embedding"].sum().backward()  # through the interpolated table
    for name in ("patch_embed.weight", "patch_embed.bias", "patch_embed.pos_embed", "cls_token", "cls_pos_embed",
                 "proj.weight", "blocks.0.attn.qkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_seeded_init_and_no_weight_decay():
    a, b = encoder(), encoder()
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.proj.weight, VolumeEncoder(**TINY).proj.weight)  # a different seed state differs
    params = dict(a.named_parameters())
    names = a.no_weight_decay()
    assert names <= params.keys()
    assert {"patch_embed.pos_embed", "patch_embed.bias", "cls_token", "cls_pos_embed", "norm.weight",
            "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"} <= names
    assert not names & {"patch_embed.weight", "proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"}
    assert encoder(pos_embed="sincos", pool="mean").no_weight_decay() <= dict(
        encoder(pos_embed="sincos", pool="mean").named_parameters()).keys()
    # Init: Linear biases zero, LayerNorm ones/zeros, Linear weights ~ 0.02.
    assert torch.all(a.blocks[0].mlp.fc1.bias == 0) and torch.all(a.norm.weight == 1)
    assert 0.01 < a.blocks[0].mlp.fc1.weight.std() < 0.03


# ------------------------------------------------------------------------------------------------------------
# The convolutional stem (hybrid ViT)


def test_stem_keeps_the_token_grid_and_depth_rows_in_input_voxels():
    model = encoder(stem=(8,), pool="mean").eval()
    assert model.patch_size == (8, 8, 4) and model.img_size == (32, 32, 16) and tuple(model.grid) == GRID
    assert model.patch_embed.patch_size == (4, 4, 2) and model.patch_embed.window is None
    out = model(ct(32, 32, 16), return_tokens=True, return_depth=True)
    assert out["tokens"].shape == (2, 64, 24) and out["depth"].shape == (2, 4, 24)
    # a change confined to slices [9, 11) of the input moves depth row 2 most; the others move too, through
    # the stem's GroupNorm statistics (per sample, over the whole volume)
    base = torch.full((1, 1, 32, 32, 16), -800, dtype=torch.int16)
    bumped = base.clone()
    bumped[..., 9:11] = 40
    delta = (model(bumped, return_depth=True)["depth"] - model(base, return_depth=True)["depth"]).abs().amax(-1)
    assert delta[0, 2] > 1e-3 and int(delta[0].argmax()) == 2
    # another size goes through the resampled table as without a stem
    assert model(ct(48, 32, 24), return_depth=True)["depth"].shape == (2, 6, 24)


def test_stem_windows_the_raw_volume_first():
    """The stem applies the model's window: an int16 volume equals the pre-windowed float volume through a
    model without a window, with the same weights."""
    windowed = encoder(stem=(8, 12)).eval()
    raw = encoder(stem=(8, 12), window=None).eval()
    raw.load_state_dict(windowed.state_dict())
    volume = ct(32, 32, 16)
    scaled = (volume.float().clamp(-1000, 400) + 1000) / 1400
    torch.testing.assert_close(windowed(volume)["embedding"], raw(scaled)["embedding"], atol=1e-5, rtol=1e-4)
    assert windowed.patch_embed.patch_size == (2, 2, 1) and windowed.patch_embed.weight.shape[1] == 12


def test_stem_gradients_and_weight_decay():
    model = encoder(stem=(8,), pool="max").train()
    model(ct(32, 32, 16))["embedding"].square().sum().backward()
    params = dict(model.named_parameters())
    for name in ("stem.layers.0.weight", "stem.layers.0.bias", "stem.layers.1.weight", "patch_embed.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert "stem.layers.0.weight" not in model.no_weight_decay()
    assert {"stem.layers.0.bias", "stem.layers.1.weight", "stem.layers.1.bias"} <= model.no_weight_decay()


def test_stem_does_not_mix_the_samples_of_a_batch():
    model = encoder(stem=(8,)).eval()
    volume = ct(32, 32, 16, batch=3)
    together = model(volume)["embedding"]
    alone = torch.cat([model(volume[i : i + 1])["embedding"] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (dict(stem=(8,), patch_size=(8, 8, 3)), "multiples of the stem's stride 2"),
    (dict(stem=(8, 8), patch_size=(8, 8, 2)), "multiples of the stem's stride 4"),
    (dict(stem=(8,), img_size=(32, 32, 15)), "img_size"),
    (dict(stem=(0,)), "stem widths must be positive"),
])
def test_stem_bad_settings_name_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        encoder(**overrides)
