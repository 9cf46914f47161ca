"""The data-parallel loop a user writes by hand, for bench/distributed.py: torchrun, DDP,
no_sync() on all but the last micro-batch; one line on stdout per optimizer step (rank 0).

    torchrun --nproc-per-node 2 bench/ddp_hand.py --target 256 --micro 64 --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mbp_cli.catalog.datasets import synthetic
from mbp_cli.catalog.models import mlp


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--target", "--micro", "--steps", "--features", "--hidden"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    data = synthetic(num_samples=4096, shape=[args.features])
    torch.manual_seed(0)
    model = DistributedDataParallel(mlp(in_features=args.features, hidden=args.hidden))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    share = args.target // size
    for step in range(args.steps):
        start = (step * args.target) % (len(data) - args.target) + rank * share
        indices = order[start:start + share]
        pieces = range(0, share, args.micro)
        for index, first in enumerate(pieces):
            piece = indices[first:first + args.micro]
            x, y = data.inputs[piece], data.targets[piece]
            last = index == len(pieces) - 1
            with contextlib.nullcontext() if last else model.no_sync():
                # a sum over the whole target batch's count; DDP averages over the ranks
                (F.cross_entropy(model(x), y, reduction="sum") * size / args.target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step + 1}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
