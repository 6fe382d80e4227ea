"""Chunk exchange between ranks for the losses that see every rank's texts.

Two schedules over a process group of W ranks, both keeping at most two remote chunks resident:
- ring: chunks travel rank -> rank + 1; the next chunk's transfer is posted before the current
  chunk's kernel runs. A gradient accumulator travels one step behind its chunk, each rank adding
  its contribution, and arrives at the chunk's owner after W hops.
- allgather: owner by owner, a chunk is broadcast (the next one prefetched) and its gradient is
  reduced back to the owner.
Works with gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Chunk = Tuple[torch.Tensor, ...]  # the tensors that travel together (features, labels)


def world_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


_HOST_GROUPS: dict = {}


def host_group(group):
    """A group over `group`'s ranks that exchanges CPU tensors: `group` itself when its backend
    takes them (gloo, or "cpu:gloo,cuda:nccl"), else one gloo group over the world, made once, at
    the first call (every rank makes it there: the losses run on every rank). None for an NCCL
    subgroup, whose ranks alone could not make a new group."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend:
        return group
    if group is not None and group is not dist.group.WORLD:
        return None
    if "world" not in _HOST_GROUPS:
        _HOST_GROUPS["world"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["world"]


def all_gather_sizes(values: Sequence[int], group, device: torch.device) -> torch.Tensor:
    """(world, len(values)) int64 of every rank's `values`, on the CPU.

    The sizes are host facts (they shape the receive buffers), so they travel through a host group:
    gathering them on the GPU and reading them back would make the CPU wait for every kernel queued
    before the loss, each step. Only an NCCL subgroup takes that path."""
    host = host_group(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device="cpu" if host is not None else device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group if host is None else host)
    return torch.stack(out).cpu()


def all_gather_scalar(value: torch.Tensor, group) -> torch.Tensor:
    mine = value.detach().reshape(1).float()
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.cat(out)


class _Pending:
    """Handles of posted transfers, waited for once."""

    def __init__(self, works: Optional[List] = None):
        self.works = works or []

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


def _exchange(send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], to_rank: int, from_rank: int, group) -> _Pending:
    # Batched so that NCCL groups the send and the receive (no ring deadlock); gloo posts both.
    ops = [dist.P2POp(dist.isend, tensor, to_rank, group) for tensor in send]
    ops += [dist.P2POp(dist.irecv, tensor, from_rank, group) for tensor in recv]
    return _Pending(dist.batch_isend_irecv(ops) if ops else [])


def ring_pass(
    own: Chunk,
    chunk_like: Callable[[int], Chunk],
    gradient_like: Callable[[int], torch.Tensor],
    process: Callable[[int, Chunk], Optional[torch.Tensor]],
    group,
) -> Optional[torch.Tensor]:
    """Visit every rank's chunk in ring order; return the summed gradient of this rank's chunk.

    chunk_like(owner) / gradient_like(owner) give empty receive buffers shaped like `owner`'s chunk
    and its gradient; process(owner, chunk) runs the kernel and returns this rank's contribution to
    that chunk's gradient (None when no gradient is wanted).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world)
    recv_from = dist.get_global_rank(group, (rank - 1) % world)
    current = own
    incoming_gradient: Optional[torch.Tensor] = None
    gradient_transfer = _Pending()
    for step in range(world):
        owner = (rank - step) % world
        following: Optional[Chunk] = None
        chunk_transfer = _Pending()
        if step < world - 1:
            following = chunk_like((owner - 1) % world)
            chunk_transfer = _exchange(current, following, send_to, recv_from, group)
        contribution = process(owner, current)
        if contribution is not None:
            gradient_transfer.wait()
            if incoming_gradient is not None:
                contribution = incoming_gradient.add_(contribution)
            # The accumulator goes on to the next rank, which holds this chunk at its next step;
            # after the last step it is this rank's own chunk's gradient that arrives.
            incoming_gradient = gradient_like((owner - 1) % world)
            gradient_transfer = _exchange([contribution], [incoming_gradient], send_to, recv_from, group)
        chunk_transfer.wait()
        if following is not None:
            current = following
    gradient_transfer.wait()
    return incoming_gradient


def broadcast_pass(
    own: Chunk,
    chunk_like: Callable[[int], Chunk],
    process: Callable[[int, Chunk], Optional[torch.Tensor]],
    group,
) -> Optional[torch.Tensor]:
    """Visit every rank's chunk by broadcasts from its owner; return this rank's chunk's summed gradient."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)

    def fetch(owner: int) -> Tuple[Chunk, _Pending]:
        chunk = own if owner == rank else chunk_like(owner)
        source = dist.get_global_rank(group, owner)
        works = [dist.broadcast(tensor, source, group=group, async_op=True) for tensor in chunk]
        return chunk, _Pending(works)

    gradient: Optional[torch.Tensor] = None
    reductions: List[Tuple[torch.Tensor, _Pending]] = []
    current, transfer = fetch(0)
    for owner in range(world):
        transfer.wait()
        if owner + 1 < world:
            following, transfer = fetch(owner + 1)
        contribution = process(owner, current)
        if contribution is not None:
            work = dist.reduce(contribution, dist.get_global_rank(group, owner), group=group, async_op=True)
            reductions.append((contribution, _Pending([work])))
            if owner == rank:
                gradient = contribution
            # Bound the buffers in flight to two.
            while len(reductions) > 2:
                reductions.pop(0)[1].wait()
        if owner + 1 < world:
            current = following
    for _, pending in reductions:
        pending.wait()
    return gradient

