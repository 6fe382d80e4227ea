"""localization of report snippets along Z, against its three baselines."""

import numpy as np
import pytest

from medvl.eval.tasks.localization import localization_task


def test_localization_against_baselines(ct):
    encoder, data = ct
    result = localization_task(encoder, data, seed=0)
    # One depth bin per patch row along Z; phantom slices are 5 mm thick (vit3d-tiny: patch_z 8, two bins).
    patch_z = encoder.patch_size[2]
    n_bins = data.size[2] // patch_z
    assert result["patch_z"] == patch_z and result["n_bins"] == n_bins
    assert result["bin_mm"] == pytest.approx(5.0 * patch_z)
    targets = [min(s["depth_index"] // patch_z, n_bins - 1) for m in data.metas for s in m["snippets"]]
    assert result["n_snippets"] == len(targets) > 0
    assert set(result["baselines"]) == {"middle", "random", "finding_mean"}
    for metrics in [result["model"], *result["baselines"].values()]:
        assert metrics["n"] == len(targets) and 0 <= metrics["mae_mm"] <= (n_bins - 1) * result["bin_mm"]
        assert 0 <= metrics["within_one_bin"] <= 1
    middle = (n_bins - 1) // 2
    expected = np.mean([abs(t - middle) for t in targets]) * result["bin_mm"]
    assert result["baselines"]["middle"]["mae_mm"] == pytest.approx(expected)
    by_depth = result["data"]["by_depth"]
    assert sum(v["n"] for v in by_depth.values()) == len(targets)
    assert set(next(iter(by_depth.values()))) == {"n", "model", "middle", "random", "finding_mean"}


def test_localization_refuses_mr(mr):
    with pytest.raises(ValueError, match=r"task 'localization' applies to CT data"):
        localization_task(*mr)
