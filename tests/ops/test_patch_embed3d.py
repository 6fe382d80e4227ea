"""medvl.patch_embed3d: every backend against the reference, MONAI and Conv3d; errors; opcheck; compile."""

from __future__ import annotations

import math

import pytest
import torch

import medvl
from medvl.reference.patch_embed3d import patch_embed3d as reference
from tests.utils import assert_close, available_backends, backend_params, run_script

INT_RANGES = {torch.int16: (-1100, 1500), torch.uint8: (0, 256), torch.uint16: (0, 4096)}
WINDOWS = {torch.int16: (-1000.0, 400.0), torch.uint8: (20.0, 230.0), torch.uint16: (100.0, 3000.0)}


def make_volume(dtype, shape, seed=0, small=False):
    generator = torch.Generator().manual_seed(seed)
    if dtype in INT_RANGES:
        # Unwindowed raw values stay small, so that fp32 tolerances apply to O(1) terms.
        lo, hi = (0, 8) if small else INT_RANGES[dtype]
        return torch.randint(lo, hi, shape, generator=generator, dtype=torch.int64).to(dtype)
    # Values straddle the window (-1, 1), some exactly on its edges.
    volume = torch.randn(shape, generator=generator) * 0.8
    flat = volume.view(-1)
    flat[::7] = -1.0
    flat[3::11] = 1.0
    return volume.to(dtype)


