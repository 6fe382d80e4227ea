"""medvl bench: the 3D patch embedding (forward + backward) against window + Conv3d (MONAI) and window + reshape + linear."""

from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Optional

import torch

from medvl.bench.harness import BENCH_LABELS, Measurement, measure, time_call
from medvl.data.transforms import CT_WINDOW

# ---------------------------------------------------------------------------------------------
# patch_embed3d
# ---------------------------------------------------------------------------------------------

def patch_embed3d_cases(device: torch.device):
    """(batch, size, patch, embed, volume dtype, parameter dtype) of the issue's benchmark shapes."""
    if device.type == "cuda":
        return [(8, (160, 224, 224), patch, 768, volume_dtype, torch.bfloat16)
                for patch in ((16, 16, 16), (4, 16, 16)) for volume_dtype in (torch.int16, torch.bfloat16)]
    return [(2, (128, 128, 128), (16, 16, 16), 768, torch.int16, torch.float32)]


def patch_embed3d_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> make(volume, weight, bias, pos, patch) -> step() running forward + backward (parameter grads)."""
    from medvl.ops import patch_embed3d
    import torch.nn.functional as F
    from medvl.ops.patch_embed3d import BACKENDS

    def fused(name):
        def make(volume, weight, bias, pos, patch):
            def step():
                out = patch_embed3d(volume, weight, bias, pos, patch_size=patch, window=CT_WINDOW, backend=name)
                out.backward(torch.ones_like(out))
            return step
        return make

    def window(volume, dtype):
        lo, hi = CT_WINDOW
        return ((volume.float() - lo) / (hi - lo)).clamp(0.0, 1.0).to(dtype)

    def reshape_linear(volume, weight, bias, pos, patch):
        b, c, (s0, s1, s2), (p0, p1, p2) = volume.shape[0], volume.shape[1], volume.shape[2:], patch

        def step():
            x = window(volume, weight.dtype).reshape(b, c, s0 // p0, p0, s1 // p1, p1, s2 // p2, p2)
            x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * p0 * p1 * p2)
            out = F.linear(x, weight.reshape(weight.shape[0], -1), bias) + pos
            out.backward(torch.ones_like(out))
        return step

    def monai_conv(volume, weight, bias, pos, patch):
        from monai.networks.blocks import PatchEmbeddingBlock
        from monai.transforms import ScaleIntensityRange

        block = PatchEmbeddingBlock(in_channels=volume.shape[1], img_size=tuple(volume.shape[2:]), patch_size=patch,
                                    hidden_size=weight.shape[0], num_heads=12, proj_type="conv",
                                    pos_embed_type="learnable").to(device, weight.dtype)
        scale = ScaleIntensityRange(a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)

        def step():
            x = torch.as_tensor(scale(volume.float())).to(weight.dtype)
            out = block(x)
            out.backward(torch.ones_like(out))
            block.zero_grad(set_to_none=True)
        return step

    methods: Dict[str, Callable] = {}
    probe_volume = torch.empty(1, 1, 1, 1, 1, dtype=torch.int16, device=device)
    probe_weight = torch.empty(1, device=device)
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(probe_volume, probe_weight) and not (name == "triton" and device.type == "cpu"):
            methods[f"medvl-{name}"] = fused(name)
    try:
        import monai  # noqa: F401

        methods["monai-conv"] = monai_conv
    except ImportError:
        pass
    methods["reshape-linear"] = reshape_linear
    return methods


def patch_embed3d_gemm_seconds(tokens: int, columns: int, embed: int, dtype: torch.dtype, device: torch.device,
                               repeats: int) -> float:
    """Time of the op's two GEMMs (forward and weight gradient) with torch's matmul: the limit."""
    patches = torch.randn(tokens, columns, device=device, dtype=dtype)
    weight = torch.randn(embed, columns, device=device, dtype=dtype)
    grad_out = torch.randn(tokens, embed, device=device, dtype=dtype)
    times = time_call(lambda: (patches @ weight.T, grad_out.T @ patches), device, repeats)
    return statistics.median(times)


def patch_embed3d_inputs(case, device: torch.device) -> Dict[str, object]:
    """The volume and parameters of one benchmark case (parameters require grad)."""
    batch, size, patch, embed, volume_dtype, dtype = case
    generator = torch.Generator(device="cpu").manual_seed(0)
    if volume_dtype.is_floating_point:
        volume = (torch.rand((batch, 1, *size), generator=generator) * 3000 - 1024).to(device, volume_dtype)
    else:
        volume = torch.randint(-1024, 2000, (batch, 1, *size), generator=generator, dtype=torch.int16).to(device)
    tokens, columns = math.prod(s // p for s, p in zip(size, patch)), math.prod(patch)
    return {
        "volume": volume, "patch": patch, "tokens": batch * tokens, "columns": columns, "embed": embed,
        "weight": (torch.randn(embed, 1, *patch, generator=generator) * 0.02).to(device, dtype).requires_grad_(),
        "bias": torch.zeros(embed, device=device, dtype=dtype, requires_grad=True),
        "pos": (torch.randn(1, tokens, embed, generator=generator) * 0.02).to(device, dtype).requires_grad_(),
        "flops": 2 * 2.0 * batch * tokens * columns * embed,
        "shape": f"B={batch} {size[0]}x{size[1]}x{size[2]} {str(volume_dtype)[6:]} "
                 f"p={patch[0]}x{patch[1]}x{patch[2]} E={embed}",
    }


def patch_embed3d_step(make: Callable, inputs: Dict[str, object]) -> Callable[[], None]:
    """One forward + backward of a method; gradients are dropped first so that every method allocates them."""
    inner = make(inputs["volume"], inputs["weight"], inputs["bias"], inputs["pos"], inputs["patch"])
    params = [inputs["weight"], inputs["bias"], inputs["pos"]]

    def step():
        for p in params:
            p.grad = None
        inner()
    return step


def bench_patch_embed3d(case, device: torch.device, repeats: int, methods: Optional[List[str]] = None
                        ) -> List[Measurement]:
    inputs = patch_embed3d_inputs(case, device)
    volume = inputs["volume"]
    limit = patch_embed3d_gemm_seconds(inputs["tokens"], inputs["columns"], inputs["embed"], inputs["weight"].dtype,
                                       device, repeats)
    results = []
    for name, make in patch_embed3d_methods(device).items():
        if methods and name not in methods:
            continue
        m = measure(BENCH_LABELS["patch_embed3d"], inputs["shape"], name, patch_embed3d_step(make, inputs), device, repeats,
                    inputs["flops"])
        m.extra["limit_s"] = limit
        m.extra["volume_gbps"] = volume.numel() * volume.element_size() / m.median_s / 1e9
        results.append(m)
    return results


