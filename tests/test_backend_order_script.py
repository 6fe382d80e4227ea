"""bench/backend_order.py: a GPU run's medians become the automatic backend order of its device class."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

from medvl.bench import BENCH_LABELS, Measurement
from tests.utils import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "bench", "backend_order.py")
TABLE = os.path.join(REPO_ROOT, "medvl", "ops", "backend_order.json")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO_ROOT)


def test_a_gpu_run_rewrites_its_device_class_and_keeps_the_others(tmp_path):
    rows = []
    for shape, cuda_s, triton_s in (("B=4096", 0.002, 0.001), ("B=16384", 0.010, 0.004)):
        rows.append(Measurement(BENCH_LABELS["sigmoid_loss"], shape, "medvl-cuda", cuda_s, cuda_s, cuda_s, None, 1.0))
        rows.append(Measurement(BENCH_LABELS["sigmoid_loss"], shape, "medvl-triton", triton_s, triton_s, triton_s,
                                None, 1.0))
    # A shape measured for one backend only does not count; mining: cuda measured faster here.
    rows.append(Measurement(BENCH_LABELS["sigmoid_loss"], "B=65536", "medvl-triton", 9.0, 9.0, 9.0, None, 1.0))
    rows.append(Measurement(BENCH_LABELS["triplet_mining"], "B=8192", "medvl-cuda", 0.001, 0.001, 0.001, None, 1.0))
    rows.append(Measurement(BENCH_LABELS["triplet_mining"], "B=8192", "medvl-triton", 0.003, 0.003, 0.003, None, 1.0))
    rows.append(Measurement(BENCH_LABELS["triplet_mining"], "B=8192", "open_clip", 0.0001, 0.0001, 0.0001, None, 1.0))
    record = {"environment": {"device": "NVIDIA A100", "device_class": "sm_80", "git_sha": "abc1234",
                              "torch": "2.14.1", "triton": "3.8.0"}, "results": [asdict(r) for r in rows]}
    results = tmp_path / "a100.json"
    results.write_text(json.dumps([record]))
    table = tmp_path / "backend_order.json"
    shutil.copy(TABLE, table)
    before = json.loads(table.read_text())

    done = run(str(results), "--table", str(table))
    assert done.returncode == 0, done.stderr
    after = json.loads(table.read_text())
    sm80 = after["classes"]["sm_80"]
    assert sm80["sigmoid_loss"]["order"] == ["triton", "cuda"]
    assert sm80["sigmoid_loss"]["median_ms"] == {"cuda": 12.0, "triton": 5.0}
    assert sm80["triplet_mining"]["order"] == ["cuda", "triton"]
    assert "patch_embed3d" not in sm80 and "NVIDIA A100" in sm80["source"]
    assert after["classes"]["sm_90"] == before["classes"]["sm_90"]


def test_a_cpu_run_is_refused(tmp_path):
    results = tmp_path / "cpu.json"
    results.write_text(json.dumps([{"environment": {"device": "Xeon"}, "results": []}]))
    done = run(str(results), "--table", str(tmp_path / "unused.json"))
    assert done.returncode == 1 and "device_class" in done.stderr
