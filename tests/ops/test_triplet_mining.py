"""medvl.triplet_mining: every backend against the reference, pytorch-metric-learning, and bad input."""

from __future__ import annotations

import pytest
import torch

import medvl
from medvl.ops.triplet_mining import BACKENDS as MINING_BACKENDS, STRATEGY_CODES
from medvl.reference.triplet_mining import triplet_mining as reference_mining
from tests.utils import available_backends

STRATEGIES = ("batch_hard", "semi_hard", "entities")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
SIZES = [(1, 3), (2, 5), (129, 17), (1000, 33)]
INTERPRETED_SIZES = [(1, 3), (2, 5), (29, 17)]


def mining_backends(strategy: str):
    params = []
    for name, device in available_backends():
        why = MINING_BACKENDS[name].reasons(torch.empty(1, 1, device=device), STRATEGY_CODES[strategy])
        if not why:
            params.append(pytest.param(name, device, id=f"{name}-{device}"))
    return params


def all_params():
    return [pytest.param(s, *p.values, id=f"{s}-{p.id}") for s in STRATEGIES for p in mining_backends(s)]


def make(n, dim, seed, device="cpu", classes=5, n_candidates=None):
    """Small-integer embeddings: every dot product is exact in any precision, so all backends see
    the same distances and ties (which are then frequent, exercising the tie rules)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (n, dim), generator=g).float()
    labels = torch.randint(0, classes, (n,), generator=g)
    entities = [torch.rand(n, k, generator=g) < p for k, p in ((18, 0.15), (9, 0.3), (11, 0.3))]
    out = {"x": x.to(device), "labels": labels.to(device), "entities": [e.to(device) for e in entities]}
    if n_candidates:
        out["c"] = torch.randint(-3, 4, (n_candidates, dim), generator=g).float().to(device)
        out["candidate_labels"] = torch.randint(0, classes, (n_candidates,), generator=g).to(device)
        out["candidate_entities"] = [
            (torch.rand(n_candidates, k, generator=g) < p).to(device) for k, p in ((18, 0.15), (9, 0.3), (11, 0.3))]
    return out


def kwargs_for(strategy, data, cross):
    if strategy == "entities":
        kw = {"entities": data["entities"]}
        if cross:
            kw["candidate_entities"] = data["candidate_entities"]
        return kw
    kw = {"labels": data["labels"]}
    if cross:
        kw["candidate_labels"] = data["candidate_labels"]
    return kw


def assert_same(ours, expected, what):
    for name, a, e in zip(("anchor", "positive", "negative"), ours, expected):
        assert a.dtype == torch.int64, f"{what}: {name} dtype {a.dtype}"
        assert torch.equal(a.cpu(), e.cpu()), f"{what}: {name} differs\n ours {a[:20].tolist()}\n ref  {e[:20].tolist()}"


@pytest.mark.parametrize("strategy,backend,device", all_params())
@pytest.mark.parametrize("distance", DISTANCES)
def test_backend_matches_reference(strategy, backend, device, distance):
    sizes = INTERPRETED_SIZES if backend == "triton" and device == "cpu" else SIZES
    if strategy == "semi_hard":  # one triplet per positive pair: keep the pair count (and the oracle) small
        sizes = [(n, d) if n <= 300 else (300, d) for n, d in sizes]
    for n, dim in sizes:
        for cross in (False, True):
            data = make(n, dim, seed=n + dim, device=device, n_candidates=n + 3 if cross else None)
            args = (data["x"], data["c"]) if cross else (data["x"],)
            kw = kwargs_for(strategy, data, cross)
            ours = medvl.triplet_mining(*args, strategy=strategy, distance=distance, backend=backend, **kw)
            cpu_args = [a.cpu() for a in args]
            cpu_kw = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in kw.items()}
            expected = reference_mining(*cpu_args, strategy=strategy, distance=distance, **cpu_kw)
            assert_same(ours, expected, f"{backend} {strategy} {distance} n={n} dim={dim} cross={cross}")


@pytest.mark.parametrize("strategy,backend,device", all_params())
def test_ties_go_to_the_lowest_index(strategy, backend, device):
    # Duplicated candidates are exactly tied in distance (and in entity score).
    data = make(12, 8, seed=4, device=device, classes=3)
    x = torch.cat([data["x"], data["x"]])
    labels = torch.cat([data["labels"], data["labels"]])
    entities = [torch.cat([e, e]) for e in data["entities"]]
    kw = {"entities": entities} if strategy == "entities" else {"labels": labels}
    ours = medvl.triplet_mining(x, strategy=strategy, backend=backend, **kw)
    expected = reference_mining(x.cpu(), strategy=strategy, **{k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in kw.items()})
    assert_same(ours, expected, f"{backend} {strategy} with duplicates")
    if strategy == "batch_hard":
        # Each anchor's twin is its nearest positive, never chosen as the farthest one when others exist.
        assert (ours.positive < 24).all()


@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("batch_hard")])
def test_single_class_and_all_distinct_batches_yield_no_batch_hard_triplets(backend, device):
    x = torch.randn(9, 4, device=device)
    one_class = medvl.triplet_mining(x, labels=torch.zeros(9, dtype=torch.long, device=device), backend=backend)
    distinct = medvl.triplet_mining(x, labels=torch.arange(9, device=device), backend=backend)
    assert one_class.anchor.numel() == 0 and distinct.anchor.numel() == 0
    # Cross-modal without labels: candidate i is anchor i's only positive.
    paired = medvl.triplet_mining(x, x + 0.01, backend=backend)
    assert torch.equal(paired.positive.cpu(), torch.arange(9))


@pytest.mark.parametrize("distance,pml_distance", [
    ("euclidean", dict(p=2, power=1)), ("squared_euclidean", dict(p=2, power=2)), ("cosine", None)])
@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("batch_hard")])
def test_batch_hard_equals_pytorch_metric_learning(distance, pml_distance, backend, device):
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    distances = pytest.importorskip("pytorch_metric_learning.distances")
    peer_distance = (distances.CosineSimilarity() if pml_distance is None
                     else distances.LpDistance(normalize_embeddings=False, **pml_distance))
    n = 40 if backend == "triton" and device == "cpu" else 500
    data = make(n, 32, seed=8)
    data["x"] = torch.randn(n, 32, generator=torch.Generator().manual_seed(8))  # no ties: PML's rule is torch.max's
    ours = medvl.triplet_mining(data["x"].to(device), labels=data["labels"].to(device), distance=distance,
                                backend=backend)
    peer = miners.BatchHardMiner(distance=peer_distance)(data["x"], data["labels"])
    assert_same(ours, peer, f"BatchHardMiner {distance}")
    # Cross-modal: pytorch-metric-learning's ref_emb form.
    c = torch.randn(n, 32)
    ours = medvl.triplet_mining(data["x"].to(device), c.to(device), labels=data["labels"].to(device),
                                distance=distance, backend=backend)
    # A copy of the labels: pytorch-metric-learning drops the diagonal when ref_labels *is* labels.
    peer = miners.BatchHardMiner(distance=peer_distance)(data["x"], data["labels"], c, data["labels"].clone())
    assert_same(ours, peer, f"BatchHardMiner cross-modal {distance}")


def test_semi_hard_rule_by_hand():
    # One anchor at 0, a positive at distance 2, negatives at 1 (inside) and 3, 5 (beyond).
    x = torch.tensor([[0.0], [2.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    mined = medvl.triplet_mining(x, labels=labels, strategy="semi_hard", backend="cpu")
    first = (mined.anchor == 0).nonzero().item()
    assert (mined.positive[first].item(), mined.negative[first].item()) == (1, 3)
    # Anchor 1's positive (anchor 0) is at 2; every negative of anchor 1 (at 1, 1, 3) is nearer
    # than 2 + ... only 4 (distance 3) lies beyond.
    second = (mined.anchor == 1).nonzero().item()
    assert mined.negative[second].item() == 4
    # With no negative beyond the positive, the farthest negative is used.
    mined = medvl.triplet_mining(torch.tensor([[0.0], [9.0], [1.0], [2.0]]), labels=torch.tensor([0, 0, 1, 1]),
                                 strategy="semi_hard", backend="cpu")
    assert mined.negative[(mined.anchor == 0).nonzero().item()].item() == 3


def test_entity_rule_by_hand():
    # Disease sets decide: sample 1 shares sample 0's disease (score 1), sample 2 half of it
    # (0.85 * 0.5 + 0.15 = 0.575, in range), sample 3 nothing (0 + 0.15, out of range).
    disease = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    empty = torch.zeros(4, 2, dtype=torch.bool)
    x = torch.randn(4, 6)
    mined = medvl.triplet_mining(x, entities=(disease, empty, empty), strategy="entities", backend="cpu")
    row = (mined.anchor == 0).nonzero().item()
    assert (mined.positive[row].item(), mined.negative[row].item()) == (1, 2)


@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("batch_hard")
                                            if not (p.values[0] == "triton" and p.values[1] == "cpu")])
def test_opcheck(backend, device):
    data = make(9, 8, seed=1, device=device)
    args = (data["x"], data["x"], data["labels"], data["labels"], None, None, 0, 0, [], [], 0.0, 1.0, True, backend)
    torch.library.opcheck(torch.ops.medvl.triplet_mining.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_with_triplet_loss():
    x = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 3, (20,))
    loss_fn = medvl.nn.TripletLoss(backend="cpu")
    eager = loss_fn(x, labels)
    compiled = torch.compile(loss_fn, backend="aot_eager")(x, labels)
    torch.testing.assert_close(compiled, eager)


def test_memory_is_not_batch_squared():
    # At B = 4096 a B x B float32 matrix is 64 MiB; the cpu backend's workspace stays O(B * D).
    from medvl.ops._core import _C

    n, dim = 4096, 64
    for strategy in (0, 2):
        nbytes = _C.triplet_mining_cpu_workspace_bytes(n, n, dim, strategy, 0, 2)
        assert nbytes < n * n * 4 / 16, f"workspace {nbytes / 2**20:.1f} MiB for strategy {strategy}"


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x: medvl.triplet_mining(x, strategy="hardest"), ValueError, "strategy must be one of"),
        (lambda x: medvl.triplet_mining(x, distance="l1"), ValueError, "distance must be one of"),
        (lambda x: medvl.triplet_mining(x[:0]), ValueError, "anchors is an empty batch"),
        (lambda x: medvl.triplet_mining(x, x[:, :3]), ValueError, "same dim"),
        (lambda x: medvl.triplet_mining(x, labels=torch.zeros(5, dtype=torch.long)), ValueError,
         r"labels must have shape \(8,\)"),
        (lambda x: medvl.triplet_mining(x, labels=torch.zeros(8)), TypeError, "integer class ids"),
        (lambda x: medvl.triplet_mining(x, x[:5], labels=torch.zeros(8, dtype=torch.long)), ValueError,
         "candidate_labels are needed"),
        (lambda x: medvl.triplet_mining(x, strategy="entities"), ValueError, "needs entities"),
        (lambda x: medvl.triplet_mining(x, strategy="entities", entities=[torch.zeros(8, 2, dtype=torch.bool)]),
         ValueError, "three multi-hot tensors"),
        (lambda x: medvl.triplet_mining(x, x, strategy="entities",
                                        entities=[torch.zeros(8, 2, dtype=torch.bool)] * 3,
                                        candidate_entities=[torch.zeros(8, 3, dtype=torch.bool)] * 3),
         ValueError, "differ in width"),
        (lambda x: medvl.triplet_mining(x, strategy="entities", entities=[torch.zeros(8, 2, dtype=torch.bool)] * 3,
                                        score_range=(0.6, 0.2)), ValueError, "lo < hi"),
        (lambda x: medvl.triplet_mining(x, strategy="entities", entities=[torch.zeros(8, 2, dtype=torch.bool)] * 3,
                                        labels=torch.zeros(8, dtype=torch.long)), ValueError, "labels are not used"),
        (lambda x: medvl.triplet_mining(x, backend="cuda"), medvl.BackendUnavailable, "tensors are on cpu"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(8, 4))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triton_small_tiles_cross_tile_ties(strategy):
    # Several candidate tiles, D chunks and semi-hard pair slices: the cross-tile tie rule at work.
    if not any(p.values[0] == "triton" for p in mining_backends(strategy)):
        pytest.skip("no triton backend here")
    from medvl.kernels import triplet_mining as triton_mining
    from medvl.ops.triplet_mining import _Inputs, _run_fused

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = make(40, 20, seed=6, device=device, classes=4)
    x = torch.cat([data["x"], data["x"][:10]])  # duplicates: exact distance ties across tiles
    labels = torch.cat([data["labels"], data["labels"][:10]])
    entities = [torch.cat([e, e[:10]]) for e in data["entities"]]
    code = STRATEGY_CODES[strategy]
    from medvl.ops._labels import pack_multi_hot

    bits = torch.cat([pack_multi_hot(e) for e in entities], 1) if strategy == "entities" else None
    words = [pack_multi_hot(e).shape[1] for e in entities] if strategy == "entities" else []
    inputs = _Inputs(x, x, None if strategy == "entities" else labels, None if strategy == "entities" else labels,
                     bits, bits, code, 0, words, [0.85, 0.10, 0.05], 0.25, 0.6, True)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_S=2)
    ours = _run_fused(lambda *a: triton_mining.triplet_mining_forward(*a, block_overrides=small), inputs)
    kw = {"entities": [e.cpu() for e in entities]} if strategy == "entities" else {"labels": labels.cpu()}
    expected = reference_mining(x.cpu(), strategy=strategy, **kw)
    assert_same(ours, expected, f"triton small tiles {strategy}")
