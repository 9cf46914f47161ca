"""Losses as (sum of loss items, number of items), so any split can be normalized exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mbp_cli.errors import UsageError

LossFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _class_scores(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten (…, classes) scores and their targets to (items, classes) and (items,)."""
    if output.dim() == 2 and target.dim() == 1:
        return output, target  # the common case; torch checks the sizes itself
    if output.dim() < 2:
        raise UsageError(f"the model output has shape {tuple(output.shape)}; a classification "
                       "loss needs class scores in its last dimension")
    hard = not target.is_floating_point()
    expected = output.shape[:-1] if hard else output.shape
    if target.shape != expected:
        raise UsageError(f"the model output {tuple(output.shape)} does not fit the target "
                       f"{tuple(target.shape)}: expected a target of shape {tuple(expected)}")
    classes = output.shape[-1]
    return output.reshape(-1, classes), target.reshape(-1) if hard else target.reshape(-1, classes)


def cross_entropy(*, ignore_index: int = -100, label_smoothing: float = 0.0) -> LossFn:
    """Cross-entropy over class scores in the last dimension; ignored targets are not items."""

    def loss(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        scores, target = _class_scores(output, target)
        total = F.cross_entropy(scores, target, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, reduction="sum")
        if target.is_floating_point():
            return total, torch.tensor(len(target), device=target.device)
        return total, (target != ignore_index).sum()

    return loss


def nll(*, ignore_index: int = -100) -> LossFn:
    """Negative log-likelihood of log-probabilities in the last dimension."""

    def loss(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        scores, target = _class_scores(output, target)
        total = F.nll_loss(scores, target, ignore_index=ignore_index, reduction="sum")
        return total, (target != ignore_index).sum()

    return loss


def _elementwise(fn: Callable[..., Tensor], **options: float) -> LossFn:
    """A loss whose items are the elements of the output, as torch's `mean` reduction counts."""

    def loss(output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if target.shape != output.shape:
            if target.numel() != output.numel():
                raise UsageError(f"the model output {tuple(output.shape)} does not fit the target "
                               f"{tuple(target.shape)}")
            target = target.reshape(output.shape)
        target = target.to(output.dtype)
        total = fn(output, target, reduction="sum", **options)
        return total, torch.tensor(output.numel(), device=output.device)

    return loss


def mse() -> LossFn:
    """Mean squared error over every output element."""
    return _elementwise(F.mse_loss)


def l1() -> LossFn:
    """Mean absolute error over every output element."""
    return _elementwise(F.l1_loss)


def smooth_l1(*, beta: float = 1.0) -> LossFn:
    """Smooth L1 over every output element."""
    return _elementwise(F.smooth_l1_loss, beta=beta)


def huber(*, delta: float = 1.0) -> LossFn:
    """Huber loss over every output element."""
    return _elementwise(F.huber_loss, delta=delta)


def bce_with_logits() -> LossFn:
    """Binary cross-entropy on logits over every output element."""
    return _elementwise(F.binary_cross_entropy_with_logits)


LOSSES: dict[str, Callable[..., LossFn]] = {
    "cross_entropy": cross_entropy, "nll": nll, "mse": mse, "l1": l1,
    "smooth_l1": smooth_l1, "huber": huber, "bce_with_logits": bce_with_logits,
}
CLASSIFICATION_LOSSES = ("cross_entropy", "nll")


def correct_predictions(output: Tensor, target: Tensor,
                        ignore_index: int = -100) -> tuple[int, int]:
    """(right, counted) for top-1 predictions over class scores in the last dimension."""
    scores, target = _class_scores(output, target)
    if target.is_floating_point():
        target = target.argmax(-1)
    counted = target != ignore_index
    right = (scores.argmax(-1) == target) & counted
    return int(right.sum()), int(counted.sum())
