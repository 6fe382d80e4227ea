"""probe: a linear probe of the MR sequence on half the held-out set, beside the majority class."""

import pytest

from medvl.eval.tasks.probe import probe_task
from tests.utils import is_share


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # sklearn, a class absent from a half
def test_probe_on_mr_sequences(mr):
    encoder, data = mr
    probe = probe_task(encoder, data, seed=0)
    assert probe["target"] == "sequence" and probe["n_train"] + probe["n_test"] == 24
    assert all(is_share(probe[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "majority_accuracy"))


def test_probe_needs_a_class_on_every_sample(ct):
    with pytest.raises(ValueError, match=r"task 'probe' needs single-label classes"):
        probe_task(*ct)
