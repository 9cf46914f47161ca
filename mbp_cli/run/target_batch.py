"""The target-batch step: one target batch, streamed as micro-batches, one gradient.

Invariant: the accumulated gradient equals the full-batch gradient whatever the split, the
ranks or the micro-batch sizes. Each micro-batch backpropagates the raw *sum* of its loss
items; once every micro-batch of every rank is in, the gradients are summed over the ranks and
divided once by the real number of items in the whole target batch. Dividing by the number of
micro-batches instead would be exact only when every piece held as many items.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mbp_cli.distributed.exchange import GradientExchange, RankReport
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import MicroStep, explained_step_errors
from mbp_cli.errors import DoesNotFitError, is_out_of_memory
from mbp_cli.memory.tracker import unless_out_of_memory


@dataclass(frozen=True)
class StepSums:
    """What a target batch (or one rank's share of it) added up to before normalizing."""

    loss_sum: float  # sum of the loss items
    items: float  # loss items: samples, non-ignored tokens, or the sum of their class weights
    samples: int
    micro_batches: int


@dataclass(frozen=True)
class StepTotals:
    """What one target batch contributed: its mean loss and the counts behind it."""

    loss: float  # sum of loss items / number of items
    items: float
    samples: int
    micro_batches: int


@dataclass(frozen=True)
class StepOutcome:
    """One target batch over every rank: its totals (None when some rank ran out of memory:
    gradients cleared, redo it) and what each rank did."""

    totals: StepTotals | None
    reports: list[RankReport]

    @property
    def stop_asked(self) -> bool:
        """Whether a stop signal reached any rank by the time it reported (one answer for all
        ranks, with no collective of its own)."""
        return any(r.stop_asked for r in self.reports)


def target_batch_step(micro_step: MicroStep, micro_batches: Iterable[Any],
                      ranks: Ranks | None = None, *,
                      statistics: AbstractContextManager | None = None, is_first: bool = False,
                      peak_bytes: Callable[[], int] = lambda: 0, micro_batch: int = 0,
                      share: int = 0, stop_asked: Callable[[], bool] = lambda: False
                      ) -> StepOutcome:
    """Leave in each `.grad` the gradient of the whole target batch's mean loss (see the
    module's invariant) and return its totals.

    This rank's micro-batches are backpropagated, their gradients summed over the ranks from
    the last backward on (exchange.py), and the ranks agree on the outcome in the same exchange
    (an error or an out-of-memory on any rank stops or redoes the target batch on all); then
    the sums are normalized. `statistics` wraps the target batch (BatchNorm's running
    statistics, updated once at its end); `micro_batch`, `share`, `peak_bytes` and
    `stop_asked` (a stop signal reached this rank) are this rank's figures for its report.
    Expects the gradients to be None (`zero_grad(set_to_none=True)`) on entry.
    """
    started = time.perf_counter()
    ranks = ranks or Ranks(World(), micro_step.device)
    model = micro_step.model
    exchange = ranks.exchange(model) if ranks.is_distributed else None
    if exchange is not None:
        micro_batches = _arming_before_last(micro_batches, exchange.arm)
    try:
        with statistics or nullcontext():  # left as they were where the batch is redone
            sums, failure = _backward_share(micro_step, micro_batches, ranks, is_first)
            counted = sums or StepSums(loss_sum=0.0, items=0.0, samples=0, micro_batches=0)
            mine = RankReport(
                loss_sum=counted.loss_sum, items=counted.items, samples=counted.samples,
                micro_batches=counted.micro_batches,
                out_of_memory=sums is None and failure is None, failed=failure is not None,
                seconds=time.perf_counter() - started, peak_bytes=peak_bytes(),
                micro_batch=micro_batch, share=share, stop_asked=stop_asked())
            reports = [mine] if exchange is None else _exchanged(exchange, mine, ranks)
            if any(r.failed for r in reports):
                ranks.raise_any(failure)
            if any(r.out_of_memory for r in reports):
                model.zero_grad(set_to_none=True)
                raise _RedoTargetBatch(reports)
    except _RedoTargetBatch as redo:
        return StepOutcome(None, redo.reports)
    total = StepSums(loss_sum=sum(r.loss_sum for r in reports),
                     items=sum(r.items for r in reports),
                     samples=sum(r.samples for r in reports),
                     micro_batches=sum(r.micro_batches for r in reports))
    return StepOutcome(normalize_gradients(model, total), reports)


class _RedoTargetBatch(Exception):
    """Some rank ran out of memory: every rank drops this target batch."""

    def __init__(self, reports: list[RankReport]) -> None:
        super().__init__()
        self.reports = reports


def _backward_share(micro_step: MicroStep, micro_batches: Iterable[Any], ranks: Ranks,
                    is_first: bool) -> tuple[StepSums | None, Exception | None]:
    """This rank's share backpropagated: its sums (None: out of memory), or, with other ranks
    to tell, the error it raised."""
    try:
        with explained_step_errors(is_first):
            return unless_out_of_memory(lambda: backward_sums(micro_step, micro_batches),
                                        micro_step.device, micro_step.model), None
    except Exception as exc:
        if not ranks.is_distributed:
            raise
        return None, exc  # the other ranks learn it in the gather, and all stop


_END = object()


def _arming_before_last(micro_batches: Iterable[Any], arm: Callable[[], None]) -> Iterator[Any]:
    """The micro-batches, `arm` called as the last one is handed out (one is read ahead)."""
    pieces = iter(micro_batches)
    piece = next(pieces, _END)
    while piece is not _END:
        following = next(pieces, _END)
        if following is _END:
            arm()
        yield piece
        piece = following


def _exchanged(exchange: GradientExchange, mine: RankReport, ranks: Ranks) -> list[RankReport]:
    """Every rank's report, the gradients summed over the ranks."""
    try:
        return exchange.finish(mine)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise DoesNotFitError(  # mid-exchange: this rank alone, the others wait on it
            f"out of memory on rank {ranks.world.rank} while summing the gradients over the "
            "ranks (small gradients are summed in 1 MiB pieces, beyond the step's peak): lower "
            "the micro-batch or raise the memory") from None


def backward_sums(micro_step: MicroStep, micro_batches: Iterable[Any]) -> StepSums:
    """Backpropagate each micro-batch's loss *sum* into `.grad` (summed by autograd) and
    return the totals; nothing is divided yet."""
    # On a GPU the running totals stay on the device (no sync per micro-batch) and in place;
    # on the CPU every op has already run when it returns, so reading the number is free and
    # cheaper than a tensor add. Both add in float64, so both give the same totals.
    on_host = micro_step.device.type == "cpu"
    loss_sum: Any = 0.0 if on_host else torch.zeros((), device=micro_step.device,
                                                     dtype=torch.float64)
    items: Any = 0.0 if on_host else torch.zeros_like(loss_sum)
    samples = micro_count = 0
    backward = micro_step.precision.backward  # scaled for fp16
    for batch in micro_batches:
        result = micro_step(batch)
        backward(result.loss_sum)
        if on_host:
            loss_sum += result.loss_sum.item()
            items += float(result.items)
        else:
            loss_sum += result.loss_sum.detach()
            items += result.items
        samples += result.samples
        micro_count += 1
    if not on_host:
        loss_sum, items = torch.stack([loss_sum, items]).tolist()  # the one sync
    return StepSums(loss_sum=loss_sum, items=items, samples=samples, micro_batches=micro_count)


def normalize_gradients(model: nn.Module, sums: StepSums) -> StepTotals:
    """Divide the summed gradients by the target batch's item count: its mean loss's gradient."""
    if sums.items:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_div_(grads, sums.items)
    mean_loss = sums.loss_sum / sums.items if sums.items else float("nan")
    return StepTotals(loss=mean_loss, items=sums.items, samples=sums.samples,
                      micro_batches=sums.micro_batches)


def clip_gradients(model: nn.Module, max_norm: float | None,
                   max_value: float | None) -> float | None:
    """Clip the accumulated, normalized gradient — the full batch's, so clipping a split equals
    clipping one piece — by its total norm and/or element-wise; return the norm before clipping
    (None when neither is asked)."""
    if max_norm is None and max_value is None:
        return None
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    if max_value is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), max_value)
    return float(norm)
