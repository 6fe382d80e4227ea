"""medvl.sigmoid_loss across gloo ranks (spawned CPU processes) against open_clip and the reference."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.utils import spawn_ranks

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data(world, sizes, dim, target, seed=0):
    """Every rank's (images, texts, image labels, text labels), identical in every process."""
    generator = torch.Generator().manual_seed(seed)
    ranks = []
    for n in sizes[:world]:
        x = F.normalize(torch.randn(n, dim, generator=generator), dim=-1)
        t = F.normalize(torch.randn(n, dim, generator=generator) + 2 * x, dim=-1)
        if target == "label":
            labels = torch.randint(0, 3, (n,), generator=generator)
        elif target == "jaccard":
            labels = torch.rand(n, 11, generator=generator) < 0.2
        else:
            labels = None
        ranks.append((x, t, labels))
    return ranks


def _expected(ranks, rank, target, scale, bias):
    """Loss of rank `rank` and gradients (d own images, d own texts summed over every rank's loss, d scale, d bias)."""
    from medvl.reference.sigmoid_loss import sigmoid_loss as reference_loss

    leaves = [(x.double().requires_grad_(), t.double().requires_grad_()) for x, t, _ in ranks]
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    losses = []
    for r, (x, _) in enumerate(leaves):
        total = 0
        for q, (_, t) in enumerate(leaves):
            kwargs = {}
            if target != "pair":
                kwargs = dict(image_labels=ranks[r][2], text_labels=ranks[q][2])
            total = total + reference_loss(x, t, s, b, target=target, reduction="sum",
                                           diagonal_is_pair=(q == r), **kwargs)
        losses.append(total / x.shape[0])
    own_loss = losses[rank]
    d_scale, d_bias, d_image = torch.autograd.grad(own_loss, (s, b, leaves[rank][0]), retain_graph=True)
    d_text = torch.autograd.grad(sum(losses), leaves[rank][1])[0]
    return own_loss.detach(), d_image, d_text, d_scale, d_bias


def _run(rank, world, x, t, labels, target, mode, scale=10.0, bias=-10.0, grad_output=1.0):
    import medvl

    x = x.clone().requires_grad_()
    t = t.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    b = torch.tensor(bias, requires_grad=True)
    kwargs = {} if target == "pair" else dict(image_labels=labels, text_labels=labels)
    loss = medvl.sigmoid_loss(x, t, s, b, target=target, group=dist.group.WORLD, dist_mode=mode,
                              backend="cpu", **kwargs)
    (loss * grad_output).backward()
    return loss.detach(), x.grad, t.grad, s.grad, b.grad


def _close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=2e-5, msg=what)


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from open_clip.loss import SigLipLoss

        # 1. pair target, equal batches: open_clip's distributed SigLipLoss is the oracle.
        ranks = _data(world, [6] * world, 16, "pair", seed=1)
        x, t, _ = ranks[rank]
        xo, to = x.clone().requires_grad_(), t.clone().requires_grad_()
        so, bo = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
        peer_loss = SigLipLoss(rank=rank, world_size=world)(xo, to, so, bo)
        peer_loss.backward()
        peer = (peer_loss.detach(), xo.grad, to.grad, so.grad, bo.grad)
        for mode in ("ring", "allgather"):
            ours = _run(rank, world, x, t, None, "pair", mode)
            for name, a, e in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), ours, peer):
                _close(a, e, f"rank {rank} {mode} pair vs open_clip: {name}")

        # 2. label and jaccard targets with a different batch size on every rank.
        sizes = [5, 3, 7, 1]
        for target in ("label", "jaccard"):
            ranks = _data(world, sizes, 12, target, seed=2)
            x, t, labels = ranks[rank]
            expected = _expected(ranks, rank, target, 7.5, -3.0)
            for mode in ("ring", "allgather"):
                ours = _run(rank, world, x, t, labels, target, mode, scale=7.5, bias=-3.0)
                for name, a, e in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), ours, expected):
                    _close(a, e, f"rank {rank} {mode} {target}: {name}")

        # 3. Different grad_outputs on different ranks can't be honoured: a clear error on every rank.
        ranks = _data(world, [4] * world, 8, "pair", seed=3)
        x, t, _ = ranks[rank]
        try:
            _run(rank, world, x, t, None, "pair", "ring", grad_output=1.0 + rank)
        except RuntimeError as error:
            assert "same grad_output on every rank" in str(error), str(error)
        else:
            raise AssertionError("unequal grad_outputs across ranks were accepted")
        # 4. Under NCCL the batch sizes travel through a gloo group of their own (no GPU sync each
        # step). Pretend the group is NCCL: the sizes take that path, and the results stay the same.
        from medvl.ops import _exchange

        real_backend = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"
        try:
            ranks = _data(world, sizes, 12, "label", seed=2)
            x, t, labels = ranks[rank]
            expected = _expected(ranks, rank, "label", 7.5, -3.0)
            ours = _run(rank, world, x, t, labels, "label", "ring", scale=7.5, bias=-3.0)
            for name, a, e in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), ours, expected):
                _close(a, e, f"rank {rank} sizes through the host group: {name}")
            assert "world" in _exchange._HOST_GROUPS
        finally:
            dist.get_backend = real_backend
        # Every rank done before any tears its connections down (gloo aborts a peer still talking).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_open_clip_and_reference(world):
    pytest.importorskip("open_clip")
    spawn_ranks(_worker, world, world, _free_port())
