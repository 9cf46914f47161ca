"""The process group of a run: joined (gloo on CPU, NCCL on CUDA), a GPU per rank, and left."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import signal
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from mbp_cli.distributed.heartbeat import heartbeat
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.errors import MbpError


def rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank on a machine takes its own GPU (LOCAL_RANK) when the device names none."""
    if world.is_distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)
    return device


def _die_with_parent() -> None:
    """A worker is killed when its launcher dies (kill -9 included), as in a crash, rather
    than training on as an orphan; Linux only."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def process_group(world: World, device: torch.device, timeout_seconds: float,
                  heartbeat_seconds: float) -> Iterator[Ranks]:
    """Join the other ranks for the run (gloo on CPU, NCCL on CUDA) and leave at the end; a
    collective that waits longer than `timeout_seconds` fails instead of hanging, and a rank
    silent for `heartbeat_seconds` (stopped, hung) ends the run."""
    ranks = Ranks(world, device)
    if not world.is_distributed:
        yield ranks
        return
    _die_with_parent()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_seconds))
    try:  # beating until this rank leaves: a peer may take long to reach the last barrier
        with heartbeat(world, heartbeat_seconds):
            try:
                yield ranks
                ranks.barrier()  # leave together: a rank closing its links early aborts others
            except MbpError as exc:
                if exc.agreed:  # every rank raised it: all are here
                    ranks.barrier()
                else:  # this rank's alone: leave at once, so the others lose contact and stop
                    exc.exit_at_once = True
                raise
    finally:
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to close
            dist.destroy_process_group()
