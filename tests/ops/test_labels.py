"""medvl/ops/_labels.py: label-group pairs without B x B."""

from __future__ import annotations

import pytest
import torch

from medvl.ops._labels import same_label_pairs


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("n_anchor,n_candidate,classes", [(1, 1, 1), (30, 30, 4), (17, 40, 6), (25, 9, 30)])
def test_same_label_pairs_lists_every_pair_in_row_major_order(exclude_self, n_anchor, n_candidate, classes):
    g = torch.Generator().manual_seed(n_anchor + n_candidate)
    labels = torch.randint(0, classes, (n_anchor,), generator=g)
    candidate_labels = labels if n_anchor == n_candidate else torch.randint(0, classes, (n_candidate,), generator=g)
    offsets, anchor, candidate = same_label_pairs(labels, candidate_labels, exclude_self)
    expected = [(i, j) for i in range(n_anchor) for j in range(n_candidate)
                if labels[i] == candidate_labels[j] and not (exclude_self and i == j)]
    assert list(zip(anchor.tolist(), candidate.tolist())) == expected
    counts = torch.bincount(anchor, minlength=n_anchor)
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
