"""How a target batch is cut between the ranks: whole-sample shares, and where each one lies."""

from __future__ import annotations

import math
from collections.abc import Sequence


def split_shares(total: int, weights: Sequence[float], floors: Sequence[int] = ()) -> list[int]:
    """`total` samples cut in proportion to `weights` (largest remainders), as integers that
    sum to `total`; a rank with a positive weight gets at least its floor (one micro-batch)
    where the total allows."""
    weight_sum = sum(weights)
    exact = [total * w / weight_sum for w in weights]
    shares = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    for i, floor in enumerate(floors):
        wanted = min(floor, total // len(weights))
        while weights[i] > 0 and shares[i] < wanted:
            donor = max(range(len(shares)), key=lambda j: shares[j])
            shares[donor] -= 1
            shares[i] += 1
    return shares


def share_bounds(size: int, shares: Sequence[int], rank: int) -> tuple[int, int]:
    """Where a rank's share of a target batch of `size` starts and stops: the shares
    themselves for a full target batch, in proportion for a smaller last one."""
    if sum(shares) != size:
        shares = split_shares(size, shares)
    start = sum(shares[:rank])
    return start, start + shares[rank]
