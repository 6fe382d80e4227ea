"""zeroshot on held-out CT phantoms: keys, ranges, and the supervised ceiling beside each AUC."""

import numpy as np
import pytest

from medvl.eval.tasks.zeroshot import zeroshot_task
from tests.utils import is_share


def test_zeroshot_on_ct(ct):
    from medvl.data import CT_FINDINGS

    encoder, data = ct
    result = zeroshot_task(encoder, data)
    assert encoder.has_prompt_head and result["volume_side"] == "prompt head"
    assert list(result["per_class"]) == list(CT_FINDINGS)
    assert result["n_templates"] == 5 and result["n"] == 16
    for entry in result["per_class"].values():
        assert entry["n_pos"] + entry["n_neg"] == 16
        assert all(is_share(entry[k]) for k in ("auc", "f1", "balanced_accuracy", "sensitivity", "specificity"))
    assert 0 < result["macro"]["n_classes"] <= len(CT_FINDINGS) and is_share(result["macro"]["auc"])
    scores = np.asarray(result["data"]["scores"])
    assert scores.shape == (16, len(CT_FINDINGS)) and ((scores > 0) & (scores < 1)).all()
    separation = result["prompt_separation"]  # whether the text side tells the findings apart
    assert list(separation["per_class"]) == list(CT_FINDINGS) and -1 <= separation["mean_offdiagonal_cosine"] <= 1
    for name, entry in separation["per_class"].items():
        assert entry["closest"] in CT_FINDINGS and entry["closest"] != name and 0 <= entry["direction_norm"] <= 2
    probe = result["probe"]  # the supervised ceiling beside each zero-shot AUC
    assert list(probe["per_class"]) == list(CT_FINDINGS) and is_share(probe["macro"]["auc"])
    for name, entry in probe["per_class"].items():
        counts = (result["per_class"][name]["n_pos"], result["per_class"][name]["n_neg"])
        assert (entry["n_pos"], entry["n_neg"]) == counts
        assert (entry["auc"] is None) == (min(counts) < 2)


def test_zeroshot_refuses_mr(mr):
    with pytest.raises(ValueError, match=r"task 'zeroshot' applies to CT data.*synthetic-mr is MR"):
        zeroshot_task(*mr)
