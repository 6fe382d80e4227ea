"""medvl bench: batch-hard mining against pytorch-metric-learning and the reference."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from medvl.bench.harness import BENCH_LABELS, Measurement, measure

# ---------------------------------------------------------------------------------------------
# triplet_mining
# ---------------------------------------------------------------------------------------------


def triplet_mining_methods(device: torch.device) -> Dict[str, Callable]:
    """name -> miner(embeddings, labels) for batch-hard mining, every method runnable here."""
    from medvl.ops import triplet_mining
    from medvl.ops.triplet_mining import BACKENDS
    from medvl.reference.triplet_mining import triplet_mining as reference_mining

    methods: Dict[str, Callable] = {}
    probe = torch.empty(1, 1, device=device)
    for name in ("cuda", "triton", "cpu"):
        if not BACKENDS[name].reasons(probe, 0) and not (name == "triton" and device.type == "cpu"):
            methods[f"medvl-{name}"] = lambda x, y, name=name: triplet_mining(x, labels=y, backend=name)
    methods["reference"] = lambda x, y: reference_mining(x, labels=y)
    try:
        from pytorch_metric_learning import distances, miners

        miner = miners.BatchHardMiner(distance=distances.LpDistance(normalize_embeddings=False))
        methods["pytorch-metric-learning"] = lambda x, y: miner(x, y)
    except ImportError:
        pass
    return methods


def bench_triplet_mining(n: int, dim: int, dtype: torch.dtype, device: torch.device, repeats: int,
                         methods: Optional[List[str]] = None) -> List[Measurement]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, dim, generator=generator).to(device, dtype)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=generator).to(device)
    results = []
    for name, miner in triplet_mining_methods(device).items():
        if methods and name not in methods:
            continue
        results.append(measure(BENCH_LABELS["triplet_mining"], f"B={n} D={dim} {str(dtype)[6:]}", name,
                               lambda miner=miner: miner(x, labels), device, repeats, 2.0 * n * n * dim))
    return results


