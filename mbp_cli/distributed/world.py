"""This process's place among the ranks, as the launcher describes it in the environment (no
torch here: the command line reads it before deciding what to import)."""

from __future__ import annotations

import os
from dataclasses import dataclass

MBP_LAUNCHED = "MBP_LAUNCHED"  # set by `mbp train --nproc` for its ranks
LAUNCH_NOTES = "MBP_LAUNCH_NOTES"  # a file where its ranks leave what the launcher says


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    is_launched: bool = False  # started by a launcher (torchrun, `mbp train --nproc`), even of 1
    is_mbp_launched: bool = False  # by `mbp train --nproc`, which reports what ends the ranks

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes the run folder."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """Whether there are other ranks."""
        return self.size > 1


def world_from_env() -> World:
    """The world torchrun (or `mbp train --nproc`) describes in the environment: RANK,
    WORLD_SIZE and LOCAL_RANK; none of them, one process."""
    env = os.environ
    return World(rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)),
                 local_rank=int(env.get("LOCAL_RANK", 0)), is_launched="WORLD_SIZE" in env,
                 is_mbp_launched=env.get(MBP_LAUNCHED) == "1")
