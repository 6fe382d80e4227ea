"""medvl/ops/_dispatch.py: the automatic backend order, its measured table, and torch.compile."""

from __future__ import annotations

import logging

import pytest
import torch

import medvl
from medvl.ops import _core, _dispatch

OPS = ("sigmoid_loss", "triplet_mining", "patch_embed3d")


def forget_facts():
    _core._DEVICE_FACTS.clear()
    _core._KERNEL_MODULE_PROBLEMS.clear()
    _core.cuda_core_state.cache_clear()
    _dispatch._logged_fallbacks.clear()
    _dispatch._logged_unmeasured.clear()


def test_backend_facts_are_constants_under_torch_compile(monkeypatch):
    # On the H200, Dynamo traced the backend choice into medvl._C.cuda_device_count and stopped.
    # Every fact the choice reads must come out of torch.compile as a constant, found eagerly, even
    # when the first call ever is inside the compiled function. A pretend sm_90 device makes the
    # CUDA path run here: its facts call into medvl._C.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    forget_facts()
    try:
        def step(x):
            facts = _core.device_facts(torch.device("cuda", 0))
            order = _dispatch.automatic_order("sigmoid_loss", torch.device("cuda", 0))
            usable = facts.cuda_problem is None and _core.kernel_module_problem("triplet_mining") is None
            return x + len(order) + int(usable) + len(_core.cuda_backend_reasons(x, "sigmoid_loss_cuda"))

        out = torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(2))
        facts = _core.device_facts(torch.device("cuda", 0))
        assert facts.device_class == "sm_90"
        assert out.tolist() == [3.0 + int(facts.cuda_problem is None and
                                          _core.kernel_module_problem("triplet_mining") is None) + 1] * 2
    finally:
        forget_facts()


def test_an_automatic_fallback_is_logged_once_also_when_compiled(caplog):
    # float64 is not a fused dtype: the cpu backend declines, the reference runs, and says so once.
    forget_facts()
    x = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="medvl"):
        compiled = torch.compile(lambda a: medvl.sigmoid_loss(a, a, scale, bias), fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), medvl.sigmoid_loss(x, x, scale, bias))
    fallbacks = [r for r in caplog.records if "runs on the reference backend" in r.getMessage()]
    assert len(fallbacks) == 1 and "float64" in fallbacks[0].getMessage()


def test_gpu_order_is_the_measured_one():
    table = _dispatch._BACKEND_ORDER
    for device_class, measured in table["classes"].items():
        for op in OPS:
            entry = measured[op]
            assert sorted(entry["order"]) == ["cuda", "triton"], f"{device_class} {op}"
            medians = entry["median_ms"]
            assert entry["order"] == sorted(medians, key=medians.get), f"{device_class} {op}: not fastest first"
            assert _dispatch.gpu_order(op, device_class) == tuple(entry["order"])
    assert table["unmeasured"] in table["classes"]


def test_an_unmeasured_device_class_says_whose_order_it_takes(caplog):
    forget_facts()
    with caplog.at_level(logging.WARNING, logger="medvl"):
        order = _dispatch.gpu_order("patch_embed3d", "sm_75")
        _dispatch.gpu_order("patch_embed3d", "sm_75")
    fallback = _dispatch._BACKEND_ORDER["unmeasured"]
    assert order == tuple(_dispatch._BACKEND_ORDER["classes"][fallback]["patch_embed3d"]["order"])
    messages = [r.getMessage() for r in caplog.records if "no backend timings for sm_75" in r.getMessage()]
    assert len(messages) == 1 and fallback in messages[0]


def test_cpu_tensors_go_to_the_cpu_backend_then_the_reference():
    assert _dispatch.automatic_order("sigmoid_loss", torch.device("cpu")) == ("cpu", "reference")
    assert _dispatch.automatic_order("sigmoid_loss", torch.device("meta")) == ("reference",)


def test_compiled_entries_name_a_missing_or_unexpected_argument():
    # medvl._C takes its arguments by keyword, read in one place per op for the CPU and CUDA entries:
    # a name that Python gets wrong is an error that says which, never an argument silently left at 0.
    import pytest

    if _core._C is None:
        pytest.skip("medvl._C is not built")
    with pytest.raises(ValueError, match="sigmoid_loss_cpu: missing argument 'image'"):
        _core._C.sigmoid_loss_cpu(1)
    with pytest.raises(ValueError, match="triplet_mining_cpu: missing argument"):
        _core._C.triplet_mining_cpu(1, anchors=0)
    from medvl.ops.patch_embed3d import VOLUME_DTYPE_CODES

    volume, weight = torch.zeros(1, 1, 4, 4, 4), torch.zeros(3, 8)
    kwargs = dict(volume=volume.data_ptr(), volume_type=VOLUME_DTYPE_CODES[volume.dtype], shape=[1, 1, 4, 4, 4],
                  patch=[2, 2, 2], grid=[2, 2, 2], embed_dim=3, weight=weight.data_ptr(), weight_type=0, bias=0,
                  pos_embed=0, has_window=False, window=[0.0] * 6, out=0, out_type=0, grad_out=0, grad_out_type=0,
                  grad_weight=0, grad_volume=0, workspace=0, workspace_bytes=0)
    assert _core._C.patch_embed3d_cpu_workspace_bytes(0, 1, **kwargs) >= 0
    with pytest.raises(ValueError, match="patch_embed3d_cpu_workspace_bytes: unexpected argument 'windw'"):
        _core._C.patch_embed3d_cpu_workspace_bytes(0, 1, windw=1, **kwargs)
