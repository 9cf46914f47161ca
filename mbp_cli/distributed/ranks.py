"""The ranks' collectives: one exchange of what each did, one gradient sum per target batch.

Each rank streams its share of every target batch in micro-batches of its own size. Once per
target batch the ranks exchange what they did (loss and item sums, out-of-memory, timings) in
one gather, so every rank takes the same decision, and then sum their gradients in one
all-reduce: the update is the single-process full-batch update whatever the shares.

DDP's own gradient hooks are not used: they start the all-reduce inside the last micro-batch's
backward, before the ranks could agree that every rank's target batch fitted in memory, and they
need every rank to run a backward, which a rank with an empty share does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mbp_cli.distributed.failures import RankFailure, collective, failure_info
from mbp_cli.distributed.world import World

BUCKET_BYTES = 2**20  # small gradients are summed together in flat pieces of at most this
# size (one collective for many); larger ones in place, so the sum needs no memory of its own


@dataclass(frozen=True)
class RankReport:
    """What one rank did with its share of a target batch."""

    loss_sum: float
    items: float
    samples: int
    micro_batches: int
    out_of_memory: bool
    failed: bool  # its share raised an error (shared by raise_any)
    seconds: float  # its own work, before waiting for the others
    peak_bytes: int
    micro_batch: int
    share: int

    @property
    def samples_per_second(self) -> float | None:
        """Its speed on its share (None for an empty share)."""
        return self.samples / self.seconds if self.samples and self.seconds else None

    def to_dict(self, rank: int) -> dict[str, Any]:
        """Its figures for the metrics."""
        return {"rank": rank, "share": self.share, "micro_batch": self.micro_batch,
                "samples_per_second": self.samples_per_second,
                "peak_memory_bytes": self.peak_bytes}


# A report crosses the ranks as float64 numbers, field by field; each field's type brings its
# number back.
_REPORT_FIELDS = [(f.name, {"float": float, "int": int, "bool": bool}[f.type])
                  for f in fields(RankReport)]


class Ranks:
    """The collectives mbp needs, each a no-op for a single process."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        # NCCL moves CUDA tensors only; gloo, host ones.
        self.device = device if device.type == "cuda" else torch.device("cpu")

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

    def gather_reports(self, report: RankReport, has_grad: Sequence[bool]
                       ) -> tuple[list[RankReport], list[bool]]:
        """Every rank's report, in rank order, and which parameters have a gradient on any rank
        (one gather)."""
        if not self.is_distributed:
            return [report], list(has_grad)
        numbers = [float(getattr(report, name)) for name, _ in _REPORT_FIELDS]
        row = torch.tensor(numbers + list(has_grad), dtype=torch.float64, device=self.device)
        with collective("agreeing on a target batch"):
            rows = self._all_gather(row).tolist()
        count = len(_REPORT_FIELDS)
        reports = [RankReport(**{name: kind(value) for (name, kind), value
                                 in zip(_REPORT_FIELDS, r[:count], strict=True)})
                   for r in rows]
        anywhere = [any(r[count + i] for r in rows) for i in range(len(has_grad))]
        return reports, anywhere

    def sum_gradients(self, params: Sequence[nn.Parameter], has_grad: Sequence[bool]) -> None:
        """Sum each parameter's gradient over the ranks, in place. A parameter that has one on
        some rank gets zeros where it has none (an empty share); one that has none anywhere
        stays None, as in a single process."""
        if not self.is_distributed:
            return
        grads = []
        for param, needed in zip(params, has_grad, strict=True):
            if needed and param.grad is None:
                param.grad = torch.zeros_like(param)
            if needed:
                grads.append(param.grad)
        for bucket in _buckets(grads):
            if len(bucket) == 1:
                with collective("summing gradients"):
                    dist.all_reduce(bucket[0])
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            with collective("summing gradients"):
                dist.all_reduce(flat)
            offset = 0
            for grad in bucket:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def gather_rows(self, row: Tensor) -> Tensor:
        """Every rank's float64 vector (of one length), stacked in rank order."""
        if not self.is_distributed:
            return row.unsqueeze(0)
        with collective("merging BatchNorm statistics"):
            return self._all_gather(row.to(self.device, torch.float64)).cpu()

    def any(self, flag: bool) -> bool:
        """Whether the flag is set on any rank."""
        if not self.is_distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        with collective("checking for a stop signal"):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

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


def _buckets(grads: list[Tensor]) -> Iterator[list[Tensor]]:
    """Each gradient of BUCKET_BYTES or more alone; the smaller ones grouped by device and
    dtype, in pieces of at most BUCKET_BYTES."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for grad in grads:
        if grad.numel() * grad.element_size() >= BUCKET_BYTES:
            yield [grad]
        else:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
    for group in groups.values():
        bucket, size = [], 0
        for grad in group:
            nbytes = grad.numel() * grad.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                yield bucket
                bucket, size = [], 0
            bucket.append(grad)
            size += nbytes
        if bucket:
            yield bucket
