"""The accumulate-and-normalize step: one target batch, streamed as micro-batches, one gradient."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mbp_cli.engine.micro_step import MicroStep


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


def accumulate_gradients(micro_step: MicroStep, micro_batches: Iterable[Any]) -> StepTotals:
    """Leave in each `.grad` the gradient of the whole target batch's mean loss.

    Invariant: the accumulated gradient equals the full-batch gradient whatever the split.
    Each micro-batch backpropagates the raw *sum* of its loss items; once every micro-batch is
    in, the gradients are divided by the real number of items in the target batch. Dividing by
    the number of micro-batches instead would be exact only when every piece held as many items.
    Expects the gradients to be None (`zero_grad(set_to_none=True)`) on entry.
    """
    return normalize_gradients(micro_step.model, backward_sums(micro_step, micro_batches))


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
    return StepSums(loss_sum, items, samples, micro_count)


def normalize_gradients(model: nn.Module, sums: StepSums) -> StepTotals:
    """Divide the summed gradients by the target batch's item count: its mean loss's gradient."""
    if sums.items:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_div_(grads, sums.items)
    mean_loss = sums.loss_sum / sums.items if sums.items else float("nan")
    return StepTotals(mean_loss, sums.items, sums.samples, sums.micro_batches)


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
