"""Collectives of the losses and the standardisation over the ranks of a process group.

With ``group=None`` (one process) each is the identity. The losses return each rank's share of a
global mean (:func:`ddp_mean`) because DistributedDataParallel averages the ranks' gradients.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce_sum", "attached_zero", "ddp_mean", "gather_with_grad", "global_sum", "world_size"]


def world_size(group) -> int:
    """The number of ranks of ``group``; 1 for None."""
    if group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size(group)


def global_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks of ``group`` (a constant: no gradient); ``x`` itself without one."""
    if world_size(group) == 1:
        return x
    import torch.distributed as dist
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; backward sums the ranks' gradients, since every rank's loss depends
    on the global sum (DistributedDataParallel then averages, as for the other losses' shares)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks of ``group`` (more than one), differentiable on every rank."""
    return _AllReduceSum.apply(x, group)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and hands each
    rank its own slice. All-reduce, not reduce-scatter, so that gloo (which has no reduce-scatter)
    runs it too; the features are (B, D), so the extra traffic is small."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenation over the ranks of ``group`` of ``x`` (same shape on every rank); gradients flow
    back to the rank that owns each slice, summed over every rank's loss."""
    if not x.requires_grad:
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)
    return _GatherWithGrad.apply(x, group)


def ddp_mean(local_sum: torch.Tensor, local_count: torch.Tensor, group) -> torch.Tensor:
    """This rank's share of a mean over every rank's entries, scaled for DistributedDataParallel.

    DDP averages gradients over the W ranks, so each rank returns ``W * local_sum / global_count``:
    the average of those is ``global_sum / global_count``, the loss one process would compute on
    the whole batch, and so are its gradients.
    """
    count = global_sum(local_count.to(local_sum.dtype), group)
    return local_sum * world_size(group) / count


def attached_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that stays attached to the graph of ``tensors``: the loss of a batch with nothing to average,
    through which backward() (and, under DDP, every rank's gradient all-reduce) still runs."""
    return sum(t.sum() * 0.0 for t in tensors)
