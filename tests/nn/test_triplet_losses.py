"""TripletLoss, MedTrimLoss and SupConLoss against pytorch-metric-learning and by definition."""

from __future__ import annotations

import pytest
import torch

import medvl
from medvl.nn.triplet_loss import row_distance

PML_DISTANCE = {"euclidean": dict(p=2, power=1), "squared_euclidean": dict(p=2, power=2)}


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("reduction,pml_reducer", [("mean", "MeanReducer"), ("mean_nonzero", "AvgNonZeroReducer")])
def test_triplet_loss_equals_pytorch_metric_learning(distance, reduction, pml_reducer):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    peer_distance = (distances.CosineSimilarity() if distance == "cosine"
                     else distances.LpDistance(normalize_embeddings=False, **PML_DISTANCE[distance]))
    torch.manual_seed(0)
    x = torch.randn(200, 16, requires_grad=True)
    labels = torch.randint(0, 8, (200,))
    ours = medvl.nn.TripletLoss(margin=0.2, distance=distance, reduction=reduction, backend="cpu")(x, labels)
    (g_ours,) = torch.autograd.grad(ours, x)
    triplets = miners.BatchHardMiner(distance=peer_distance)(x, labels)
    peer_fn = losses.TripletMarginLoss(margin=0.2, distance=peer_distance, reducer=getattr(reducers, pml_reducer)())
    peer = peer_fn(x, labels, triplets)
    (g_peer,) = torch.autograd.grad(peer, x)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_peer, rtol=1e-4, atol=1e-6)


def test_triplet_loss_without_triplets_is_a_differentiable_zero():
    x = torch.randn(5, 3, requires_grad=True)
    loss = medvl.nn.TripletLoss(backend="cpu")(x, torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))


def test_medtrim_loss_is_the_weighted_sum_of_four_directional_terms():
    torch.manual_seed(1)
    images = torch.randn(40, 12, requires_grad=True)
    texts = torch.randn(40, 12, requires_grad=True)
    entities = [torch.rand(40, k) < 0.3 for k in (14, 6, 9)]
    loss_fn = medvl.nn.MedTrimLoss(margin=0.3, weights=(1.0, 0.5, 2.0, 0.25), backend="cpu")
    out = loss_fn(images, texts, entities, output_dict=True)
    by_hand = {}
    for name, anchors, candidates in (("image_image", images, None), ("text_text", texts, None),
                                      ("image_text", images, texts), ("text_image", texts, images)):
        a, p, n = medvl.triplet_mining(anchors, candidates, entities=entities, strategy="entities", backend="cpu",
                                       score_range=loss_fn.score_range)
        other = anchors if candidates is None else candidates
        assert a.numel() > 0, f"{name}: no triplets mined, the test would check nothing"
        by_hand[name] = torch.relu(row_distance(anchors[a], other[p], "euclidean")
                                   - row_distance(anchors[a], other[n], "euclidean") + 0.3).mean()
        torch.testing.assert_close(out[name], by_hand[name])
    expected = by_hand["image_image"] + 0.5 * by_hand["text_text"] + 2 * by_hand["image_text"] + 0.25 * by_hand["text_image"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert images.grad.abs().sum() > 0 and texts.grad.abs().sum() > 0


def test_medtrim_default_range_mines_unrelated_reports_as_negatives():
    """MedTrimLoss' score range starts at 0: a report sharing no finding is a negative. The op's own default
    (0.25, 0.6) never picks one; that gap is why MedTrimLoss sets its own range."""
    torch.manual_seed(2)
    diseases = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    entities = [diseases, torch.zeros(6, 2, dtype=torch.bool), torch.zeros(6, 2, dtype=torch.bool)]
    emb = torch.randn(6, 4)
    disjoint = ~(diseases.float() @ diseases.float().t()).bool()
    loss_fn = medvl.nn.MedTrimLoss()
    assert loss_fn.score_range == (0.0, 0.6)
    a, _, n = medvl.triplet_mining(emb, entities=entities, strategy="entities", score_range=loss_fn.score_range)
    assert a.numel() == 6 and bool(disjoint[a, n].all()), "every anchor's negative shares no finding with it"
    a, _, n = medvl.triplet_mining(emb, entities=entities, strategy="entities")   # the op's default range
    assert not bool(disjoint[a, n].any())


def test_medtrim_batch_hard_mining_uses_identical_disease_sets_as_classes():
    """mining="batch_hard": the four terms with batch-hard triplets, positives = same disease set
    (checked against pytorch-metric-learning's BatchHardMiner on the same class ids)."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, miners

    torch.manual_seed(2)
    images, texts = torch.randn(30, 8), torch.randn(30, 8)
    disease = torch.zeros(30, 4, dtype=torch.bool)
    disease[torch.arange(30), torch.arange(30) % 3] = True      # three classes of 10
    disease[::7, 3] = True                                       # a few with a second finding: classes of their own
    entities = [disease, torch.rand(30, 6) < 0.3, torch.rand(30, 9) < 0.3]
    out = medvl.nn.MedTrimLoss(margin=0.3, mining="batch_hard", backend="cpu")(images, texts, entities,
                                                                                 output_dict=True)
    classes = torch.unique(disease.to(torch.uint8), dim=0, return_inverse=True)[1]
    a, p, n = miners.BatchHardMiner(distance=distances.LpDistance(normalize_embeddings=False))(images, classes)
    expected = torch.relu(row_distance(images[a], images[p], "euclidean")
                          - row_distance(images[a], images[n], "euclidean") + 0.3).mean()
    torch.testing.assert_close(out["image_image"], expected)
    with pytest.raises(ValueError, match="mining"):
        medvl.nn.MedTrimLoss(mining="hardest")


@pytest.mark.parametrize("chunk_size", [7, 64, 1024])
def test_supcon_equals_pytorch_metric_learning(chunk_size):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(2)
    x = torch.randn(150, 16, requires_grad=True)
    labels = torch.randint(0, 6, (150,))
    ours = medvl.nn.SupConLoss(temperature=0.1, chunk_size=chunk_size)(x, labels)
    (g_ours,) = torch.autograd.grad(ours, x)
    peer = losses.SupConLoss(temperature=0.1)(x, labels)
    (g_peer,) = torch.autograd.grad(peer, x)
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_peer, rtol=1e-4, atol=1e-7)


def test_bad_loss_options():
    with pytest.raises(ValueError, match="reduction must be one of"):
        medvl.nn.TripletLoss(reduction="avg")
    with pytest.raises(ValueError, match="use MedTrimLoss"):
        medvl.nn.TripletLoss(strategy="entities")
    with pytest.raises(ValueError, match="four numbers"):
        medvl.nn.MedTrimLoss(weights=(1, 1))
    with pytest.raises(ValueError, match="labels must have shape"):
        medvl.nn.SupConLoss()(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
