"""medvl.triplet_mining: every backend against the reference, pytorch-metric-learning, and bad input."""

from __future__ import annotations

import pytest
import torch

import medvl
from medvl.ops.triplet_mining import BACKENDS as MINING_BACKENDS
from medvl.reference.triplet_mining import (entity_score_keys, entity_scoring, pairwise_distance, sqrt_rn,
                                            triplet_mining as reference_mining)
from tests.utils import available_backends, run_script

STRATEGIES = ("batch_hard", "semi_hard", "entities")
DISTANCES = ("euclidean", "squared_euclidean", "cosine")
SIZES = [(1, 3), (2, 5), (129, 17), (1000, 33)]
INTERPRETED_SIZES = [(1, 3), (2, 5), (29, 17)]


def mining_backends(strategy: str):
    params = []
    for name, device in available_backends():
        why = MINING_BACKENDS[name].reasons(torch.empty(1, 1, device=device), strategy)
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
    args = (data["x"], data["x"], data["labels"], data["labels"], None, None, "batch_hard", "euclidean", [], [], 0.0, 1.0, True, backend)
    torch.library.opcheck(torch.ops.medvl.triplet_mining.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_with_triplet_loss():
    x = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 3, (20,))
    loss_fn = medvl.nn.TripletLoss(backend="cpu")
    eager = loss_fn(x, labels)
    compiled = torch.compile(loss_fn, backend="aot_eager")(x, labels)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [p.values[0] for p in mining_backends("batch_hard") if p.values[1] == "cuda"])
def test_torch_compile_inductor_on_gpu(backend):
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 10, (300,), device="cuda")
    loss_fn = medvl.nn.TripletLoss(backend=backend)
    eager = loss_fn(x, labels)
    compiled = torch.compile(loss_fn)(x, labels)
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


def mine_triton_forced(strategy, x, labels, entities, overrides, candidates=None, candidate_labels=None,
                       candidate_entities=None):
    """The triton backend with forced tiles (and splits) on small inputs, against the reference."""
    from medvl.ops._labels import pack_multi_hot
    from medvl.ops.triplet_mining import _Inputs, _run_fused, _triton_per_anchor

    within = candidates is None
    if within:
        candidates, candidate_labels, candidate_entities = x, labels, entities
    scored = strategy == "entities"
    bits = torch.cat([pack_multi_hot(e) for e in entities], 1) if scored else None
    candidate_bits = torch.cat([pack_multi_hot(e) for e in candidate_entities], 1) if scored else None
    words = [pack_multi_hot(e).shape[1] for e in entities] if scored else []
    scoring = entity_scoring((0.85, 0.10, 0.05), (0.25, 0.6))  # the kernels take the integer form
    inputs = _Inputs(x, candidates, None if scored else labels, None if scored else candidate_labels, bits,
                     candidate_bits, strategy, "euclidean", words, [float(w) for w in scoring.weights],
                     float(scoring.low), float(scoring.high), within)
    ours = _run_fused(lambda *a: _triton_per_anchor(*a, block_overrides=overrides), inputs)
    if scored:
        kw = {"entities": [e.cpu() for e in entities]}
        if not within:
            kw["candidate_entities"] = [e.cpu() for e in candidate_entities]
    else:
        kw = {"labels": labels.cpu()}
        if not within:
            kw["candidate_labels"] = candidate_labels.cpu()
    expected = reference_mining(x.cpu(), None if within else candidates.cpu(), strategy=strategy, **kw)
    return ours, expected


def triton_device():
    if not any(p.values[0] == "triton" for p in mining_backends("batch_hard")):
        pytest.skip("no triton backend here")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triton_small_tiles_cross_tile_ties(strategy):
    # Several candidate tiles, D chunks and semi-hard pair slices: the cross-tile tie rule at work.
    device = triton_device()
    data = make(40, 20, seed=6, device=device, classes=4)
    x = torch.cat([data["x"], data["x"][:10]])  # duplicates: exact distance ties across tiles
    labels = torch.cat([data["labels"], data["labels"][:10]])
    entities = [torch.cat([e, e[:10]]) for e in data["entities"]]
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_S=2)
    ours, expected = mine_triton_forced(strategy, x, labels, entities, small)
    assert_same(ours, expected, f"triton small tiles {strategy}")


