"""The collectives mbp needs, each a no-op for a single process: agreeing on failures,
gathering and broadcasting values, and (in exchange.py) one gradient exchange per target batch.

Each rank streams its share of every target batch in micro-batches of its own size; the
exchange sums the ranks' gradients and tells every rank what each did (loss and item sums,
out-of-memory, timings), so every rank takes the same decision: the update is the
single-process full-batch update whatever the shares.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mbp_cli.distributed.exchange import GradientExchange
from mbp_cli.distributed.failures import RankFailure, collective, failure_info
from mbp_cli.distributed.world import World


class Ranks:
    """The collectives mbp needs, each a no-op for a single process."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        # NCCL moves CUDA tensors only; gloo, host ones.
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self._exchange: GradientExchange | None = None

    @property
    def is_distributed(self) -> bool:
        """Whether there are other ranks."""
        return self.world.is_distributed

    @contextlib.contextmanager
    def agreed(self) -> Iterator[None]:
        """Run the body (which holds no collective) on every rank; where it raises on any rank,
        every rank raises that rank's failure once all have run it."""
        if not self.is_distributed:
            yield
            return
        failure = None
        try:
            yield
        except Exception as exc:  # shared with the other ranks just below
            failure = exc
        self.raise_any(failure)

    def raise_any(self, failure: BaseException | None) -> None:
        """Every rank tells whether it failed (one gather); if any did, all raise RankFailure
        with the first failed rank's message and code."""
        infos = self.gather_objects(None if failure is None else failure_info(failure))
        for rank, info in enumerate(infos):
            if info is not None:
                raise RankFailure(rank, **info) from failure

    def exchange(self, model: nn.Module) -> GradientExchange:
        """The gradient exchange of `model` (made once: it hooks the parameters)."""
        if self._exchange is None or self._exchange.model is not model:
            self._exchange = GradientExchange(model, self.world, self.device)
        return self._exchange

    def gather_rows(self, row: Tensor) -> Tensor:
        """Every rank's float64 vector (of one length), stacked in rank order."""
        if not self.is_distributed:
            return row.unsqueeze(0)
        with collective("merging BatchNorm statistics"):
            return self._all_gather(row.to(self.device, torch.float64)).cpu()

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's picklable value, in rank order."""
        if not self.is_distributed:
            return [value]
        values: list[Any] = [None] * self.world.size
        with collective("gathering every rank's state"):
            dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's picklable value, on every rank."""
        if not self.is_distributed:
            return value
        box = [value]
        with collective("starting"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.is_distributed:
            with collective("waiting for the other ranks"):
                dist.barrier()

    def _all_gather(self, row: Tensor) -> Tensor:
        rows = [torch.empty_like(row) for _ in range(self.world.size)]
        dist.all_gather(rows, row)
        return torch.stack(rows)
