"""collapse: the spread of held-out embeddings, and the threshold it is judged by."""

import pytest

from medvl.eval.eval_set import EvalSet
from medvl.eval.tasks.collapse import collapse_task
from medvl.models.diagnostics import COLLAPSE_COSINE


def test_collapse_measures_the_spread_of_volumes_and_texts(mr):
    result = collapse_task(*mr)
    assert result["n"] == 24 and result["threshold"] == COLLAPSE_COSINE
    assert -1 <= result["image_offdiagonal_cosine"]["mean"] <= 1 and -1 <= result["matched_cosine"] <= 1
    assert isinstance(result["collapsed"], bool) and (result["collapsed"] == bool(result["reasons"]))


def test_collapse_needs_two_samples(mr):
    encoder, data = mr
    one = EvalSet.from_dataset([data.dataset[0]], "mr")
    with pytest.raises(ValueError, match=r"task 'collapse' needs .* has fewer than two samples"):
        collapse_task(encoder, one)