def make_params(channels, patch, embed, tokens, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(embed, channels, *patch, generator=generator) / math.sqrt(channels * math.prod(patch))
    bias = torch.randn(embed, generator=generator) * 0.1
    pos = torch.randn(1, tokens, embed, generator=generator) * 0.1
    return weight.to(dtype), bias.to(dtype), pos.to(dtype)


def tokens_of(size, patch):
    return math.prod(-(-s // p) for s, p in zip(size, patch))


def backend_cases(backend):
    """(channels, size, patch, embed): the interpreter is slow, so Triton gets the small ones."""
    small = [(1, (5, 9, 7), (2, 4, 3), 12), (3, (4, 6, 5), (2, 2, 2), 20)]
    if backend == "triton" and not torch.cuda.is_available():
        return small + [(1, (16, 16, 17), (16, 16, 16), 8)]
    return small + [(1, (33, 20, 19), (16, 16, 16), 40), (3, (9, 35, 16), (4, 16, 16), 24),
                    (1, (7, 8, 9), (2, 2, 2), 33)]


def run_both(backend, device, volume, weight, bias, pos, window, grad_volume, **kwargs):
    """(outputs, grads) of `backend` and of the float64 reference, on the same inputs."""
    volume = volume.to(device)
    params = [t.to(device).requires_grad_() for t in (weight, bias, pos)]
    leaves = list(params)
    if grad_volume:
        volume = volume.requires_grad_()
        leaves.append(volume)
    out = medvl.patch_embed3d(volume, *params, window=window, backend=backend, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device, out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_volume = ref_leaves[3] if grad_volume else volume.detach().cpu()
    if not grad_volume and volume.is_floating_point():
        ref_volume = ref_volume.double()
    ref = reference(ref_volume, *ref_leaves[:3], window=window, out_dtype=torch.float64,
                    **{k: v for k, v in kwargs.items() if k != "out_dtype"})
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.cpu().double())
    return out, grads, ref, ref_grads


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("volume_dtype", [torch.int16, torch.uint8, torch.uint16, torch.float16, torch.bfloat16,
                                          torch.float32])
def test_matches_reference_every_volume_dtype(backend, device, volume_dtype):
    for case, (channels, size, patch, embed) in enumerate(backend_cases(backend)):
        window = WINDOWS.get(volume_dtype, (-1.0, 1.0)) if case % 2 == 0 else None
        volume = make_volume(volume_dtype, (2, channels, *size), seed=case, small=window is None)
        weight, bias, pos = make_params(channels, patch, embed, tokens_of(size, patch), seed=case)
        grad_volume = volume_dtype == torch.float32
        out, grads, ref, ref_grads = run_both(backend, device, volume, weight, bias, pos, window, grad_volume,
                                              patch_size=patch, pad=True)
        name = f"{backend} {volume_dtype} C={channels} {size} patch {patch} window {window}"
        assert_close(out, ref, torch.float32, "forward", name)
        for label, got, want in zip(("weight", "bias", "pos_embed", "volume"), grads, ref_grads):
            assert_close(got, want, torch.float32, "backward", f"{name} grad {label}")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("volume_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_volume_gradient(backend, device, volume_dtype):
    if backend == "triton" and device == "cpu" and volume_dtype == torch.bfloat16:
        pytest.skip("bf16 is wrong in the Triton interpreter (DESIGN.md); tested on a GPU")
    volume = make_volume(volume_dtype, (1, 2, 6, 5, 8)).to(device).requires_grad_()
    weight, bias, pos = make_params(2, (2, 2, 4), 16, tokens_of((6, 5, 8), (2, 2, 4)))
    grad_out = torch.randn(1, tokens_of((6, 5, 8), (2, 2, 4)), 16)
    out = medvl.patch_embed3d(volume, weight.to(device), patch_size=(2, 2, 4), window=(-1.0, 1.0), pad=True,
                              backend=backend)
    (grad,) = torch.autograd.grad(out, volume, grad_out.to(device))
    assert grad.dtype == volume_dtype
    exact = volume.detach().cpu().double().requires_grad_()
    (expected,) = torch.autograd.grad(reference(exact, weight.double(), patch_size=(2, 2, 4), window=(-1.0, 1.0),
                                                pad=True), exact, grad_out.double())
    # The only rounding is the final cast of each voxel's gradient to the volume dtype.
    assert_close(grad, expected, volume_dtype, "backward", f"{backend} grad volume",
                 plain=expected.to(volume_dtype))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_within_twice_plain_pytorch(backend, device, param_dtype):
    if backend == "triton" and device == "cpu" and param_dtype == torch.bfloat16:
        pytest.skip("bf16 is wrong in the Triton interpreter (DESIGN.md); tested on a GPU")
    size, patch = (8, 12, 12), (4, 4, 4)
    volume = make_volume(torch.int16, (2, 1, *size))
    weight, bias, pos = make_params(1, patch, 24, tokens_of(size, patch), dtype=param_dtype)
    window = (-1000.0, 400.0)
    out, grads, ref, ref_grads = run_both(backend, device, volume, weight, bias, pos, window, False,
                                          patch_size=patch)
    assert out.dtype == param_dtype
    # Plain PyTorch in that dtype: the window in fp32, then the conv with low-precision operands.
    windowed = ((volume.float() - window[0]) / (window[1] - window[0])).clamp(0, 1).to(param_dtype)
    plain_leaves = [t.clone().requires_grad_() for t in (weight, bias, pos)]
    plain = torch.nn.functional.conv3d(windowed, plain_leaves[0], plain_leaves[1], stride=patch)
    plain = plain.flatten(2).transpose(1, 2) + plain_leaves[2]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(param_dtype)
    plain_grads = torch.autograd.grad(plain, plain_leaves, grad_out)
    assert_close(out, ref, param_dtype, "forward", f"{backend} {param_dtype}", plain=plain)
    for label, got, want, base in zip(("weight", "bias", "pos_embed"), grads, ref_grads, plain_grads):
        assert_close(got, want, param_dtype, "backward", f"{backend} {param_dtype} grad {label}", plain=base)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("channels,patch", [(1, (16, 16, 16)), (3, (4, 16, 16)), (1, (2, 2, 2))])
def test_matches_monai_patch_embedding_block(backend, device, channels, patch):
    monai_blocks = pytest.importorskip("monai.networks.blocks")
    from monai.transforms import ScaleIntensityRange

    size = (32, 32, 16) if patch != (2, 2, 2) else (6, 4, 8)
    if backend == "triton" and device == "cpu":
        size = tuple(p * (2 if i == 0 else 1) for i, p in enumerate(patch))
    torch.manual_seed(0)
    block = monai_blocks.PatchEmbeddingBlock(in_channels=channels, img_size=size, patch_size=patch, hidden_size=24,
                                             num_heads=4, proj_type="conv", pos_embed_type="learnable")
    volume = make_volume(torch.int16, (2, channels, *size))
    expected = block(ScaleIntensityRange(a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True)(volume.float()))
    grad_out = torch.randn(expected.shape)
    expected_grads = torch.autograd.grad(expected, [block.patch_embeddings.weight, block.patch_embeddings.bias,
                                                    block.position_embeddings], grad_out)
    embed = medvl.nn.PatchEmbed3d.from_monai(block, window=(-1000, 400)).to(device)
    out = embed(volume.to(device), backend=backend)
    grads = torch.autograd.grad(out, [embed.weight, embed.bias, embed.pos_embed], grad_out.to(device))
    assert_close(out, torch.as_tensor(expected), torch.float32, "forward", f"{backend} vs MONAI")
    for label, got, want in zip(("weight", "bias", "pos_embed"), grads, expected_grads):
        assert_close(got, want, torch.float32, "backward", f"{backend} vs MONAI grad {label}")


@pytest.mark.parametrize("backend,device", backend_params())
def test_matches_conv3d_without_window(backend, device):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 20, kernel_size=(2, 4, 3), stride=(2, 4, 3))
    volume = torch.randn(2, 3, 6, 8, 9, requires_grad=True)
    expected = conv(volume).flatten(2).transpose(1, 2)
    grad_out = torch.randn(expected.shape)
    expected_grads = torch.autograd.grad(expected, [volume, conv.weight, conv.bias], grad_out)
    leaves = [t.detach().to(device).requires_grad_() for t in (volume, conv.weight, conv.bias)]
    out = medvl.patch_embed3d(leaves[0], leaves[1], leaves[2], patch_size=(2, 4, 3), backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device))
    assert_close(out, expected, torch.float32, "forward", f"{backend} vs Conv3d")
    for label, got, want in zip(("volume", "weight", "bias"), grads, expected_grads):
        assert_close(got, want, torch.float32, "backward", f"{backend} vs Conv3d grad {label}")


def test_padding_is_zero_after_the_window():
    # 0 HU maps to 1000/1400 inside the window, but a padded voxel must contribute exactly 0.
    volume = torch.zeros(1, 1, 3, 2, 2, dtype=torch.int16)
    weight = torch.ones(1, 1, 2, 2, 2)
    out = medvl.patch_embed3d(volume, weight, patch_size=2, window=(-1000, 400), pad=True)
    inside = 1000 / 1400
    torch.testing.assert_close(out.flatten(), torch.tensor([8 * inside, 4 * inside]))


GPU_BACKENDS = ("triton", "cuda")  # the window as a multiply-add (kernels/patch_embed3d.py's docstring)


def windowed_voxels(backend, device, volume, window, out_range):
    """A 1x1x1 patch with weight 1 outputs the windowed voxels themselves."""
    out = medvl.patch_embed3d(volume.to(device), torch.ones(1, 1, 1, 1, 1, device=device), patch_size=1,
                              window=window, out_range=out_range, backend=backend)
    return out.cpu().flatten()


def pytorch_window(volume, window, out_range):
    lo, hi = window
    return torch.clamp(((volume.float() - lo) / (hi - lo)) * (out_range[1] - out_range[0]) + out_range[0],
                       *out_range)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] not in GPU_BACKENDS])
