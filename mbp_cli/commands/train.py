"""`mbp train` past its options: the world and the device read once, the process group, and
the run started and trained — whole, or part by part where the recipe partitions it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mbp_cli.distributed.group import process_group, rank_device
from mbp_cli.distributed.world import world_from_env
from mbp_cli.engine.setup import resolve_device
from mbp_cli.events import Sink
from mbp_cli.partition.run import WAIT_SECONDS, train_partitioned
from mbp_cli.recipe.spec import Recipe
from mbp_cli.run.loop import train_loop
from mbp_cli.run.start import RunOptions, start_run


def train(recipe: Recipe, options: RunOptions, sinks: Iterable[Sink],
          device: torch.device | None = None) -> dict[str, Any]:
    """Train the recipe into `options.run_dir` and return the summary; events go to `sinks`
    (and to metrics.jsonl). Under torchrun (or `mbp train --nproc`), every rank calls it and
    rank 0 alone reports and writes. `device`: train.device as the caller resolved it (else
    resolved here), of which each rank takes its own GPU."""
    world = world_from_env()
    device = rank_device(device or resolve_device(recipe.train.device), world)
    if recipe.train.partition is not None:  # experimental: parts trained apart
        timeout = max(recipe.train.collective_timeout, WAIT_SECONDS)
        with process_group(world, device, timeout, recipe.train.heartbeat_timeout) as ranks:
            return train_partitioned(recipe, options, list(sinks), ranks, device)
    with process_group(world, device, recipe.train.collective_timeout,
                       recipe.train.heartbeat_timeout) as ranks:
        return train_loop(start_run(recipe, options, list(sinks), ranks, device))
