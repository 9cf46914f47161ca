"""The embedded digits, read slower on one rank: each sample there costs `delay` seconds more
(a device that is that much slower), for bench/balance.py."""

from __future__ import annotations

import os
import time

from torch.utils.data import Dataset

from mbp_cli.catalog.datasets import digits


class SlowDigits(Dataset):
    def __init__(self, train: bool = True, slow_rank: int = 1, delay: float = 0.0) -> None:
        self.data = digits(train=train)
        self.delay = delay if int(os.environ.get("RANK", 0)) == slow_rank else 0.0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        return self.data[i]
