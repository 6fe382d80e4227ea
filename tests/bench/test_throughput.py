"""medvl.bench.throughput: the plain path is the same model as the fused one (features, loss, gradients), the
largest-batch search finds the right answer against fake memory functions, and a CPU measurement runs."""

import math
import random

import pytest
import torch

from medvl.bench import throughput
from medvl.bench.throughput import build_path, make_batch, plain_loss, plain_volume_path, search_largest

SIZE = (32, 32, 16)


def _outputs(model, loss_fn, volume, tokens):
    out = model(volume, tokens)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    return out, loss


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_plain_path_is_the_same_model(pool):
    from monai.networks.blocks import PatchEmbeddingBlock
    from open_clip.loss import SigLipLoss

    fused, fused_loss = build_path("fused", "vit3d-tiny", SIZE, vision={"pool": pool})
    plain = plain_volume_path(fused)
    assert isinstance(plain.visual.patch_embed.block, PatchEmbeddingBlock)
    assert isinstance(plain_loss(), SigLipLoss)
    fused.eval(), plain.eval()  # the text tower's dropout would draw different masks
    volume, tokens = make_batch(fused, 5, SIZE, "cpu", seed=1)
    a, loss_a = _outputs(fused, fused_loss, volume, tokens)
    b, loss_b = _outputs(plain, plain_loss(), volume, tokens)
    for key in ("image_features", "text_features", "logit_scale", "logit_bias"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
    fe, pe = fused.visual.patch_embed, plain.visual.patch_embed.block
    pairs = [(fe.weight, pe.patch_embeddings.weight), (fe.bias, pe.patch_embeddings.bias),
             (fe.pos_embed, pe.position_embeddings), (fused.logit_scale, plain.logit_scale),
             (fused.visual.blocks[0].attn.qkv.weight, plain.visual.blocks[0].attn.qkv.weight)]
    for f, p in pairs:
        assert f.grad is not None and p.grad is not None
        torch.testing.assert_close(f.grad.reshape(p.grad.shape), p.grad, rtol=1e-4, atol=1e-5)
    # A copy: the fused model's weights are untouched and not shared.
    assert plain.visual.blocks[0].attn.qkv.weight is not fused.visual.blocks[0].attn.qkv.weight


def test_plain_path_rejects_other_sizes():
    fused, _ = build_path("fused", "vit3d-tiny", SIZE)
    plain = plain_volume_path(fused)
    volume, tokens = make_batch(fused, 2, (64, 64, 32), "cpu")
    with pytest.raises(ValueError, match="configured size"):
        plain(volume, tokens)


def _brute_force(peak, budget, cap):
    fitting = [b for b in range(1, cap + 1) if peak(b) <= budget]
    return max(fitting) if fitting else 0


FAKES = {
    "linear": lambda b: 300.0 + 7.0 * b,
    "steps": lambda b: 1000.0 * math.ceil(b / 10),  # flat stretches: no slope to predict with
    "kinked": lambda b: 100.0 + 3.0 * b + 40.0 * (b // 16) + (0.05 * b * b if b > 200 else 0.0),
    "oom": lambda b: 50.0 + 2.0 * b if b <= 300 else math.inf,
}


@pytest.mark.parametrize("name", sorted(FAKES))
def test_search_finds_the_largest_batch(name):
    fake, rng, cap = FAKES[name], random.Random(0), 512
    for _ in range(60):
        budget = rng.uniform(0, fake(cap) * 1.2 if math.isfinite(fake(cap)) else 1000.0)
        start = rng.randint(1, cap)
        calls = []

        def peak(batch):
            calls.append(batch)
            return fake(batch)

        best, order = search_largest(peak, budget, cap, start)
        assert best == _brute_force(fake, budget, cap), (budget, start)
        assert order == calls and len(set(calls)) == len(calls)  # never the same batch twice
        assert len(calls) <= 4 * math.log2(cap) + 3


def test_search_edges_and_cost():
    linear = FAKES["linear"]
    assert search_largest(linear, 100.0, 64)[0] == 0  # not even 1 fits
    assert search_largest(lambda b: 0.0, 1.0, 64) == (64, [1, 2, 4, 8, 16, 32, 64])  # no slope: doubling
    assert search_largest(linear, 1e9, 64) == (64, [1, 2, 64])  # the line through two probes, clamped
    assert search_largest(linear, 1e9, 1)[0] == 1
    # From one known measurement and a low first guess, a linear memory takes a handful of probes.
    best, order = search_largest(linear, 2000.0, 4096, start=60, known={8: linear(8)})
    assert best == 242 and len(order) <= 3 and 8 not in order
    # With a resolution the search stops early at a batch that fits, within that fraction of the answer.
    best, order = search_largest(linear, 3000.0, 1024, start=1, resolution=0.05)
    assert linear(best) <= 3000.0 and best >= 0.95 * 385
    with pytest.raises(ValueError):
        search_largest(linear, 1.0, 0)


def test_measure_step_and_isolated_cpu_run():
    # One measurement in a fresh process, as the CLI and the benchmarks take them.
    result = throughput.run_isolated(throughput._measure_path, path="fused", model_name="vit3d-tiny",
                                     volume_size=SIZE, batch_size=2, steps=1, warmup=1, device="cpu",
                                     precision="fp32", threads=1)
    assert result["batch"] == 2 and result["volumes_per_s"] > 0 and len(result["step_s"]) == 1
    # Parameters + the growth: at least the gradients and the two AdamW moments beside the weights.
    assert result["peak_mib"] > 3 * result["state_mib"]


def _allocate_too_much():
    raise MemoryError("pretend")


def test_isolated_errors_come_back():
    with pytest.raises(MemoryError, match="pretend"):
        throughput.run_isolated(_allocate_too_much)
    with pytest.raises(RuntimeError, match="path must be one of"):
        throughput.run_isolated(throughput._measure_path, path="nope", model_name="vit3d-tiny", volume_size=SIZE,
                                batch_size=1, steps=1, warmup=0, device="cpu", precision="fp32")


def test_cuda_memory_calls_get_a_device_index(monkeypatch):
    # torch 2.11 refused get_device_properties("cuda") (no index): the GPU's largest-batch benchmark
    # died on it. Strict stand-ins for the calls make the same mistake fail here.
    def strict(device=None, *rest):
        if not isinstance(device, int) and (device is None or torch.device(device).index is None):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got: {device}")
        return type("Properties", (), {"total_memory": 80 * 2**30})()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", strict)
    assert throughput.indexed("cuda") == torch.device("cuda", 3)
    assert throughput.indexed(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert throughput.indexed("cpu") == torch.device("cpu")
    assert throughput._budget_bytes("full", torch.device("cuda")) == 80 * 2**30
