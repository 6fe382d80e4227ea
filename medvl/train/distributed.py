"""The process group of a training run: one process, or ``torchrun`` ranks (gloo on CPU, NCCL on GPU).

``torchrun --nproc_per_node N -m medvl train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them. Several machines work the
same way through torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``): nothing here depends on
the ranks sharing a host.

Each rank reads its own slice of every global batch (:func:`rank_slice`), so W ranks with
``batch_size`` B see the same W·B samples per step as one process with batch W·B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

__all__ = ["DistributedContext", "init_distributed", "rank_slice"]


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None           # the process group the losses gather over; None for one process
    owns_group: bool = False    # we called init_process_group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.group)

    def mean(self, value: float, device) -> float:
        """``value`` averaged over the ranks (a plain float on every rank)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, group=self.group)
        return float(t) / self.world_size

    def average_gradients(self, parameters) -> None:
        """Average the gradients of parameters DDP does not own (the loss module's) over the ranks."""
        if not self.enabled:
            return
        for p in parameters:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, group=self.group)
                p.grad.div_(self.world_size)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str) -> DistributedContext:
    """The context of this process: torchrun's environment when ``WORLD_SIZE`` > 1, else one process.

    ``device`` "cpu" uses gloo, "cuda" NCCL with this rank's GPU ``LOCAL_RANK``. A process group that
    the caller already initialised is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with "
                               "torchrun --nproc_per_node N -m medvl train ...")
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              group=dist.group.WORLD, owns_group=owns)


def rank_slice(indices, rank: int, world_size: int, batch_size: int, start_batch: int = 0):
    """This rank's sample indices, global batch by global batch, from global batch ``start_batch``.

    Global batch g is ``indices[g*W*B : (g+1)*W*B]``; rank r takes its r-th block of B. Incomplete
    global batches at the end are dropped.
    """
    global_batch = world_size * batch_size
    out = []
    for g in range(start_batch, len(indices) // global_batch):
        first = g * global_batch + rank * batch_size
        out.extend(indices[first:first + batch_size])
    return out


def device_for(ctx: DistributedContext, device: str) -> Optional[torch.device]:
    """The torch device of this rank: ``cuda:LOCAL_RANK`` when ``device`` is "cuda" under torchrun."""
    if str(device) == "cuda" and ctx.enabled:
        return torch.device("cuda", ctx.local_rank)
    return torch.device(device)