@pytest.mark.parametrize("strategy", ["batch_hard", "entities"])
@pytest.mark.parametrize("split", [2, 3, 7])
def test_triton_candidate_split_matches_one_sweep(strategy, split):
    # The streamed side split 2, 3 (uneven: 4 tiles) and 7 ways (recounted to 4, one tile each), paired
    # and within one set, with exact ties across the splits' borders: the same triplets as unsplit.
    device = triton_device()
    data = make(45, 20, seed=9, device=device, classes=3, n_candidates=50)
    x = torch.cat([data["x"], data["x"][:12]])
    labels = torch.cat([data["labels"], data["labels"][:12]])
    entities = [torch.cat([e, e[:12]]) for e in data["entities"]]
    c = torch.cat([data["c"], data["c"][:14]])  # 64 candidates: four tiles of 16
    candidate_labels = torch.cat([data["candidate_labels"], data["candidate_labels"][:14]])
    candidate_entities = [torch.cat([e, e[:14]]) for e in data["candidate_entities"]]
    forced = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, SPLIT=split)
    ours, expected = mine_triton_forced(strategy, x, labels, entities, forced)
    assert_same(ours, expected, f"triton {strategy} split {split} within")
    ours, expected = mine_triton_forced(strategy, x, labels, entities, forced, c, candidate_labels,
                                        candidate_entities)
    assert_same(ours, expected, f"triton {strategy} split {split} paired")


@pytest.mark.parametrize("block_s", [1, 4, 16])
def test_triton_semi_hard_many_positives_in_pair_chunks(block_s):
    # Two classes: about 20 positives per anchor, in chunks of 1, 4 or 16 slots, pair distances read from
    # four candidate tiles; duplicated rows make exact ties between d(i, p) and the negatives' distances.
    device = triton_device()
    data = make(36, 6, seed=11, device=device, classes=2, n_candidates=30)
    x = torch.cat([data["x"], data["x"][:8]])
    labels = torch.cat([data["labels"], data["labels"][:8]])
    forced = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, BLOCK_S=block_s)
    ours, expected = mine_triton_forced("semi_hard", x, labels, None, forced)
    assert ours[0].numel() > 36 * 15, "the case should have many pairs per anchor"
    assert_same(ours, expected, f"triton semi_hard BLOCK_S={block_s} within")
    c = torch.cat([data["c"], x[:10]])  # candidates equal to anchors: d(i, p) ties with d(i, j) exactly
    candidate_labels = torch.cat([data["candidate_labels"], 1 - labels[:10]])
    ours, expected = mine_triton_forced("semi_hard", x, labels, None, forced, c, candidate_labels)
    assert_same(ours, expected, f"triton semi_hard BLOCK_S={block_s} paired")


# --------------------------------------------------------------------------------------------
# Exact entity scores: ties in exact arithmetic are ties on every backend.
# --------------------------------------------------------------------------------------------


def exact_entity_triplets(entities, dist, weights, score_range):
    """MedTrim's rule on Python Fractions, independent of the keys the backends use."""
    from fractions import Fraction

    w = [Fraction(x).limit_denominator(10**6) for x in weights]
    lo, hi = (Fraction(x).limit_denominator(10**6) for x in score_range)
    sets = [[frozenset(row.nonzero().flatten().tolist()) for row in kind] for kind in entities]
    n = len(sets[0])

    def score(i, j):
        total = Fraction(0)
        for kind, weight in zip(sets, w):
            either = len(kind[i] | kind[j])
            total += weight * (Fraction(len(kind[i] & kind[j]), either) if either else 1)
        return total

    triplets = []
    for i in range(n):
        rows = [(score(i, j), dist[i, j].item(), j) for j in range(n) if j != i]
        top = max(s for s, _, _ in rows)
        positive = min((-d, j) for s, d, j in rows if s == top)[1]  # farthest, then lowest index
        in_range = [(s, d, j) for s, d, j in rows if lo <= s < hi]
        if not in_range:
            continue
        low = min(s for s, _, _ in in_range)
        if low >= top:
            continue
        negative = min((d, j) for s, d, j in in_range if s == low)[1]  # nearest, then lowest index
        triplets.append((i, positive, negative))
    return [torch.tensor(column, dtype=torch.int64) for column in zip(*triplets)] if triplets else [
        torch.empty(0, dtype=torch.int64)] * 3


