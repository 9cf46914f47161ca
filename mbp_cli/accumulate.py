"""The accumulate-and-normalize step: one target batch, streamed as micro-batches, one gradient."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbp_cli.losses import LossFn


@dataclass(frozen=True)
class StepTotals:
    """What one target batch contributed: its mean loss and the counts behind it."""

    loss: float  # sum of loss items / number of items
    items: int  # loss items: samples, or non-ignored tokens
    samples: int
    micro_batches: int


def to_device(value: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Move a batch tensor to the device; floating-point inputs take the training dtype."""
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype, non_blocking=True)
    return value.to(device=device, non_blocking=True)


def accumulate_gradients(model: nn.Module, micro_batches: Iterable[tuple[Tensor, Tensor]],
                         loss_fn: LossFn, device: torch.device, dtype: torch.dtype) -> StepTotals:
    """Leave in each `.grad` the gradient of the whole target batch's mean loss.

    Invariant: the accumulated gradient equals the full-batch gradient whatever the split.
    Each micro-batch backpropagates the raw *sum* of its loss items; once every micro-batch is
    in, the gradients are divided by the real number of items in the target batch. Dividing by
    the number of micro-batches instead would be exact only when every piece held as many items.
    Expects the gradients to be None (`zero_grad(set_to_none=True)`) on entry.
    """
    # Running totals stay on the device (no sync per micro-batch) and in place, so memory
    # does not grow with the number of micro-batches.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    items = torch.zeros((), device=device, dtype=torch.int64)
    samples = micro_count = 0
    for inputs, targets in micro_batches:
        inputs, targets = to_device(inputs, device, dtype), to_device(targets, device, dtype)
        micro_sum, micro_items = loss_fn(model(inputs), targets)
        micro_sum.backward()
        loss_sum += micro_sum.detach()
        items += micro_items
        samples += len(targets)
        micro_count += 1
    total_loss, total_items = torch.stack([loss_sum, items.double()]).tolist()  # the one sync
    item_count = int(total_items)
    if item_count:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_div_(grads, item_count)
    mean_loss = total_loss / item_count if item_count else float("nan")
    return StepTotals(mean_loss, item_count, samples, micro_count)
