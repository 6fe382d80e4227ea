"""medvl::triplet_mining: batch-hard, semi-hard and MedTrim entity-score mining without B x B.

Batch-hard: Hermans et al., "In Defense of the Triplet Loss for Person Re-Identification" (2017).
Semi-hard: Schroff et al., "FaceNet" (CVPR 2015), as TensorFlow's semi-hard triplet loss defines it.
Entities: MedTrim (meta-entity-driven triplet mining): disease / adjective / direction entity sets
parsed from reports score how related two samples are.

The fused backends keep per-anchor running extrema while they sweep candidate tiles: nothing of
size B_anchor x B_candidate is allocated. The rules (ties included) are in
medvl/reference/triplet_mining.py, which every backend matches.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from medvl.ops import _core, _dispatch
from medvl.ops._core import _C
from medvl.ops._labels import pack_multi_hot, same_label_pairs, unpack_bits
from medvl.options import look_up_option
from medvl.reference import triplet_mining as reference
from medvl.reference.triplet_mining import DISTANCES, STRATEGIES, Triplets

OP = "triplet_mining"
ENTITY_KINDS = ("disease", "adjective", "direction")


# --------------------------------------------------------------------------------------------
# Backends. Per-anchor kernels (batch_hard, entities) return positive[B_a], negative[B_a]
# (-1: none); the semi-hard kernel takes the positive pairs as CSR and returns negative[P].
# --------------------------------------------------------------------------------------------


class _Inputs:
    """Validated inputs in kernel form."""

    def __init__(self, anchors, candidates, labels, candidate_labels, anchor_bits, candidate_bits, strategy,
                 distance, entity_words, weights, lo, hi, within):
        self.anchors, self.candidates = anchors, candidates
        self.labels, self.candidate_labels = labels, candidate_labels
        self.anchor_bits, self.candidate_bits = anchor_bits, candidate_bits
        self.strategy, self.distance = strategy, distance
        self.entity_words, self.weights, self.lo, self.hi = list(entity_words), list(weights), lo, hi
        self.within = within


def _compiled_per_anchor(inputs: _Inputs, pair_offsets=None, pair_positive=None):
    """The C++ (cpu) or CUDA kernel, same arguments: outputs allocated here with torch."""
    anchors, candidates = inputs.anchors, inputs.candidates
    on_cuda = anchors.device.type == "cuda"
    n_out = anchors.shape[0] if pair_positive is None else pair_positive.shape[0]
    positive = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    negative = torch.full((n_out,), -1, dtype=torch.int64, device=anchors.device)
    # The cpu kernel's workspace grows with the longest run of pairs; the CUDA one does not (and reading
    # it would be a device sync per call).
    longest = 0 if pair_offsets is None or on_cuda else int((pair_offsets[1:] - pair_offsets[:-1]).max())
    # Names become the codes of csrc/triplet_mining/triplet_mining.h here, at the compiled boundary.
    strategy, distance = STRATEGIES.index(inputs.strategy), DISTANCES.index(inputs.distance)
    sizes = (anchors.shape[0], candidates.shape[0], anchors.shape[1], strategy, longest)
    threads = _core.cpu_threads()
    nbytes = (_C.triplet_mining_cuda_workspace_bytes(*sizes) if on_cuda
              else _C.triplet_mining_cpu_workspace_bytes(*sizes, threads))
    scratch = _core.workspace(nbytes, anchors.device)
    words = inputs.entity_words + [0] * (3 - len(inputs.entity_words))
    weights = inputs.weights + [0.0] * (3 - len(inputs.weights))
    arguments = dict(
        anchors=anchors.data_ptr(), candidates=candidates.data_ptr(), n_anchor=anchors.shape[0],
        n_candidate=candidates.shape[0], dim=anchors.shape[1], dtype=_core.DTYPE_CODES[anchors.dtype],
        strategy=strategy, distance=distance, within=inputs.within,
        labels=_core.pointer(inputs.labels), candidate_labels=_core.pointer(inputs.candidate_labels),
        anchor_bits=_core.pointer(inputs.anchor_bits), candidate_bits=_core.pointer(inputs.candidate_bits),
        entity_words=words, entity_weights=weights, score_low=inputs.lo, score_high=inputs.hi,
        pair_offsets=_core.pointer(pair_offsets), pair_positive=_core.pointer(pair_positive),
        positive=positive.data_ptr(), negative=negative.data_ptr(), workspace=scratch.data_ptr(),
        workspace_bytes=scratch.numel(),
    )
    if on_cuda:
        with torch.cuda.device(anchors.device):
            _C.triplet_mining_cuda(torch.cuda.current_stream(anchors.device).cuda_stream, **arguments)
    else:
        _C.triplet_mining_cpu(threads, **arguments)
    return positive, negative


def _triton_per_anchor(inputs: _Inputs, pair_offsets=None, pair_positive=None, block_overrides=None):
    from medvl.kernels import triplet_mining as triton_kernels

    cosine = inputs.distance == "cosine"
    anchor_norms = reference.row_norms(inputs.anchors, cosine)
    candidate_norms = anchor_norms if inputs.within else reference.row_norms(inputs.candidates, cosine)
    return triton_kernels.triplet_mining_forward(**vars(inputs), anchor_norms=anchor_norms,
                                                 candidate_norms=candidate_norms, pair_offsets=pair_offsets,
                                                 pair_positive=pair_positive, block_overrides=block_overrides)


def _run_fused(kernel, inputs: _Inputs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    arange = torch.arange(inputs.anchors.shape[0], device=inputs.anchors.device)
    if inputs.strategy != "semi_hard":
        positive, negative = kernel(inputs)
        keep = (positive >= 0) & (negative >= 0)
        return arange[keep], positive[keep], negative[keep]
    offsets, pair_anchor, pair_positive = same_label_pairs(inputs.labels, inputs.candidate_labels, inputs.within)
    if pair_positive.numel() == 0:  # no positive pair: nothing to mine (and an empty output has no pointer)
        return pair_anchor, pair_positive, pair_positive.clone()
    _, negative = kernel(inputs, offsets, pair_positive)
    keep = negative >= 0
    return pair_anchor[keep], pair_positive[keep], negative[keep]


def _run_reference(inputs: _Inputs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    entities = candidate_entities = None
    if inputs.strategy == "entities":
        def split(bits):
            sets, start = [], 0
            for width in inputs.entity_words:
                sets.append(unpack_bits(bits[:, start:start + width]))
                start += width
            return sets

        entities, candidate_entities = split(inputs.anchor_bits), split(inputs.candidate_bits)
    mined = reference.triplet_mining(
        inputs.anchors, None if inputs.within else inputs.candidates,
        labels=inputs.labels, candidate_labels=None if inputs.within else inputs.candidate_labels,
        entities=entities, candidate_entities=None if inputs.within else candidate_entities,
        strategy=inputs.strategy, distance=inputs.distance, entity_weights=inputs.weights,
        score_range=(inputs.lo, inputs.hi),
    )
    return tuple(mined)


_RUNNERS = {
    "cpu": lambda inputs: _run_fused(_compiled_per_anchor, inputs),
    "triton": lambda inputs: _run_fused(_triton_per_anchor, inputs),
    "cuda": lambda inputs: _run_fused(_compiled_per_anchor, inputs),
    "reference": _run_reference,
}


def _cpu_reasons(anchors, strategy) -> List[str]:
    return _core.cpu_backend_reasons(anchors, "triplet_mining_cpu")


def _triton_reasons(anchors, strategy) -> List[str]:
    return _core.triton_backend_reasons(anchors, OP)


def _cuda_reasons(anchors, strategy) -> List[str]:
    return _core.cuda_backend_reasons(anchors, "triplet_mining_cuda")


BACKENDS = {
    "cpu": _dispatch.Backend("cpu", _cpu_reasons),
    "cuda": _dispatch.Backend("cuda", _cuda_reasons),
    "triton": _dispatch.Backend("triton", _triton_reasons),
    "reference": _dispatch.Backend("reference", lambda anchors, strategy: []),
}


# --------------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("medvl::triplet_mining", mutates_args=())
def triplet_mining_op(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    labels: Optional[torch.Tensor],
    candidate_labels: Optional[torch.Tensor],
    anchor_bits: Optional[torch.Tensor],
    candidate_bits: Optional[torch.Tensor],
    strategy: str,
    distance: str,
    entity_words: List[int],
    entity_weights: List[float],
    score_low: float,
    score_high: float,
    within: bool,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) int64 indices; mining has no gradient."""
    inputs = _Inputs(anchors, candidates, labels, candidate_labels, anchor_bits, candidate_bits, strategy, distance,
                     entity_words, entity_weights, score_low, score_high, within)
    anchor, positive, negative = _RUNNERS[backend](inputs)
    return anchor.clone(), positive.clone(), negative.clone()