@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("entities")])
@pytest.mark.parametrize("n", [64, 200])
def test_entity_scores_tie_in_exact_arithmetic(backend, device, n):
    # The case that float32 scores got wrong: widths 6/8/4 at p = 0.3 give many pairs whose scores are
    # equal as fractions but summed from different terms (0.85 + 0.10 * 1/2 + 0 = 0.85 + 0 + 0.05 * 1).
    if backend == "triton" and device == "cpu" and n > 64:
        pytest.skip("the interpreter is slow; 64 rows cover the ties")
    g = torch.Generator().manual_seed(0)
    entities = [torch.rand(n, k, generator=g) < 0.3 for k in (6, 8, 4)]
    x = torch.randint(-2, 3, (n, 5), generator=g).float()  # exact distances, many distance ties too
    for weights, score_range in [((0.85, 0.10, 0.05), (0.0, 0.6)), ((1 / 3, 1 / 3, 1 / 3), (0.2, 0.9))]:
        mined = medvl.triplet_mining(x.to(device), entities=[e.to(device) for e in entities], strategy="entities",
                                     entity_weights=weights, score_range=score_range, backend=backend)
        expected = exact_entity_triplets(entities, pairwise_distance(x, x, "squared_euclidean"), weights,
                                         score_range)
        assert_same(mined, expected, f"{backend} entities {weights} n={n}")


@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("entities")])
def test_entity_tie_built_from_different_terms(backend, device):
    # Anchor 0: disease {0}, adjective {0}, direction {0}. Candidate 2 scores 0.05 from the direction
    # alone (IoUs 0, 0, 1); candidate 3 scores 0.05 from a third of each of the other two (0, 1/3,
    # 1/3), which float32 rounds to 0.050000004. Exactly, they tie: the nearer one, 3, is the negative.
    # Candidate 1 is the anchor's twin (score 1), the positive.
    disease = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    adjective = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    direction = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    x = torch.tensor([[0.0], [5.0], [3.0], [1.0]], device=device)
    entities = [e.to(device) for e in (disease, adjective, direction)]
    mined = medvl.triplet_mining(x, entities=entities, strategy="entities", score_range=(0.0, 0.6), backend=backend)
    row = (mined.anchor == 0).nonzero().item()
    assert (mined.positive[row].item(), mined.negative[row].item()) == (1, 3)
    # And as the positive: among candidates 2 and 3 alone, the tie goes to the farther one, 2.
    pair = medvl.triplet_mining(x[[0, 2, 3]], entities=[e[[0, 2, 3]] for e in entities], strategy="entities",
                                score_range=(0.0, 0.01), backend=backend)
    assert pair.anchor.numel() == 0  # no candidate scores below 0.01: no negative, no triplet
    keys = entity_score_keys([e.cpu() for e in entities], [e.cpu() for e in entities], (17, 2, 1))
    assert keys[0, 2] == keys[0, 3] == 1.0  # 0.05 x 20


def test_entity_scoring_reads_weights_as_fractions():
    scoring = entity_scoring((0.85, 0.10, 0.05), (0.25, 0.6))
    assert scoring == (((17, 2, 1)), 5, 12, 20)
    third = entity_scoring((1 / 3, 1 / 3, 1 / 3), (0.0, float("inf")))
    assert third.weights == (1, 1, 1) and third.denominator == 3 and third.low == 0 and third.high == 4
    assert entity_scoring((0.85, 0.10, 0.05), (-5.0, 0.5)).low == -21  # below every score: no lower bound


def test_entity_weights_too_fine_for_exact_scores_are_refused():
    entities = [torch.rand(8, 200) < 0.5 for _ in range(3)]
    with pytest.raises(ValueError, match="cannot be compared exactly.*entity_weights"):
        medvl.triplet_mining(torch.randn(8, 4), entities=entities, strategy="entities",
                             entity_weights=(0.123457, 0.234567, 0.345679))


# --------------------------------------------------------------------------------------------
# The same result on every x86 machine.
# --------------------------------------------------------------------------------------------


def test_sqrt_rn_is_correctly_rounded():
    # torch.sqrt on a CPU is MKL's, off by one unit in the last place for some inputs on some code paths.
    numpy = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.arange(0, 200_000).float(), torch.rand(200_000, generator=g) * 1e4,
                   torch.rand(1000, generator=g) * 1e-30, torch.tensor([0.0, 1e-45, 3.4e38, float("inf")])])
    expected = torch.from_numpy(numpy.sqrt(x.numpy()))
    assert torch.equal(sqrt_rn(x), expected)


