"""A user's dataset whose behaviour depends on the rank reading it (RANK, as torchrun sets it):
slower on one rank, or killing one rank, to try balancing and failures with real processes."""

from __future__ import annotations

import os
import signal as signals
import time

import torch
from torch.utils.data import Dataset


class Points(Dataset):
    """(features, class) pairs; on rank `slow_rank`, each sample takes `delay` seconds more;
    on rank `dying_rank` the process gets `signal` (SIGKILL, or SIGSTOP to hang it) at its
    `die_after`-th sample, and on rank
    `failing_rank` that sample raises, as a corrupt file would; on rank `nan_rank` every feature
    is NaN."""

    def __init__(self, train: bool = True, n: int = 240, slow_rank: int = -1,
                 delay: float = 0.0, dying_rank: int = -1, die_after: int = 0,
                 nan_rank: int = -1, failing_rank: int = -1, signal: str = "SIGKILL") -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.rank = int(os.environ.get("RANK", 0))
        if self.rank == nan_rank:
            self.x = torch.full_like(self.x, float("nan"))
        self.delay = delay if self.rank == slow_rank else 0.0
        self.dies_after = die_after if self.rank == dying_rank else None
        self.fails_after = die_after if self.rank == failing_rank else None
        self.served = 0
        self.signal = signal

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.served += 1
        if self.dies_after is not None and self.served >= self.dies_after:
            os.kill(os.getpid(), getattr(signals, self.signal))
        if self.fails_after is not None and self.served >= self.fails_after:
            raise OSError(f"cannot read sample {i}: the file is truncated")
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]