@triplet_mining_op.register_fake
def _(anchors, candidates, labels, candidate_labels, anchor_bits, candidate_bits, strategy, distance, entity_words,
      entity_weights, score_low, score_high, within, backend):
    count = torch.library.get_ctx().new_dynamic_size()
    return tuple(anchors.new_empty(count, dtype=torch.int64) for _ in range(3))


# --------------------------------------------------------------------------------------------
# Validation and the public function.
# --------------------------------------------------------------------------------------------


def _check_embeddings(anchors, candidates) -> None:
    for name, tensor in (("anchors", anchors), ("candidates", candidates)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch; pass at least one row")
    if candidates is not None:
        if candidates.shape[1] != anchors.shape[1]:
            raise ValueError(f"anchors and candidates must have the same dim, got {anchors.shape[1]} and "
                             f"{candidates.shape[1]}")
        if candidates.dtype != anchors.dtype:
            raise TypeError(f"anchors ({anchors.dtype}) and candidates ({candidates.dtype}) must have one dtype")
        if candidates.device != anchors.device:
            raise ValueError(f"anchors are on {anchors.device} and candidates on {candidates.device}")


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """Mining compares distances: a NaN or an infinity makes every comparison with it false, and the
    triplets arbitrary. On a GPU the check is an asynchronous device assert (no host sync)."""
    if tensor.device.type == "cuda":
        torch._assert_async(torch.isfinite(tensor).all(),
                            f"medvl.triplet_mining: {name} contains NaN or infinity; mining needs finite embeddings")
        return
    finite = torch.isfinite(tensor)
    if not finite.all():
        rows = (~finite).any(1).nonzero().flatten()
        raise ValueError(f"{name} contains NaN or infinity in {rows.numel()} row(s) (first: row {rows[0].item()}); "
                         "mining needs finite embeddings: check the model's outputs or the loss scale")


def _check_class_labels(name: str, labels, rows: int, device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels.to(torch.int64).contiguous()


def _check_entities(name: str, entities, rows: int, device) -> List[torch.Tensor]:
    if not isinstance(entities, (tuple, list)) or len(entities) != 3:
        raise ValueError(f"{name} must be three multi-hot tensors ({', '.join(ENTITY_KINDS)}), got "
                         f"{type(entities).__name__} of length {len(entities) if hasattr(entities, '__len__') else '?'}")
    checked = []
    for kind, sets in zip(ENTITY_KINDS, entities):
        if not isinstance(sets, torch.Tensor) or sets.dim() != 2 or sets.shape[0] != rows:
            shape = tuple(sets.shape) if isinstance(sets, torch.Tensor) else type(sets).__name__
            raise ValueError(f"{name} {kind} sets must be a ({rows}, K) multi-hot tensor, got {shape}")
        if sets.is_floating_point() or sets.is_complex():
            raise TypeError(f"{name} {kind} sets must be bool (or integer 0/1), got {sets.dtype}")
        if sets.device != device:
            raise ValueError(f"{name} {kind} sets are on {sets.device} but the embeddings are on {device}")
        checked.append(sets)
    return checked


def triplet_mining(
    anchors: torch.Tensor,
    candidates: Optional[torch.Tensor] = None,
    *,
    labels: Optional[torch.Tensor] = None,
    candidate_labels: Optional[torch.Tensor] = None,
    entities: Optional[Sequence[torch.Tensor]] = None,
    candidate_entities: Optional[Sequence[torch.Tensor]] = None,
    strategy: str = "batch_hard",
    distance: str = "euclidean",
    entity_weights: Sequence[float] = (0.85, 0.10, 0.05),
    score_range: Tuple[float, float] = (0.25, 0.6),
    backend: Optional[str] = None,
) -> Triplets:
    """Mine (anchor, positive, negative) triplets without materialising a distance matrix.

    Args:
        anchors: (B_a, D) embeddings. float32/bfloat16/float16 run fused; others on the reference.
        candidates: (B_c, D) embeddings to mine from (e.g. texts for image anchors); anchor i and
            candidate i are a pair. None mines within ``anchors`` (an anchor is never its own positive).
        labels, candidate_labels: int class ids; positives share a label. Default: ``arange``
            (only the pair is positive). candidate_labels defaults to labels for paired batches.
        entities, candidate_entities: for ``strategy="entities"``: (disease, adjective, direction)
            multi-hot bool tensors of shape (B, K_kind).
        strategy: "batch_hard", "semi_hard" or "entities" (rules and tie-breaking in
            ``medvl.reference.triplet_mining``).
        distance: "euclidean", "squared_euclidean" or "cosine" (1 - cos). Nothing is normalised.
        entity_weights: weights of the disease, adjective and direction IoUs in the score.
        score_range: [lo, hi) of scores a negative may have.

    Exactness: entity scores are compared exactly, as fractions (the weights and the range are read
    as the nearest fractions with denominators up to 10^6: 0.85 is 17/20), so scores equal in exact
    arithmetic tie on every backend, device and machine; a ValueError says when the weights' common
    denominator and the set sizes are too large for that. Distances are float32: the cpu backend
    gives the same bits on every x86 machine, and all backends agree bit for bit when the dot
    products are exact; otherwise near-equal distances may order differently across backends (see
    ``medvl.reference.triplet_mining``).

    Example:
        >>> emb, labels = torch.randn(16, 8), torch.randint(0, 4, (16,))
        >>> anchor, positive, negative = triplet_mining(emb, labels=labels)
    """
    _check_embeddings(anchors, candidates)
    _check_finite("anchors", anchors)
    if candidates is not None:
        _check_finite("candidates", candidates)
    look_up_option(strategy, STRATEGIES, name="strategy")
    look_up_option(distance, DISTANCES, name="distance")
    within = candidates is None
    anchors = anchors.contiguous()
    candidates = anchors if within else candidates.contiguous()
    n_anchor, n_candidate = anchors.shape[0], candidates.shape[0]
    device = anchors.device
    labels_in = candidate_labels_in = bits = candidate_bits = None
    words: List[int] = []
    weights = [float(w) for w in entity_weights]
    low, high = (float(v) for v in score_range)

    if strategy == "entities":
        if labels is not None or candidate_labels is not None:
            raise ValueError("labels are not used with strategy='entities' (the entity scores decide); drop them")
        if entities is None:
            raise ValueError("strategy='entities' needs entities=(disease, adjective, direction) multi-hot tensors")
        if len(weights) != 3 or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"entity_weights must be three finite numbers, got {tuple(entity_weights)}")
        if not low < high:
            raise ValueError(f"score_range must be (lo, hi) with lo < hi, got {tuple(score_range)}")
        sets = _check_entities("entities", entities, n_anchor, device)
        if within:
            candidate_sets = sets
        else:
            if candidate_entities is None:
                if n_candidate != n_anchor:
                    raise ValueError("candidate_entities are needed when candidates and anchors differ in size")
                candidate_entities = entities
            candidate_sets = _check_entities("candidate_entities", candidate_entities, n_candidate, device)
        for kind, a, c in zip(ENTITY_KINDS, sets, candidate_sets):
            if a.shape[1] != c.shape[1]:
                raise ValueError(f"entities and candidate_entities {kind} sets differ in width: "
                                 f"{a.shape[1]} and {c.shape[1]}")
        scoring = reference.entity_scoring(weights, (low, high))
        problem = reference.check_entity_scoring(scoring, reference.union_bounds(sets, candidate_sets, tight=False))
        if problem:  # the widths are too loose a bound: measure the sets (one device sync)
            problem = reference.check_entity_scoring(
                scoring, reference.union_bounds([s.to(torch.int32) for s in sets],
                                                [s.to(torch.int32) for s in candidate_sets], tight=True))
        if problem:
            raise ValueError(f"{problem} (entity_weights={tuple(entity_weights)}, score_range={tuple(score_range)})")
        # The kernels take the integer form: weights x denominator and the range x denominator.
        weights = [float(w) for w in scoring.weights]
        low, high = float(scoring.low), float(scoring.high)
        packed = [pack_multi_hot(s) for s in sets]
        words = [p.shape[1] for p in packed]
        bits = torch.cat(packed, 1).contiguous()
        candidate_bits = bits if within else torch.cat([pack_multi_hot(s) for s in candidate_sets], 1).contiguous()
    else:
        if entities is not None or candidate_entities is not None:
            raise ValueError(f"entities are only used with strategy='entities', not {strategy!r}")
        if labels is None:
            labels_in = torch.arange(n_anchor, device=device)
        else:
            labels_in = _check_class_labels("labels", labels, n_anchor, device)
        if within:
            if candidate_labels is not None:
                raise ValueError("candidate_labels need candidates; without candidates, mining is within anchors")
            candidate_labels_in = labels_in
        elif candidate_labels is not None:
            candidate_labels_in = _check_class_labels("candidate_labels", candidate_labels, n_candidate, device)
        elif labels is None:
            candidate_labels_in = torch.arange(n_candidate, device=device)
        elif n_candidate == n_anchor:
            candidate_labels_in = labels_in
        else:
            raise ValueError("candidate_labels are needed when candidates and anchors differ in size")

    chosen = _dispatch.choose_backend(OP, BACKENDS, backend, device, anchors, strategy)
    with torch.no_grad():
        mined = torch.ops.medvl.triplet_mining(
            anchors.detach(), candidates.detach(), labels_in, candidate_labels_in, bits, candidate_bits, strategy,
            distance, words, weights, low, high, within, chosen,
        )
    return Triplets(*mined)
