"""medvl/bench/sigmoid_loss.py: the sigmoid cases beyond square pair batches (ring step, label and Jaccard targets)."""

from __future__ import annotations

import torch

from medvl.bench.sigmoid_loss import bench_sigmoid_loss


def test_sigmoid_bench_takes_uneven_batches_and_targets():
    cpu = torch.device("cpu")
    ring = bench_sigmoid_loss(24, 8, torch.float32, cpu, 1, n_text=40)
    assert {m.shape for m in ring} == {"B_img=24 B_txt=40 D=8 float32"}
    assert all(m.flops == 6.0 * 24 * 40 * 8 for m in ring)
    assert {m.method for m in ring} == {"medvl-cpu", "reference"}  # the peers take square batches only
    for target in ("label", "jaccard"):
        rows = bench_sigmoid_loss(24, 8, torch.float32, cpu, 1, target=target)
        # Only medvl takes labels: the peers' rows would time a different loss.
        assert rows and all(m.method.startswith("medvl-") for m in rows)
        assert all(m.shape.endswith(f"target={target}") for m in rows)