_MINING_ISA_SCRIPT = r"""
import hashlib, json, torch, medvl
from medvl.reference.triplet_mining import triplet_mining as reference_mining
from tests.ops.test_triplet_mining import DISTANCES, STRATEGIES
digest, mismatches = hashlib.sha256(), []
for strategy in STRATEGIES:
    for distance in DISTANCES:
        # General float inputs: the cpu backend's exact bits, hashed.
        g = torch.Generator().manual_seed(7)
        x = torch.randn(260, 37, generator=g)
        kw = {"labels": torch.randint(0, 6, (260,), generator=g)}
        if strategy == "entities":
            kw = {"entities": [torch.rand(260, k, generator=g) < 0.3 for k in (6, 8, 4)]}
        for t in medvl.triplet_mining(x, strategy=strategy, distance=distance, backend="cpu", **kw):
            digest.update(t.numpy().tobytes())
        # Exact inputs: the cpu backend equals the reference under this process's MKL code path.
        # (Seeds 280 and 289 once split them on cosine semi-hard under MKL's SSE4.2 square root.)
        for seed in (3, 280, 289):
            g = torch.Generator().manual_seed(seed)
            dim = int(torch.randint(3, 40, (1,), generator=g))
            x = torch.randint(-3, 4, (120, dim), generator=g).float()
            kw = {"labels": torch.randint(0, 5, (120,), generator=g)}
            if strategy == "entities":
                kw = {"entities": [torch.rand(120, k, generator=g) < 0.3 for k in (6, 8, 4)]}
            ours = medvl.triplet_mining(x, strategy=strategy, distance=distance, backend="cpu", **kw)
            expected = reference_mining(x, strategy=strategy, distance=distance, **kw)
            if not all(torch.equal(a, e) for a, e in zip(ours, expected)):
                mismatches.append(f"{strategy}/{distance}/seed {seed}")
print(json.dumps({"digest": digest.hexdigest(), "mismatches": mismatches}))
"""


def test_mining_is_the_same_on_every_instruction_set():
    # The cpu backend picks its micro-kernel once per process (MEDVL_CPU_ISA lowers the choice), and
    # MKL picks a code path for torch's CPU math (MKL_ENABLE_INSTRUCTIONS lowers it: SSE4.2 is what
    # MKL runs on many non-Intel processors, and its square root rounds differently). Every pairing
    # must give the same triplets: the bits of the result may not depend on the machine.
    runs = {isa: run_script(_MINING_ISA_SCRIPT, env={"MEDVL_CPU_ISA": isa, "MKL_ENABLE_INSTRUCTIONS": mkl})
            for isa, mkl in (("avx512", "AVX512"), ("avx2", "AVX2"), ("scalar", "SSE4_2"))}
    for isa, run in runs.items():
        assert not run["mismatches"], f"MEDVL_CPU_ISA={isa}: cpu backend differs from the reference in {run['mismatches']}"
    assert len({run["digest"] for run in runs.values()}) == 1, {isa: run["digest"][:12] for isa, run in runs.items()}


@pytest.mark.parametrize("backend,device", [p.values for p in mining_backends("semi_hard")])
def test_semi_hard_without_positive_pairs(backend, device):
    # No two rows share a label: no pair to mine, and no kernel should see an empty output (on CUDA an
    # empty tensor has no pointer; the kernel refused it as "null negative pointer").
    x = torch.randn(5, 3, device=device)
    mined = medvl.triplet_mining(x, labels=torch.arange(5, device=device), strategy="semi_hard", backend=backend)
    assert all(t.numel() == 0 and t.dtype == torch.int64 for t in mined)
    single = medvl.triplet_mining(x[:1], labels=torch.zeros(1, dtype=torch.long, device=device),
                                  strategy="semi_hard", backend=backend)
    assert single.anchor.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_finite_embeddings_are_refused(dtype, strategy):
    # NaN made the fused path mine arbitrary triplets and the float64 reference return index B.
    x = torch.randn(6, 3, dtype=dtype)
    x[2, 1] = float("nan")
    kw = ({"entities": [torch.rand(6, 4) < 0.5 for _ in range(3)]} if strategy == "entities"
          else {"labels": torch.tensor([0, 0, 1, 1, 2, 2])})
    with pytest.raises(ValueError, match=r"anchors contains NaN or infinity in 1 row\(s\) \(first: row 2\)"):
        medvl.triplet_mining(x, strategy=strategy, **kw)
    with pytest.raises(ValueError, match="candidates contains NaN"):
        medvl.triplet_mining(torch.randn(6, 3, dtype=dtype), x.clone().fill_(float("inf")), strategy=strategy,
                             **{k: v for k, v in kw.items()})
    with pytest.raises(ValueError, match="NaN or infinity"):
        medvl.nn.TripletLoss()(x, kw.get("labels", torch.tensor([0, 0, 1, 1, 2, 2])))