def test_window_matches_pytorch_bit_for_bit(backend, device):
    # The cpu backend windows as PyTorch does, division included; bounds that fp32 can't hold.
    volume = torch.randint(-1100, 1500, (1, 1, 4, 8, 8), dtype=torch.int16)
    volume.view(-1)[:3] = torch.tensor([-1000, 400, 0], dtype=torch.int16)
    window, out_range = (-1000.3, 400.7), (-0.25, 1.75)
    out = windowed_voxels(backend, device, volume, window, out_range)
    assert torch.equal(out, pytorch_window(volume, window, out_range).flatten())


def window_tolerance(out_range):
    out_lo, out_hi = out_range
    return 2.0**-22 * max(abs(out_lo), abs(out_hi), out_hi - out_lo)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in GPU_BACKENDS])
def test_gpu_window_is_a_multiply_add_within_the_stated_tolerance(backend, device):
    # The GPU backends window with a multiply and an add (the slope precomputed): bit for bit
    # kernels.patch_embed3d.window_values, within 2^-22 max(|out_lo|, |out_hi|, span) of PyTorch's
    # division, and equal to it for power-of-two spans.
    from medvl.kernels.patch_embed3d import window_values

    volume = torch.randint(-1100, 1500, (1, 1, 4, 8, 8), dtype=torch.int16)
    volume.view(-1)[:3] = torch.tensor([-1000, 400, 0], dtype=torch.int16)
    for window, out_range in [((-1000.3, 400.7), (-0.25, 1.75)), ((-1000.0, 400.0), (0.0, 1.0))]:
        out = windowed_voxels(backend, device, volume, window, out_range)
        assert torch.equal(out, window_values(volume, (*window, *out_range)).flatten())
        error = (out - pytorch_window(volume, window, out_range).flatten()).abs().max().item()
        assert error <= window_tolerance(out_range), f"{window} -> {out_range}: {error:.3g}"
    exact = torch.linspace(-3, 3, 256).reshape(1, 1, 4, 8, 8)
    out = windowed_voxels(backend, device, exact, (-1.0, 1.0), (0.0, 1.0))
    assert torch.equal(out, pytorch_window(exact, (-1.0, 1.0), (0.0, 1.0)).flatten())


def test_stated_window_tolerance_holds_for_every_int16_value():
    # The claim of the kernels' docstring, on window_values (which the GPU kernels equal bit for bit),
    # over every int16 value: CT windows, bounds fp32 cannot hold, random windows.
    from medvl.kernels.patch_embed3d import window_values

    x = torch.arange(-32768, 32768, dtype=torch.int16)
    g = torch.Generator().manual_seed(0)
    windows = [((-1000.0, 400.0), (0.0, 1.0)), ((-1000.3, 400.7), (-0.25, 1.75)), ((-160.0, 240.0), (0.0, 1.0)),
               ((-1024.0, 3071.0), (-1.0, 1.0)), ((100.0, 3000.0), (0.0, 255.0))]
    for _ in range(40):
        lo = float(torch.randn(1, generator=g) * 1000)
        out_lo = float(torch.randn(1, generator=g))
        windows.append(((lo, lo + float(torch.rand(1, generator=g)) * 3000 + 1e-3),
                        (out_lo, out_lo + float(torch.rand(1, generator=g)) * 4 + 1e-3)))
    worst = 0.0
    for window, out_range in windows:
        error = (window_values(x, (*window, *out_range)) - pytorch_window(x, window, out_range)).abs().max()
        worst = max(worst, error.item() / window_tolerance(out_range))
        assert error.item() <= window_tolerance(out_range), f"{window} -> {out_range}: {error.item():.3g}"
    assert worst > 0.25, "the tolerance should be about tight (else the comparison has no teeth)"


