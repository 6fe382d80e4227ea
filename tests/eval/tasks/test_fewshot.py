"""fewshot: linear probes on k shots per class of the probe's training half."""

import pytest

from medvl.eval.tasks.fewshot import fewshot_task
from medvl.eval.tasks.probe import probe_task
from tests.utils import is_share


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn, a class absent from a half
def test_fewshot_on_mr_sequences(mr):
    encoder, data = mr
    shots = fewshot_task(encoder, data, ks=(1, 2), seeds=(0,), seed=0)
    assert set(shots["by_k"]) == {"1", "2"} and shots["target"] == "sequence"
    assert shots["n_train"] == probe_task(encoder, data, seed=0)["n_train"]  # the probe's split
    for entry in shots["by_k"].values():
        assert len(entry["values"]) == 1 and is_share(entry["mean"]) and entry["k_effective"] >= 1
