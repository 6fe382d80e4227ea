"""Standardisation of the projected embeddings: batch statistics with gradient (one process and 2 gloo ranks),
stored statistics for single samples, folding into an affine head."""

import socket

import pytest
import torch

from medvl.nn.standardize import FeatureStandardizer, batch_statistics, standardize


def test_batch_statistics_match_batchnorm_in_value_and_gradient():
    torch.manual_seed(0)
    x = (torch.randn(12, 5) * torch.tensor([1.0, 2.0, 0.1, 3.0, 1.0]) + 4.0).double().requires_grad_()
    y = x.detach().clone().requires_grad_()
    weights = torch.randn(12, 5, dtype=torch.float64)
    ours = standardize(x, *batch_statistics(x))
    theirs = torch.nn.functional.batch_norm(y, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-5, rtol=1e-5)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4)


def test_stored_statistics_standardise_one_sample_as_its_population():
    torch.manual_seed(1)
    population = torch.randn(200, 6) * 3 + torch.arange(6.0)
    s = FeatureStandardizer(6)
    single = population[:1]
    torch.testing.assert_close(s(single), single / (1 + s.eps) ** 0.5)  # uncalibrated: (almost) the identity
    s.calibrate(population)
    assert int(s.num_samples) == 200
    torch.testing.assert_close(s(single), standardize(single, population.mean(0), population.var(0, unbiased=False)))
    batch_of_one = s(single)
    # the same sample in any batch gets the same embedding: the stored statistics never look at the batch
    torch.testing.assert_close(s(torch.cat([single, population[5:9]]))[:1], batch_of_one)
    with pytest.raises(ValueError, match="features"):
        s(torch.zeros(2, 5))


def test_fold_is_projection_then_standardisation():
    torch.manual_seed(2)
    s = FeatureStandardizer(4)
    weight = torch.randn(4, 7)
    x = torch.randn(30, 7)
    s.calibrate(x @ weight.t())
    folded, bias = s.fold(weight)
    torch.testing.assert_close(x @ folded.t() + bias, s(x @ weight.t()), atol=1e-5, rtol=1e-5)


def _rank(rank, world, port, chunks, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = chunks[rank].clone().requires_grad_()
    weights = torch.arange(x.numel(), dtype=x.dtype).reshape(x.shape) / 10.0
    out = standardize(x, *batch_statistics(x, dist.group.WORLD))
    # each rank returns its share of the global sum, as the training losses do under DDP (which averages)
    loss = (out * weights).sum() * world
    loss.backward()
    results[rank] = (out.detach(), x.grad / world)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_standardise_as_one_process():
    """SyncBatchNorm-style statistics: 2 ranks x 3 rows = one process x 6 rows, in value and gradient."""
    import torch.multiprocessing as mp

    torch.manual_seed(3)
    full = (torch.randn(6, 4) * 2 + 1).double()
    chunks = list(full.chunk(2))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_rank, args=(2, port, chunks, results), nprocs=2, join=True, start_method="spawn")
    x = full.clone().requires_grad_()
    weights = torch.cat([torch.arange(c.numel(), dtype=x.dtype).reshape(c.shape) / 10.0 for c in chunks])
    out = standardize(x, *batch_statistics(x))
    (out * weights).sum().backward()
    for rank, rows in enumerate((slice(0, 3), slice(3, 6))):
        value, grad = results[rank]
        torch.testing.assert_close(value, out[rows].detach())
        torch.testing.assert_close(grad, x.grad[rows])