@pytest.mark.parametrize("backend,device", backend_params())
def test_volume_gradient_is_zero_on_the_window_bounds(backend, device):
    # Float HU values exactly on a CT window's bounds get no gradient (PyTorch's rule, strictly inside),
    # those inside get the slope, on every backend (the GPU ones decide on lo < x < hi).
    volume = torch.tensor([-1100.0, -1000.0, -999.0, 0.0, 399.0, 400.0, 401.0, 250.5]).reshape(1, 1, 2, 2, 2)
    leaf = volume.to(device).requires_grad_()
    out = medvl.patch_embed3d(leaf, torch.ones(1, 1, 1, 1, 1, device=device), patch_size=1, window=(-1000, 400),
                              backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    slope = 1 / 1400
    expected = torch.tensor([0, 0, slope, slope, slope, 0, 0, slope], dtype=torch.float64)
    torch.testing.assert_close(grad.cpu().double().flatten(), expected, rtol=1e-6, atol=0)


def test_nan_in_the_volume_reaches_only_its_token():
    volume = torch.zeros(1, 1, 4, 4, 4)
    volume[0, 0, 3, 3, 3] = float("nan")
    out = medvl.patch_embed3d(volume, torch.ones(3, 1, 2, 2, 2), patch_size=2, window=(-1.0, 1.0))
    assert out[0, -1].isnan().all() and not out[0, :-1].isnan().any()


def test_results_do_not_depend_on_the_thread_count():
    volume = make_volume(torch.int16, (2, 1, 16, 32, 32))
    weight, bias, pos = make_params(1, (4, 8, 8), 70, tokens_of((16, 32, 32), (4, 8, 8)))
    grad_out = torch.randn(2, tokens_of((16, 32, 32), (4, 8, 8)), 70)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            w = weight.clone().requires_grad_()
            out = medvl.patch_embed3d(volume, w, bias, pos, patch_size=(4, 8, 8), window=(-1000, 400), backend="cpu")
            results.append((out, torch.autograd.grad(out, w, grad_out)[0]))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


_ISA_SCRIPT = """
import json, torch, medvl
from medvl.reference.patch_embed3d import patch_embed3d as reference
torch.manual_seed(0)
volume = torch.randn(2, 3, 7, 9, 10, dtype=torch.float64).float().requires_grad_()
weight = torch.randn(37, 3, 2, 4, 3).requires_grad_()
out = medvl.patch_embed3d(volume, weight, patch_size=(2, 4, 3), window=(-1, 1), pad=True, backend="cpu")
g = torch.randn(out.shape)
grads = torch.autograd.grad(out, [volume, weight], g)
rv, rw = volume.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
ref = reference(rv, rw, patch_size=(2, 4, 3), window=(-1, 1), pad=True)
ref_grads = torch.autograd.grad(ref, [rv, rw], g.double())
worst = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip([out, *grads], [ref, *ref_grads]))
print(json.dumps({"worst": worst}))
"""


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_fallback_instruction_sets_match_reference(isa):
    worst = run_script(_ISA_SCRIPT, env={"MEDVL_CPU_ISA": isa})["worst"]
    assert worst < 1e-5, f"{isa} micro-kernel: worst relative error {worst:.3g}"


_PEAK_SCRIPT = r"""
import json, sys, torch, medvl
from medvl.bench import peak_memory
torch.set_num_threads(2)
backend = sys.argv[1]
volume = torch.randint(-1024, 2000, (2, 1, 128, 128, 128), dtype=torch.int16)
weight = (torch.randn(96, 1, 16, 16, 16) * 0.02).requires_grad_()
pos = torch.zeros(1, 512, 96, requires_grad=True)
def step():
    out = medvl.patch_embed3d(volume, weight, None, pos, patch_size=16, window=(-1000, 400), backend=backend)
    out.backward(torch.ones_like(out))
    weight.grad = pos.grad = None
step()  # warm up code paths and thread pools
with peak_memory(torch.device("cpu")) as peak:
    step()
print(json.dumps({"peak_growth_mib": peak["mib"]}))
"""


def test_cpu_backend_stores_no_windowed_copy_and_no_im2col():
    def growth(backend):
        return run_script(_PEAK_SCRIPT, backend)["peak_growth_mib"]

    float_copy_mib = 2 * 128**3 * 4 / 2**20  # the windowed volume in float32: 16 MiB
    fused = growth("cpu")
    assert fused < float_copy_mib / 2, f"cpu backend grew the peak by {fused:.1f} MiB (a float copy is 16 MiB)"
    # The probe has teeth: the reference windows into a float copy before its conv.
    reference_growth = growth("reference")
    assert reference_growth > float_copy_mib, f"reference grew only {reference_growth:.1f} MiB; the probe is broken"


def test_float64_runs_on_the_reference_and_passes_gradcheck():
    volume = torch.randn(1, 2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def f(v, w, b, p):
        return medvl.patch_embed3d(v, w, b, p, patch_size=(2, 3, 2), window=(-0.5, 0.5), pad=True)

    assert torch.autograd.gradcheck(f, (volume, weight, bias, pos))


# ---------------------------------------------------------------------------------------------
# Errors name the argument and the fix.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(volume=torch.zeros(1, 2, 4, 4, 4)), ValueError, "1 input channels but the volume has 2"),
    (dict(volume=torch.zeros(1, 1, 2, 4, 4)), ValueError, "larger than the volume"),
    (dict(volume=torch.zeros(1, 1, 5, 4, 4)), ValueError, "pad=True"),
    (dict(volume=torch.zeros(1, 4, 4, 4)), ValueError, "5-D"),
    (dict(volume=torch.zeros(0, 1, 4, 4, 4)), ValueError, "empty batch"),
    (dict(volume=torch.zeros(1, 1, 4, 4, 4, dtype=torch.int32)), TypeError, "volume dtype"),
    (dict(window=(400, -1000)), ValueError, "lo < hi"),
    (dict(window=(0, float("nan"))), ValueError, "window"),
    (dict(window=(0, 1), out_range=(1, 1)), ValueError, "out_range"),
    (dict(patch_size=(4, 4)), ValueError, "patch_size"),
    (dict(patch_size=(2, 4, 4)), ValueError, "differs from patch_size"),
    (dict(pos_embed=torch.zeros(3, 8)), ValueError, "pos_embed must have shape"),
    (dict(bias=torch.zeros(9)), ValueError, "bias must have shape"),
    (dict(weight=torch.zeros(8, 1, 4, 4, 4, dtype=torch.int64)), TypeError, "weight must be floating point"),
    (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_input_raises_a_clear_error(kwargs, error, match):
    args = dict(volume=torch.zeros(1, 1, 4, 4, 4), weight=torch.zeros(8, 1, 4, 4, 4), bias=None, pos_embed=None,
                patch_size=4)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        medvl.patch_embed3d(args.pop("volume"), args.pop("weight"), args.pop("bias"), args.pop("pos_embed"), **args)


def test_forced_backend_that_cannot_run_lists_its_reasons():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(medvl.BackendUnavailable, match="cuda"):
        medvl.patch_embed3d(torch.zeros(1, 1, 4, 4, 4), torch.zeros(8, 1, 4, 4, 4), patch_size=4, backend="cuda")


# ---------------------------------------------------------------------------------------------
# torch.library and torch.compile.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in available_backends() if not (p[0] == "triton" and p[1] == "cpu")])
def test_opcheck(backend, device):
    volume = make_volume(torch.float32, (2, 1, 4, 6, 5)).to(device).requires_grad_()
    weight, bias, pos = (t.to(device) for t in make_params(1, (2, 3, 2), 5, tokens_of((4, 6, 5), (2, 3, 2))))
    args = (volume, weight.requires_grad_(), bias.requires_grad_(), pos[0].requires_grad_(), [2, 3, 2],
            [-1.0, 1.0, 0.0, 1.0], torch.float32, backend)
    torch.library.opcheck(torch.ops.medvl.patch_embed3d.default, args)
    grad_out = torch.randn(2, tokens_of((4, 6, 5), (2, 3, 2)), 5, device=device)
    backward_args = (grad_out, volume.detach(), weight.detach(), [2, 3, 2], [-1.0, 1.0, 0.0, 1.0], True, True, backend)
    torch.library.opcheck(torch.ops.medvl.patch_embed3d_backward.default, backward_args)


def test_torch_compile_fullgraph_forward_and_backward():
    embed = medvl.nn.PatchEmbed3d(1, 12, img_size=(8, 8, 8), patch_size=4, window=(-1000, 400))
    volume = make_volume(torch.int16, (2, 1, 8, 8, 8))

    def step(v):
        return embed(v).square().mean()

    eager = step(volume)
    eager_grads = torch.autograd.grad(eager, list(embed.parameters()))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(volume)
    compiled_grads = torch.autograd.grad(compiled, list(embed.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [p[0] for p in available_backends() if p[1] == "cuda"])
def test_torch_compile_inductor_on_gpu(backend):
    embed = medvl.nn.PatchEmbed3d(1, 64, img_size=(32, 32, 32), patch_size=8, window=(-1000, 400)).cuda()
    volume = make_volume(torch.int16, (2, 1, 32, 32, 32)).cuda()

    def step(v):
        return embed(v, backend=backend).square().mean()

    eager = step(volume)
    eager_grads = torch.autograd.grad(eager, list(embed.parameters()))
    compiled = torch.compile(step, fullgraph=True)(volume)
    compiled_grads = torch.autograd.grad(compiled, list(embed.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", [b for b, device in available_backends() if device == "cpu" and b != "triton"])
def test_autocast_projects_in_its_dtype_and_never_casts_the_volume(backend):
    """Under autocast the fp32 weight is used in bf16 (as Conv3d's would be), the output is bf16, and the
    gradient reaches the fp32 weight; a float HU volume is windowed from its exact values."""
    volume = 100 + make_volume(torch.float32, (2, 1, 8, 8, 8)) + 1
    volume[0, 0, :4, :4, :4] = 100.7  # 100.5 in bf16: windowed 0.5 instead of 0.7 if the volume were cast
    weight = (torch.randn(12, 1, 4, 4, 4) * 0.1).requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    kwargs = dict(patch_size=4, window=(100, 101), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = medvl.patch_embed3d(volume, weight, bias, **kwargs)
    assert out.dtype == torch.bfloat16
    expected = medvl.patch_embed3d(volume, weight.detach().bfloat16(), bias.detach(), **kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    rounded_volume = medvl.patch_embed3d(volume.bfloat16(), weight.detach().bfloat16(), bias.detach(), **kwargs)
    assert not torch.equal(out[0, 0], rounded_volume[0, 0])
    out.float().square().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0
    # Outside autocast nothing changes.
    assert medvl.patch_embed3d(volume, weight, bias, **kwargs).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------


def test_module_position_embeddings():
    learnable = medvl.nn.PatchEmbed3d(1, 12, img_size=(8, 8, 16), patch_size=(4, 4, 8), window=(-1000, 400))
    assert isinstance(learnable.pos_embed, torch.nn.Parameter) and learnable.pos_embed.shape == (1, 8, 12)
    sincos = medvl.nn.PatchEmbed3d(1, 12, img_size=(8, 8, 16), patch_size=(4, 4, 8), pos_embed="sincos")
    assert not sincos.pos_embed.requires_grad and "pos_embed" in dict(sincos.named_buffers())
    # sin^2 + cos^2 = 1 for each of the 6 (axis, frequency) pairs: 2 per token at E = 12.
    torch.testing.assert_close(sincos.pos_embed.square().sum(-1), torch.full((1, 8), 6.0))
    assert medvl.nn.PatchEmbed3d(1, 12, 8, 4, pos_embed=None).pos_embed is None
    with pytest.raises(ValueError, match="pos_embed must be one of"):
        medvl.nn.PatchEmbed3d(1, 12, 8, 4, pos_embed="fourier")
    with pytest.raises(ValueError, match="divisible by 6"):
        medvl.nn.PatchEmbed3d(1, 10, 8, 4, pos_embed="sincos")
    with pytest.raises(ValueError, match="pad=True"):
        medvl.nn.PatchEmbed3d(1, 12, 10, 4)


def test_module_adds_the_table_it_is_given():
    """A table passed to the forward (the encoder's, resampled for another grid) replaces the module's own."""
    torch.manual_seed(0)
    embed = medvl.nn.PatchEmbed3d(1, 12, img_size=(8, 8, 16), patch_size=(4, 4, 8), window=(-1000, 400))
    volume = torch.randint(-1024, 2000, (2, 1, 12, 8, 16), dtype=torch.int16)
    table = torch.randn(12, 12, requires_grad=True)
    out = embed(volume, pos_embed=table)
    expected = medvl.patch_embed3d(volume, embed.weight, embed.bias, table, patch_size=(4, 4, 8), window=(-1000, 400))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert embed.pos_embed.grad is None and torch.equal(table.grad, torch.full((12, 12), 2.0))


def test_from_monai_rejects_a_block_without_a_conv():
    # A proj_type="perceptron" block holds a Linear (MONAI builds it with einops, not installed here).
    block = torch.nn.Module()
    block.patch_embeddings = torch.nn.Sequential(torch.nn.Linear(64, 8))
    block.position_embeddings = torch.nn.Parameter(torch.zeros(1, 8, 8))
    with pytest.raises(TypeError, match="proj_type='conv'"):
        medvl.nn.PatchEmbed3d.from_monai(block)


def test_reference_window_gradient_does_not_follow_torch_clamp(monkeypatch):
    # torch.clamp's gradient on a bound changed from 1 to 0 (pytorch/pytorch#191142); the GPU check
    # ran a torch that passed it, and the reference then disagreed with every kernel at the window's
    # edges. The reference pins the rule (strictly inside only); an inclusive clamp must not move it.
    class InclusiveClamp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lo, hi):
            ctx.save_for_backward(x)
            ctx.bounds = (lo, hi)
            return x.clamp(lo, hi)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            lo, hi = ctx.bounds
            return grad * ((x >= lo) & (x <= hi)), None, None

    volume = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5], dtype=torch.float64).reshape(1, 1, 1, 1, 5)
    weight = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    monkeypatch.setattr(torch, "clamp", lambda x, lo, hi: InclusiveClamp.apply(x, lo, hi))
    leaf = volume.clone().requires_grad_()
    (grad,) = torch.autograd.grad(reference(leaf, weight, patch_size=(1, 1, 1), window=(-1.0, 1.0)).sum(), leaf)
    assert grad.flatten().tolist() == [0.0, 0.5, 0.5, 0.0, 0.0]


def test_a_weight_without_output_channels_is_refused():
    with pytest.raises(ValueError, match="no output channels.*embed_dim >= 1"):
        medvl.patch_embed3d(torch.zeros(1, 1, 4, 4, 4), torch.zeros(0, 1, 2, 2, 2), patch_size=2)


@pytest.mark.parametrize("size,patch,dtype,expected_vec", [
    ((8, 12, 32), (2, 3, 16), torch.int16, 8), ((8, 12, 40), (2, 3, 16), torch.int16, 8),
    ((4, 4, 24), (2, 2, 8), torch.uint8, 8), ((4, 4, 20), (2, 2, 4), torch.float32, 4),
    ((4, 4, 20), (2, 2, 16), torch.bfloat16, 4), ((5, 9, 7), (2, 4, 3), torch.int16, 1)])
def test_vector_gathers_read_aligned_contiguous_runs(size, patch, dtype, expected_vec):
    # What the Triton kernels promise the compiler (_voxel_tile's hints) whenever the host picks a vector
    # width: in the patch matrix (tokens x columns, Conv3d's order, padding included), every aligned run
    # of VEC columns is VEC consecutive voxel addresses starting at a multiple of VEC, or all padding.
    from medvl.kernels.patch_embed3d import _geometry, _vector_width

    volume = torch.zeros(2, 3, *size, dtype=dtype)
    grid = [-(-s // p) for s, p in zip(size, patch)]
    vec = _vector_width(volume, _geometry(volume, patch, grid), 32)
    assert vec == expected_vec
    address = torch.arange(volume.numel()).reshape(volume.shape)
    extra = [n * p - s for n, p, s in zip(grid, patch, size)]
    address = torch.nn.functional.pad(address, (0, extra[2], 0, extra[1], 0, extra[0]), value=-1)
    patches = address.reshape(2, 3, grid[0], patch[0], grid[1], patch[1], grid[2], patch[2])
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, 3 * math.prod(patch))
    runs = patches.reshape(patches.shape[0], -1, vec)
    inside = runs >= 0
    assert (inside == inside[..., :1]).all(), "a run straddles the volume's edge"
    voxels = runs[inside[..., 0]]
    assert (voxels[:, 0] % vec == 0).all() and (voxels - voxels[:, :1] == torch.arange(vec)).all()


# ---------------------------------------------------------------------------------------------
# The CUDA kernels, emulated on the host for fp32 weights: csrc/patch_embed3d/patch_embed3d_tile.cuh is
# the kernels' code; patch_embed3d_emulation.cpp runs their phases thread by thread.
# ---------------------------------------------------------------------------------------------

VOLUME_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int16: 3, torch.uint8: 4,
                torch.uint16: 5}


@pytest.fixture(scope="module")
def cuda_emulation(tmp_path_factory):
    import os
    import shutil
    import subprocess

    from tests.utils import REPO_ROOT

    compiler = shutil.which("g++") or shutil.which("c++")
    cuda_include = next((d for d in (os.environ.get("CUDA_HOME", "") + "/include", "/usr/local/cuda/include")
                         if os.path.exists(f"{d}/cuda_fp16.h")), None)
    if compiler is None or cuda_include is None:
        pytest.skip("the host emulation needs a C++ compiler and the CUDA headers")
    binary = tmp_path_factory.mktemp("emulation") / "patch_embed3d_emulation"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
                    f"-I{REPO_ROOT}/csrc", f"-I{cuda_include}",
                    f"{REPO_ROOT}/csrc/patch_embed3d/patch_embed3d_emulation.cpp", "-o", str(binary)], check=True)

    def run(pass_, volume, weight, bias=None, pos=None, window=None, grad_out=None, force_scalar=False):
        import numpy

        folder = binary.parent
        B, C, *size = volume.shape
        patch = weight.shape[2:]
        E = weight.shape[0]
        # window: (lo, hi) onto (0, 1), or (lo, hi, out_lo, out_hi)
        lo, hi, out_lo, out_hi = ((*window, 0.0, 1.0) if len(window) == 2 else window) if window else (0, 1, 0, 1)
        header = torch.tensor([pass_, VOLUME_CODES[volume.dtype], B, C, *size, *patch, E, window is not None,
                               bias is not None, pos is not None, force_scalar, 0], dtype=torch.int64)
        with open(folder / "in.bin", "wb") as f:
            f.write(header.numpy().tobytes())
            f.write(torch.tensor([lo, hi, out_lo, out_hi], dtype=torch.float64).numpy().tobytes())
            f.write(volume.contiguous().view(torch.uint8).numpy().tobytes())
            for t in (weight.reshape(E, -1), bias, pos, grad_out):
                if t is not None:
                    f.write(t.float().contiguous().numpy().tobytes())
        report = subprocess.run([str(binary), str(folder / "in.bin"), str(folder / "out.bin")], check=True,
                                capture_output=True, text=True).stdout
        raw = torch.from_numpy(numpy.fromfile(folder / "out.bin", dtype=numpy.uint8))
        out = raw.view(volume.dtype).reshape(volume.shape) if pass_ == 2 else raw.view(torch.float32)
        return out, "vec_gather=1" in report

    return run


EMULATION_CASES = [  # (size, patch, vector gathers for 2-byte voxels)
    ((8, 12, 32), (2, 3, 16), True),     # runs of 8 (16-bit), 16 (uint8), 4 (fp32)
    ((9, 12, 40), (4, 3, 16), True),     # padding on every axis; uint8 falls back to scalar (40 % 16)
    ((5, 9, 7), (2, 4, 3), False),       # scalar gathers
]


@pytest.mark.parametrize("volume_dtype", list(VOLUME_CODES))
@pytest.mark.parametrize("size,patch,vectors", EMULATION_CASES)
def test_cuda_kernels_in_host_emulation_match_the_reference(cuda_emulation, volume_dtype, size, patch, vectors):
    for window in (WINDOWS.get(volume_dtype, (-1.0, 1.0)), None):
        check_emulated_cuda_kernels(cuda_emulation, volume_dtype, size, patch, vectors, window)


def check_emulated_cuda_kernels(cuda_emulation, volume_dtype, size, patch, vectors, window):
    channels, embed = 2, 40
    volume = make_volume(volume_dtype, (2, channels, *size), seed=3, small=window is None)
    tokens = tokens_of(size, patch)
    weight, bias, pos = make_params(channels, patch, embed, tokens, seed=4)
    grad_out = torch.randn(2 * tokens, embed, generator=torch.Generator().manual_seed(6))
    exact = volume.double().requires_grad_() if volume.is_floating_point() else volume.double()
    leaves = [weight.double().requires_grad_(), bias.double(), pos.double()]
    ref = reference(exact, *leaves, patch_size=patch, window=window, out_dtype=torch.float64, pad=True)
    wanted = [leaves[0]] + ([exact] if volume.is_floating_point() else [])
    ref_grads = torch.autograd.grad(ref, wanted, grad_out.double().reshape(ref.shape))
    name = f"emulated CUDA {volume_dtype} {size} patch {patch} window {window}"

    out, vec = cuda_emulation(0, volume, weight, bias, pos[0], window)
    assert vec == (vectors and not (volume_dtype == torch.uint8 and size[2] % 16)), "vector gathers not as planned"
    assert_close(out.reshape(ref.shape), ref, torch.float32, "forward", name)
    gw, _ = cuda_emulation(1, volume, weight, window=window, grad_out=grad_out)
    assert_close(gw.reshape(weight.shape), ref_grads[0], torch.float32, "backward", f"{name} grad weight")
    outputs = [out, gw]
    if volume.is_floating_point():
        gv, _ = cuda_emulation(2, volume, weight, window=window, grad_out=grad_out)
        assert gv.dtype == volume_dtype
        assert_close(gv, ref_grads[1], volume_dtype if volume_dtype != torch.float32 else torch.float32, "backward",
                     f"{name} grad volume", plain=ref_grads[1].to(volume_dtype) if volume_dtype != torch.float32
                     else None)
        outputs.append(gv)
    if vec:  # the vector path gives the scalar path's bits
        scalar = [cuda_emulation(0, volume, weight, bias, pos[0], window, force_scalar=True)[0],
                  cuda_emulation(1, volume, weight, window=window, grad_out=grad_out, force_scalar=True)[0]]
        if volume.is_floating_point():
            scalar.append(cuda_emulation(2, volume, weight, window=window, grad_out=grad_out, force_scalar=True)[0])
        for got, want in zip(outputs, scalar):
            assert torch.equal(got, want), f"{name}: vector and scalar gathers differ"


@pytest.mark.parametrize("volume_dtype", [torch.int16, torch.float32])
def test_cuda_window_in_host_emulation_is_the_triton_window_bit_for_bit(cuda_emulation, volume_dtype):
    # Patches of 8 voxels along the last axis and an identity weight: each token's output is its 8
    # windowed voxels (vector gathers), which must be kernels.patch_embed3d.window_values exactly.
    from medvl.kernels.patch_embed3d import window_values

    volume = make_volume(volume_dtype, (1, 1, 4, 6, 16), seed=2)
    if volume_dtype == torch.int16:
        volume.view(-1)[:3] = torch.tensor([-1000, 400, 0], dtype=torch.int16)
    for window, out_range in [((-1000.3, 400.7), (-0.25, 1.75)), ((-1000.0, 400.0), (0.0, 1.0)),
                              ((-1.0, 1.0), (0.0, 1.0))]:
        weight = torch.eye(8).reshape(8, 1, 1, 1, 8)
        out, vec = cuda_emulation(0, volume, weight, window=(*window, *out_range))
        assert vec
        assert torch.equal(out, window_values(volume, (*window, *out_range)).flatten())
