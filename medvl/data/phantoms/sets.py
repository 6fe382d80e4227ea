"""Sets of phantoms: the seed of each phantom of a set, drawn from the set's seed, and the held-out seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from medvl.data.phantoms.ct import CTPhantom, make_ct_phantom
from medvl.data.phantoms.mr import MRPhantom, make_mr_phantom
from medvl.options import look_up_option

#: The seed of held-out phantom sets (evaluation, the trainer's diagnostics): phantom i of a set comes from
#: (seed, i), and training runs use small seeds, so no held-out phantom is ever trained on.
HELD_OUT_SEED = 100_000
# Each modality draws its phantoms' seeds from its own stream of the set's seed.
_STREAMS = {"ct": 1, "mr": 2}


def phantom_seeds(kind: str, seed: int, n: int) -> list[int]:
    """The seeds of the first ``n`` phantoms of ``kind`` "ct" or "mr" in the set of ``seed`` (prefix-stable: the
    first k do not depend on ``n``)."""
    look_up_option(kind, _STREAMS, name="kind")
    state = np.random.SeedSequence([int(seed), _STREAMS[kind]]).generate_state(max(int(n), 1), dtype=np.uint32)
    return [int(s) for s in state[: int(n)]]


def make_phantom_set(
    n_ct: int,
    n_mr: int,
    seed: int = 0,
    *,
    ct_kwargs: dict | None = None,
    mr_kwargs: dict | None = None,
    **kwargs: Any,
) -> tuple[list[CTPhantom], list[MRPhantom]]:
    """``n_ct`` CT and ``n_mr`` MR phantoms, deterministic by ``seed`` (and prefix-stable: the
    first k phantoms do not depend on n). Extra ``kwargs`` go to :func:`make_ct_phantom`;
    ``ct_kwargs``/``mr_kwargs`` go to the respective generator."""
    ct_kw = {**kwargs, **(ct_kwargs or {})}
    mr_kw = dict(mr_kwargs or {})
    cts = [make_ct_phantom(s, **ct_kw) for s in phantom_seeds("ct", seed, n_ct)]
    mrs = [make_mr_phantom(s, **mr_kw) for s in phantom_seeds("mr", seed, n_mr)]
    return cts, mrs
