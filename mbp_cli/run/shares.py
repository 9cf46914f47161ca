"""Each rank's share of a target batch: even, the recipe's weights, or — Dynamic Batch Size —
in proportion to each rank's measured speed, so a slow device stops holding up the others.

Unlike the DBS paper, which resizes each worker's mini-batch and partitions the dataset, the
global target batch stays the one a single process would draw: only how it is cut between the
ranks changes, so the update and the optimizer's hyper-parameters are unchanged by balancing.
"""

from __future__ import annotations

from collections.abc import Sequence

from mbp_cli.distributed.ranks import RankReport, split_shares
from mbp_cli.errors import UsageError
from mbp_cli.recipe.spec import BatchSpec
from mbp_cli.run.checkpoint import LoopState


def starting_shares(batch: BatchSpec, world_size: int) -> list[int]:
    """The shares of a full target batch to start with: batch.shares as weights, else even
    (none for a single process, which streams the whole target batch)."""
    weights = batch.shares or [1] * world_size
    if len(weights) != world_size:
        raise UsageError(f"batch.shares gives {len(weights)} weights for {world_size} "
                         f"rank{'s' if world_size > 1 else ''}; give one per rank "
                         "(batch.shares: null for even shares)")
    return split_shares(batch.target, weights) if world_size > 1 else []


def check_rank_lists(batch: BatchSpec, world_size: int) -> None:
    """Refuse, before any rank starts, a list in the recipe with an entry per rank that does
    not match the number of ranks."""
    starting_shares(batch, world_size)
    batch.micro_for(0, world_size)


def record_speeds(loop: LoopState, reports: Sequence[RankReport]) -> None:
    """Add each rank's samples and seconds of this target batch to the measuring window."""
    if len(loop.speed_window) != len(reports):
        loop.speed_window = [[0.0, 0.0] for _ in reports]
    for window, report in zip(loop.speed_window, reports, strict=True):
        window[0] += report.samples
        window[1] += report.seconds


def balanced_shares(target: int, loop: LoopState, micro_batches: Sequence[int]
                    ) -> tuple[list[int], list[float]]:
    """Shares in proportion to each rank's samples per second over the window (each at least
    one of its micro-batches), and those speeds; the window starts again."""
    speeds = [samples / seconds if seconds else 0.0 for samples, seconds in loop.speed_window]
    loop.speed_window = []
    if not any(speeds):
        return loop.shares, speeds
    return split_shares(target, speeds, floors=micro_batches), speeds
