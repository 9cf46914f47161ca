"""The gradient exchange over real gloo processes: summed during the last backward, equal to
the full-batch gradient computed here with torch's own loss, whatever the shares."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.run.target_batch import target_batch_step

TARGET = 12


def wide_mlp() -> nn.Module:
    """Three buckets: the head and the middle bias, the 2 MiB middle weight alone, the rest."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 5)).double()


class SharedTwice(nn.Module):
    """One layer used twice, each time under reentrant checkpointing: its gradient is
    accumulated twice in one backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.inner = nn.Linear(16, 16).double(), nn.Linear(16, 16).double()
        self.head = nn.Linear(16, 5).double()

    def forward(self, x):
        x = self.stem(x)  # reentrant checkpointing needs an input that requires a gradient
        for _ in range(2):
            x = checkpoint(lambda t: torch.tanh(self.inner(t)), x, use_reentrant=True)
        return self.head(x)


def batches(step: int):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(TARGET, 16, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 5, (TARGET,), generator=generator)


def rank_main(rank: int, port: int, make_model, shares, micro, results: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=len(shares))
    model = make_model()
    ranks = Ranks(World(rank=rank, size=len(shares), is_launched=True), torch.device("cpu"))
    micro_step = MicroStep(model, cross_entropy(), torch.device("cpu"), torch.float64)
    start = sum(shares[:rank])
    steps = []
    for step in range(3):
        x, y = batches(step)
        mine = range(start, start + shares[rank])
        pieces = [(x[i:i + micro[rank]], y[i:i + micro[rank]])
                  for i in range(mine.start, mine.stop, micro[rank])]
        target_batch_step(micro_step, pieces, ranks)
        exchange = ranks.exchange(model)
        steps.append(({k: p.grad.clone() for k, p in model.named_parameters()},
                      exchange.overlapped, exchange.overlaps))
        model.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(steps, results)
    dist.destroy_process_group()


def exchanged(make_model, shares, micro, folder: Path):
    """Rank 0's gradients, buckets summed during the backward and whether it overlaps, for
    three target batches over len(shares) ranks."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = folder / "steps.pt"
    mp.spawn(rank_main, args=(port, make_model, shares, micro, results), nprocs=len(shares))
    return torch.load(results)


def full_batch_gradient(make_model, step: int) -> dict[str, torch.Tensor]:
    model = make_model()
    x, y = batches(step)
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("shares, micro", [
    ([6, 6], [2, 3]),  # even shares, 3 and 2 micro-batches
    ([12, 0], [5, 4]),  # one rank has it all, uneven micro-batches; the other an empty share
    ([7, 1, 4], [7, 1, 3]),  # three ranks, one micro-batch on two of them
], ids=["even", "empty-share", "three-ranks"])
def test_the_exchange_sums_during_the_backward_to_the_full_batch_gradient(tmp_path, shares,
                                                                          micro):
    steps = exchanged(wide_mlp, shares, micro, tmp_path)
    for step, (grads, overlapped, overlaps) in enumerate(steps):
        expected = full_batch_gradient(wide_mlp, step)
        for name, grad in expected.items():
            assert torch.allclose(grads[name], grad, rtol=1e-10, atol=1e-13), (step, name)
        if step:  # the first target batch watches; then buckets start during the backward
            assert overlaps and overlapped >= 2, (step, overlapped)


@pytest.mark.slow
def test_a_gradient_accumulated_twice_in_a_backward_is_summed_after_it(tmp_path):
    """Reentrant checkpointing accumulates the shared layer's gradient twice: seen on the
    first target batch, the exchange waits for the backward from then on, and stays exact."""
    steps = exchanged(SharedTwice, [6, 6], [3, 2], tmp_path)
    for step, (grads, overlapped, overlaps) in enumerate(steps):
        expected = full_batch_gradient(SharedTwice, step)
        for name, grad in expected.items():
            assert torch.allclose(grads[name], grad, rtol=1e-10, atol=1e-13), (step, name)
        assert not overlaps and overlapped == 0
