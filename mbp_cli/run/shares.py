"""Each rank's share of a target batch: even, the recipe's weights, or — Dynamic Batch Size —
in proportion to each rank's measured speed, so a slow device stops holding up the others.

Unlike the DBS paper, which resizes each worker's mini-batch and partitions the dataset, the
global target batch stays the one a single process would draw: only how it is cut between the
ranks changes, so the update and the optimizer's hyper-parameters are unchanged by balancing. A
resumed run keeps its checkpoint's cut where the ranks and the settings are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mbp_cli.distributed.exchange import RankReport
from mbp_cli.distributed.shares import split_shares
from mbp_cli.distributed.world import World
from mbp_cli.errors import UsageError
from mbp_cli.events import RunWarning, Sink
from mbp_cli.recipe.spec import BatchSpec, Recipe
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


def batch_setting(recipe: Recipe) -> dict[str, Any]:
    """How the recipe cuts target batches between ranks; a resume that changes it (or the
    number of ranks) cuts afresh."""
    return {"micro": recipe.batch.micro, "shares": recipe.batch.shares}


def keeps_split(loop: LoopState | None, recipe: Recipe, world: World) -> bool:
    """Whether a resumed run keeps its checkpoint's cut: the same ranks, the same settings."""
    return loop is not None and loop.world_size == world.size \
        and loop.batch_setting in ({}, batch_setting(recipe))


def split_state(loop: LoopState | None, keeps: bool, recipe: Recipe, world: World,
                micro_batch: int, emit: Sink) -> LoopState:
    """The loop state to train from, with this rank's micro-batch and every rank's share: the
    checkpoint's where the cut is kept, else taken afresh (said in a warning)."""
    setting = batch_setting(recipe)
    if loop is not None and not keeps:
        emit(RunWarning(
            f"the checkpoint was made by {loop.world_size} rank(s) with batch.micro "
            f"{loop.batch_setting.get('micro', '?')} and batch.shares "
            f"{loop.batch_setting.get('shares')}; this run has {world.size} with "
            f"{setting['micro']} and {setting['shares']}: each rank's share and micro-batch "
            "are taken afresh; every update is still the full batch's, but the run is no "
            "longer bitwise equal to an uninterrupted one"))
        loop.micro_batch, loop.world_size, loop.speed_window = micro_batch, world.size, []
        loop.shares = []
    loop = loop or LoopState(micro_batch, world_size=world.size)
    loop.batch_setting = setting
    if not loop.shares:
        loop.shares = starting_shares(recipe.batch, world.size)
    return loop
