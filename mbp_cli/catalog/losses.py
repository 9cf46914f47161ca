"""Losses as (sum of loss items, number of items), so any split can be normalized exactly."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbp_cli.catalog.classification import cross_entropy, nll
from mbp_cli.errors import UsageError

# (sum of the loss items, their count): a number where the shapes tell, else a device tensor
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | int]]


def _elementwise(fn: Callable[..., Tensor], **options: float) -> LossFn:
    """A loss whose items are the elements of the output, as torch's `mean` reduction counts."""

    def loss(output: Tensor, target: Tensor) -> tuple[Tensor, int]:
        if target.shape != output.shape:
            if target.numel() != output.numel():
                raise UsageError(f"the model output {tuple(output.shape)} does not fit the target "
                               f"{tuple(target.shape)}")
            target = target.reshape(output.shape)
        target = target.to(output.dtype)
        return fn(output, target, reduction="sum", **options), output.numel()

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


def cosine() -> LossFn:
    """1 − cosine similarity between each sample's output and target (flattened), per sample."""

    def loss(output: Tensor, target: Tensor) -> tuple[Tensor, int]:
        flat = output.reshape(output.shape[0], -1)
        if target.numel() != output.numel():
            raise UsageError(f"the model output {tuple(output.shape)} does not fit the target "
                             f"{tuple(target.shape)}")
        similarity = F.cosine_similarity(flat, target.reshape(flat.shape).to(output.dtype), dim=1)
        return (1 - similarity).sum(), flat.shape[0]

    return loss


LOSSES: dict[str, Callable[..., LossFn]] = {
    "cross_entropy": cross_entropy, "nll": nll, "mse": mse, "l1": l1,
    "smooth_l1": smooth_l1, "huber": huber, "bce_with_logits": bce_with_logits,
    "cosine": cosine,
}


def parameters_of(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """`fn`'s parameters (a class's: its constructor's); none where they cannot be read."""
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _default_of(fn: Callable[..., Any], name: str) -> Any:
    """The default value of `fn`'s argument `name`, or None."""
    parameter = parameters_of(fn).get(name)
    return None if parameter is None or parameter.default is parameter.empty else \
        parameter.default


class ItemLoss:
    """A loss of your own (`package.module:callable`), called as `callable(output, target)`:
    `output` is the scores tensor (model.output names it), or with `model.output: all` the
    model's whole output as it returned it (torchvision segmentation's {"out", "aux"} dict).

    It returns per-item losses, as torch's losses do with `reduction="none"`: mbp sums them and
    counts the elements (leave masked items out of the tensor, or return 0 for targets equal to
    the callable's `ignore_index`, as torch's own losses do). Or it returns `(sum, count)`.
    A loss that takes `reduction`, as torch's classes and functions do
    (`torch.nn:CrossEntropyLoss`, a focal loss of your own), is given `reduction="none"`.
    """

    def __init__(self, fn: Callable[..., Any], name: str, **args: Any) -> None:
        if "reduction" in parameters_of(fn):
            args.setdefault("reduction", "none")
        if inspect.isclass(fn):
            if issubclass(fn, nn.modules.loss._WeightedLoss) and args.get("weight") is not None:
                raise UsageError(f"loss {name}: for class weights use loss.name: cross_entropy "
                                 "(or nll) with loss.args.weight, which divides by the sum of "
                                 "the counted targets' weights as torch's mean does")
            fn, args = fn(**args), {}
        self.fn = functools.partial(fn, **args) if args else fn
        self.name = name
        self.ignore_index = getattr(fn, "ignore_index", args.get("ignore_index",
                                                                 _default_of(fn, "ignore_index")))

    def __call__(self, output: Any, target: Tensor) -> tuple[Tensor, Tensor | int]:
        result = self.fn(output, target)
        if isinstance(result, tuple) and len(result) == 2:
            total, count = result
            if not isinstance(total, Tensor) or total.dim() != 0:
                raise UsageError(f"loss {self.name} returned (sum, count) whose sum is "
                                 f"{getattr(total, 'shape', type(total).__name__)}; expected "
                                 "one number: the sum of the item losses")
            is_number = isinstance(count, int | float)
            return total, count if is_number else torch.as_tensor(count, device=total.device)
        if not isinstance(result, Tensor) or result.dim() == 0:
            got = "one number (a mean?)" if isinstance(result, Tensor) else type(result).__name__
            raise UsageError(f"loss {self.name} returned {got}; expected per-item losses "
                             "(reduction='none') or a (sum, count) pair")
        is_marked = (self.ignore_index is not None and not target.is_floating_point()
                     and result.shape == target.shape)
        if is_marked:  # torch gives ignored targets a loss of 0; they are not items
            return result.sum(), (target != self.ignore_index).sum()
        return result.sum(), result.numel()
