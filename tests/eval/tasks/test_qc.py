"""qc: corrupted metadata sentences against clean ones, per kind, rate and tag."""

import pytest

from medvl.eval.tasks.qc import qc_task
from tests.utils import is_share


def test_qc_scores_corruptions_per_kind_and_rate(mr):
    encoder, data = mr
    result = qc_task(encoder, data, seed=0)
    assert set(result["by_case"]) == {f"{kind}@{rate}" for kind in ("missing_tag", "wrong_tag", "numeric_error")
                                      for rate in ("0.1", "0.5")}
    for case, entry in result["by_case"].items():
        assert entry["n_clean"] + entry["n_corrupted"] == 24 and is_share(entry["auc"])
        scores = result["data"][case]
        assert len(scores["clean"]) == entry["n_clean"] and len(scores["corrupted"]) == entry["n_corrupted"]
        assert all(0 <= s <= 2 for s in scores["clean"] + scores["corrupted"])
    assert result["by_case"]["missing_tag@0.1"]["n_corrupted"] == 2  # round(0.1 * 24)
    assert result["by_case"]["wrong_tag@0.5"]["n_corrupted"] == 12
    # per tag, and split by whether the image can show the tag; corruptions the sentence does not show are out
    for entry in result["by_case"].values():
        tags = entry["by_tag"]
        assert sum(v["n"] for v in tags.values()) == entry["n_corrupted"] - entry["n_text_unchanged"]
        independent = sum(v["n"] for t, v in tags.items() if t in ("Manufacturer", "ManufacturerModelName"))
        assert entry["image_independent"]["n"] == independent
        assert entry["image_determined"]["n"] + independent == entry["n_corrupted"] - entry["n_text_unchanged"]
    assert set(result["by_case"]["numeric_error@0.5"]["by_tag"]) <= {"EchoTime", "RepetitionTime", "InversionTime"}
    assert set(result["image_independent_tags"]) == {"Manufacturer", "ManufacturerModelName"}
    # numeric errors also by factor, every seen one counted once; other kinds change no number
    from medvl.data.metadata import NUMERIC_ERROR_FACTORS

    for rate in ("0.1", "0.5"):
        entry = result["by_case"][f"numeric_error@{rate}"]
        assert set(entry["by_factor"]) <= {f"x{f:.3g}" for f in NUMERIC_ERROR_FACTORS}
        assert sum(v["n"] for v in entry["by_factor"].values()) == entry["n_corrupted"] - entry["n_text_unchanged"]
        assert all(v["auc"] is None or is_share(v["auc"]) for v in entry["by_factor"].values())
        assert "by_factor" not in result["by_case"][f"missing_tag@{rate}"]
        assert "by_factor" not in result["by_case"][f"wrong_tag@{rate}"]


def test_qc_refuses_ct(ct):
    with pytest.raises(ValueError, match=r"task 'qc' applies to MR data.*synthetic-ct is CT"):
        qc_task(*ct)
