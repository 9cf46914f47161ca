"""The ranks' one exchange per target batch: their gradients summed, started during the last
micro-batch's backward as DDP's reducer does, and what each rank did, in the same queue.

Parameters are grouped into buckets in a fixed order (the reverse of the model's, roughly the
order in which a backward finishes them), the same on every rank. Armed before this rank's
last backward, a hook on each parameter starts its bucket's sum as soon as the bucket's
gradients are all in, buckets in order, so every rank issues the same collectives in the same
order whatever its share. What the backward did not start (a rank with an empty share, one
that ran out of memory or failed, parameters the last micro-batch did not use) is started at
`finish`, with zeros where this rank has no gradient; the reports ride last. The ranks then
agree: a failure or an out-of-memory anywhere discards the sums (the caller drops the target
batch), and a parameter with a gradient on no rank goes back to None, as in one process.

A parameter whose gradient is accumulated twice in one backward (reentrant activation
checkpointing) would change after its sum started. The first target batch only watches for it;
where any rank sees it, every rank sums after the backward from then on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mbp_cli.distributed.failures import collective
from mbp_cli.distributed.world import World
from mbp_cli.errors import MbpError


class SpoiledSumError(MbpError):
    """A gradient changed after its sum over the ranks began (every rank raises it)."""

    agreed = True

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
    stop_asked: bool = False  # a stop signal reached it: all stop after this target batch

    @property
    def samples_per_second(self) -> float | None:
        """Its speed on its share (None for an empty share)."""
        return self.samples / self.seconds if self.samples and self.seconds else None

    def to_dict(self, rank: int) -> dict[str, Any]:
        """Its figures for the metrics."""
        return {"rank": rank, "share": self.share, "micro_batch": self.micro_batch,
                "samples_per_second": self.samples_per_second,
                "peak_memory_bytes": self.peak_bytes}


# A report crosses the ranks as float64 numbers, field by field, in its rank's slot of a sum
# (zeros elsewhere: the sum is every rank's row, exactly); each field's type brings it back.
_REPORT_FIELDS = [(f.name, {"float": float, "int": int, "bool": bool}[f.type])
                  for f in fields(RankReport)]


class GradientExchange:
    """One model's gradients summed over the ranks, overlapped with the last backward."""

    def __init__(self, model: nn.Module, world: World, device: torch.device) -> None:
        self.model, self.world, self.device = model, world, device
        self.params = list(model.parameters())
        self.buckets = _buckets([i for i, p in enumerate(self.params) if p.requires_grad],
                                self.params)
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.overlaps: bool | None = None  # None: the first target batch watches
        self.overlapped = 0  # buckets whose sum began during the last target batch's backward
        self._reset()
        for index, param in enumerate(self.params):
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(
                    lambda _, index=index: self._gradient_in(index))

    def _reset(self) -> None:
        self.armed = self.repeated = self.spoiled = False
        self.arrived: set[int] = set()
        self.missing = [len(bucket) for bucket in self.buckets]
        self.started: list[tuple[dist.Work, Tensor | None]] = []  # bucket by bucket

    def arm(self) -> None:
        """The next backward is this rank's last of the target batch."""
        self.armed = True

    def _gradient_in(self, index: int) -> None:
        if not self.armed:
            return
        if index in self.arrived:  # accumulated again
            self.repeated = True
            self.spoiled |= self.bucket_of[index] < len(self.started)  # after its sum began
            return
        self.arrived.add(index)
        self.missing[self.bucket_of[index]] -= 1
        if not self.overlaps:
            return
        try:
            while len(self.started) < len(self.buckets) and not self.missing[len(self.started)]:
                self._start(len(self.started))
        except Exception:  # out of memory for a flat piece, say: `finish` meets it again
            self.overlaps = False

    def _start(self, bucket: int) -> None:
        """Start one bucket's sum, zeros where this rank has no gradient."""
        grads = []
        for index in self.buckets[bucket]:
            param = self.params[index]
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        flat = grads[0] if len(grads) == 1 else torch.cat([g.reshape(-1) for g in grads])
        with collective("summing gradients"):
            work = dist.all_reduce(flat, async_op=True)
        self.started.append((work, None if len(grads) == 1 else flat))

    def finish(self, report: RankReport) -> list[RankReport]:
        """Start what is left, then the reports, and wait for all: every rank's report. The
        sums stand in `.grad` unless some rank failed or ran out of memory (then the caller
        discards them)."""
        had = [p.grad is not None for p in self.params]
        self.overlapped = len(self.started)
        try:
            while len(self.started) < len(self.buckets):
                self._start(len(self.started))
            rows = self._rows(report, had)
            with collective("agreeing on a target batch"):
                reported = dist.all_reduce(rows, async_op=True)
                for (work, flat), bucket in zip(self.started, self.buckets, strict=True):
                    work.wait()
                    if flat is not None:
                        self._unflatten(flat, bucket)
                reported.wait()
        finally:
            self._reset()
        size, count = self.world.size, len(_REPORT_FIELDS)
        numbers = rows.tolist()
        reports = [RankReport(**{name: kind(value) for (name, kind), value in zip(
            _REPORT_FIELDS, numbers[r * count:(r + 1) * count], strict=True)})
            for r in range(size)]
        anywhere = [flag > 0 for flag in numbers[size * count:-2]]
        repeated, spoiled = numbers[-2] > 0, numbers[-1] > 0
        if spoiled:
            raise SpoiledSumError(
                "a parameter's gradient was accumulated twice in one backward (reentrant "
                "activation checkpointing?) after its sum over the ranks had begun; this "
                "target batch is not applied. Use torch.utils.checkpoint with "
                "use_reentrant=False")
        if self.overlaps is None or repeated:
            self.overlaps = not repeated
        for param, here, there in zip(self.params, had, anywhere, strict=True):
            if not here and not there:
                param.grad = None  # zeros sent for nobody: none, as in one process
        return reports

    def _rows(self, report: RankReport, had: list[bool]) -> Tensor:
        """This rank's report in its slot, its parameters' gradient flags, and whether a
        gradient was accumulated twice (before, after its sum began): summed, every rank's."""
        count = len(_REPORT_FIELDS)
        rows = torch.zeros(self.world.size * count + len(had) + 2, dtype=torch.float64)
        start = self.world.rank * count
        rows[start:start + count] = torch.tensor(
            [float(getattr(report, name)) for name, _ in _REPORT_FIELDS], dtype=torch.float64)
        rows[self.world.size * count:-2] = torch.tensor(had, dtype=torch.float64)
        rows[-2:] = torch.tensor([float(self.repeated), float(self.spoiled)])
        return rows.to(self.device)

    def _unflatten(self, flat: Tensor, bucket: list[int]) -> None:
        offset = 0
        for index in bucket:
            param = self.params[index]
            if param.grad is not None:  # else dropped by an out-of-memory: discarded anyway
                param.grad.copy_(flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()


def _buckets(indices: list[int], params: list[nn.Parameter]) -> list[list[int]]:
    """The parameters in reverse order, cut into buckets: each of BUCKET_BYTES or more alone,
    neighbours of one device and dtype together up to BUCKET_BYTES."""
    buckets: list[list[int]] = []
    size = 0
    for index in reversed(indices):
        param = params[index]
        nbytes = param.numel() * param.element_size()
        last = params[buckets[-1][-1]] if buckets else None
        joins = last is not None and nbytes < BUCKET_BYTES and size + nbytes <= BUCKET_BYTES \
            and (last.device, last.dtype) == (param.device, param.dtype)
        if joins:
            buckets[-1].append(index)
            size += nbytes
        else:
            buckets.append([index])
            size = nbytes if nbytes < BUCKET_BYTES else BUCKET_BYTES  # a large one: alone
    return buckets