def test_the_reference_never_returns_an_index_out_of_range():
    # Even fed a NaN directly (below the op's check), "found" means an index was found.
    x = torch.randn(5, 2, dtype=torch.float64)
    x[1] = float("nan")
    mined = reference_mining(x, labels=torch.tensor([0, 0, 1, 1, 0]))
    for t in mined:
        assert ((t >= 0) & (t < 5)).all(), mined


# --------------------------------------------------------------------------------------------
# The CUDA semi-hard tile algorithm, emulated on the host: csrc/triplet_mining/mining_tile.h is the
# code the kernel runs; semi_hard_emulation.cpp runs its phases thread by thread.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def semi_hard_emulation(tmp_path_factory):
    import shutil
    import subprocess

    from tests.utils import REPO_ROOT

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler for the host emulation")
    binary = tmp_path_factory.mktemp("emulation") / "semi_hard_emulation"
    csrc = f"{REPO_ROOT}/csrc"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", f"-I{csrc}",
                    f"{csrc}/triplet_mining/semi_hard_emulation.cpp", "-o", str(binary)], check=True)

    def run(x, c, labels, candidate_labels, offsets, positive, distance):
        import numpy

        folder = binary.parent
        sizes = torch.tensor([x.shape[0], c.shape[0], x.shape[1], DISTANCES.index(distance), positive.numel()])
        with open(folder / "in.bin", "wb") as f:
            for t in (sizes, x.float(), c.float(), labels, candidate_labels, offsets, positive):
                f.write(t.contiguous().numpy().tobytes())
        subprocess.run([str(binary), str(folder / "in.bin"), str(folder / "out.bin")], check=True)
        return torch.from_numpy(numpy.fromfile(folder / "out.bin", dtype=numpy.int64))

    return run


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("case", ["within-2-classes", "paired-7-classes", "one-class", "shuffled-pairs"])
def test_cuda_semi_hard_tile_algorithm_in_host_emulation(semi_hard_emulation, distance, case):
    # 150 rows in two classes: ~75 positives per anchor, ~4800 pairs per 64-anchor tile, so chunks of
    # 1024 pairs end inside anchors' pair ranges; 150 and 131 are not multiples of the 64-wide tiles;
    # duplicated rows tie d(i, p) with negatives' distances exactly.
    from medvl.ops._labels import same_label_pairs

    classes = {"within-2-classes": 2, "paired-7-classes": 7, "one-class": 1, "shuffled-pairs": 3}[case]
    data = make(140, 9, seed=21, classes=classes, n_candidates=121)
    x = torch.cat([data["x"], data["x"][:10]])
    labels = torch.cat([data["labels"], data["labels"][:10]])
    within = case != "paired-7-classes"
    c = x if within else torch.cat([data["c"], x[:10]])
    candidate_labels = labels if within else torch.cat([data["candidate_labels"], labels[:10]])
    offsets, pair_anchor, pair_positive = same_label_pairs(labels, candidate_labels, within)
    if case == "shuffled-pairs":  # the kernel takes any order of an anchor's pairs
        order = torch.cat([offsets[i] + torch.randperm(int(offsets[i + 1] - offsets[i]),
                                                       generator=torch.Generator().manual_seed(i))
                           for i in range(x.shape[0])])
        pair_anchor, pair_positive = pair_anchor[order], pair_positive[order]
    negative = semi_hard_emulation(x, c, labels, candidate_labels, offsets, pair_positive, distance)
    assert (negative >= -1).all(), "a pair's output was never written"
    expected = reference_mining(x, None if within else c, labels=labels,
                                candidate_labels=None if within else candidate_labels, strategy="semi_hard",
                                distance=distance)
    if case == "one-class":
        assert (negative == -1).all() and expected.anchor.numel() == 0
        return
    assert pair_positive.numel() > (1024 if classes <= 3 else 0)
    keep = negative >= 0
    ours = (pair_anchor[keep], pair_positive[keep], negative[keep])
    if case == "shuffled-pairs":  # back to the reference's (anchor, positive) order
        order = torch.argsort(ours[0] * c.shape[0] + ours[1])
        ours = tuple(t[order] for t in ours)
    assert_same(ours, expected, f"host emulation of the CUDA semi-hard tile, {case}, {distance}")
