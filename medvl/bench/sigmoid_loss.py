"""medvl bench: the sigmoid loss (forward + backward) against open_clip, siglip-kernel and the reference."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from medvl.bench.harness import BENCH_LABELS, Measurement, measure, with_environment

def sigmoid_loss_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> loss function(image, text, scale, bias) for every method runnable here."""
    from medvl.ops import sigmoid_loss
    from medvl.ops.sigmoid_loss import BACKENDS
    from medvl.reference.sigmoid_loss import sigmoid_loss as reference_loss

    methods: Dict[str, Callable] = {}
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(torch.empty(1, 1, device=device), torch.empty(1, 1, device=device)):
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is a test tool, not a benchmark
            methods[f"medvl-{name}"] = lambda x, t, s, b, name=name: sigmoid_loss(x, t, s, b, backend=name)
            if name == "triton":  # the other strategy of the Triton backend (the default is chunked)
                methods["medvl-triton-fused"] = with_environment(
                    {"MEDVL_SIGMOID_STRATEGY": "fused"}, lambda x, t, s, b: sigmoid_loss(x, t, s, b, backend="triton"))
    methods["reference"] = reference_loss
    try:
        from open_clip.loss import SigLipLoss

        methods["open_clip"] = SigLipLoss()
    except ImportError:
        pass
    if device.type == "cuda":
        methods["reference-compiled"] = torch.compile(reference_loss)
        try:  # siglip-kernel (PyPI): a fused Triton SigLIP loss, pair targets only; its scale is exp(log_t)
            from siglip_kernel import fused_siglip_loss

            methods["siglip-kernel"] = lambda x, t, s, b: fused_siglip_loss(x, t, torch.log(s), b)
        except ImportError:
            pass
    return methods


def bench_sigmoid_loss(n: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int,
                       methods: Optional[List[str]] = None, n_text: Optional[int] = None,
                       target: str = "pair") -> List[Measurement]:
    """Forward + backward of every method at B_img = n against B_txt = n_text (default n). Targets
    other than "pair" (class labels, Jaccard of multi-hot labels) run on medvl's backends only."""
    from medvl.ops import sigmoid_loss

    n_text = n if n_text is None else n_text
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device, dtype).requires_grad_()
    t = F.normalize(torch.randn(n_text, dim, generator=generator), dim=-1).to(device, dtype).requires_grad_()
    s = torch.tensor(10.0, device=device, requires_grad=True)
    b = torch.tensor(-10.0, device=device, requires_grad=True)
    labels = {}
    if target == "label":
        labels = {"image_labels": torch.randint(0, 64, (n,), generator=generator).to(device),
                  "text_labels": torch.randint(0, 64, (n_text,), generator=generator).to(device)}
    elif target == "jaccard":
        labels = {"image_labels": (torch.rand(n, 40, generator=generator) < 0.08).to(device),
                  "text_labels": (torch.rand(n_text, 40, generator=generator) < 0.08).to(device)}
    flops = 6.0 * n * n_text * dim  # logits, and the two gradient products
    shape = f"B={n}" if n_text == n else f"B_img={n} B_txt={n_text}"
    shape += f" D={dim} {str(dtype)[6:]}" + ("" if target == "pair" else f" target={target}")
    results = []
    for name, loss_fn in sigmoid_loss_methods(device).items():
        if methods and name not in methods:
            continue
        if n_text != n and not (name.startswith("medvl-") or name.startswith("reference")):
            continue  # open_clip and siglip-kernel take paired (square) batches only
        if target != "pair":
            if not name.startswith("medvl-"):
                continue
            backend = name.removeprefix("medvl-").removesuffix("-fused")
            loss_fn = lambda x, t, s, b, backend=backend: sigmoid_loss(  # noqa: E731
                x, t, s, b, target=target, backend=backend, **labels)
            if name.endswith("-fused"):
                loss_fn = with_environment({"MEDVL_SIGMOID_STRATEGY": "fused"}, loss_fn)

        def step(loss_fn=loss_fn):
            for v in (x, t, s, b):
                v.grad = None
            loss_fn(x, t, s, b).backward()

        results.append(measure(BENCH_LABELS["sigmoid_loss"], shape, name, step, device, repeats, flops))
    return results


