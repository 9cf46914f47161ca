"""Class-score losses (cross_entropy, nll) as (sum, count): class layout, weights, accuracy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mbp_cli.errors import UsageError
from mbp_cli.tensor_files import load_tensors


def _readings(output: Tensor, target: Tensor) -> tuple[tuple[int, ...], tuple, tuple]:
    """The class dimensions (1, -1) whose reading fits the target, and the target shape each
    reading expects."""
    if output.dim() < 2:
        raise UsageError(f"the model output has shape {tuple(output.shape)}; a classification "
                         "loss needs class scores of shape (N, C) or (N, C, d1, …)")
    soft = target.is_floating_point()
    first = tuple(output.shape) if soft else (output.shape[0], *output.shape[2:])
    last = tuple(output.shape) if soft else tuple(output.shape[:-1])
    fits = tuple(dim for dim, shape in ((1, first), (-1, last)) if tuple(target.shape) == shape)
    return fits, first, last


def class_dim_of(output: Tensor, target: Tensor, forced: int | None = None) -> int:
    """Where the class scores are: 1 as torch has them ((N, C), (N, C, d1, …, dk)) or -1, last,
    as language models write them ((N, L, C)). Decided by the shapes; where both readings fit
    (C == L) torch's is taken, unless `forced` (loss.args.class_dim) says otherwise."""
    if output.dim() == 2 and forced is None:
        return 1
    fits, first, last = _readings(output, target)
    for dim in (forced,) if forced is not None else (1, -1):
        if dim in fits:
            return dim
    kind = "class probabilities" if target.is_floating_point() else "class indices"
    expected = (f"a target of shape {first} with classes in dim 1 (as torch's cross_entropy), "
                f"or {last} with classes last")
    if forced is not None:
        expected = f"a target of shape {first if forced == 1 else last} " \
                   f"(loss.args.class_dim: {forced})"
    raise UsageError(f"the model output {tuple(output.shape)} does not fit the target "
                     f"{tuple(target.shape)} of {kind}: expected {expected}")


class ClassLayout:
    """Where a run's class scores are, decided once and kept: a micro-batch whose padded length
    happens to equal the number of classes (both readings fit) is read as the others were."""

    def __init__(self, forced: int | None) -> None:
        if forced not in (None, 1, -1):
            raise UsageError(f"loss.args.class_dim: expected 1 or -1, got {forced!r}")
        self.forced = forced
        self.known: int | None = None  # from a micro-batch only one reading fits
        self.guessed: int | None = None  # taken where both fit, before anything was known

    def class_dim(self, output: Tensor, target: Tensor) -> int:
        """1 or -1 for this micro-batch, consistent with the run's earlier ones."""
        if self.forced is not None or output.dim() == 2:
            return class_dim_of(output, target, self.forced)
        fits, _, _ = _readings(output, target)
        if len(fits) == 2:
            if self.known is None:
                self.guessed = 1  # torch's reading
            return self.known or 1
        dim = fits[0] if fits else class_dim_of(output, target)  # none fits: its message
        if self.guessed is not None and dim != self.guessed:
            raise UsageError(f"the class scores are last in a model output of shape "
                             f"{tuple(output.shape)}, but an earlier micro-batch, where both "
                             "readings fit, was read with classes in dim 1; set "
                             "loss.args.class_dim: -1")
        self.known = dim
        return dim

    def guess(self) -> str | None:
        """Which reading was taken where it was a guess (both fit and no micro-batch told)."""
        if self.guessed is None or self.known is not None:
            return None
        return ("the model output's number of classes equals its sequence length, so either "
                "dimension could hold the classes: they were read in dim 1, as torch's "
                "cross_entropy has them; set loss.args.class_dim: -1 if they are last (as "
                "language models write them)")


def _scores_and_target(output: Tensor, target: Tensor,
                       layout: ClassLayout) -> tuple[Tensor, Tensor]:
    """Scores with classes in dim 1 and their target, as torch's losses take them."""
    if output.dim() == 2 and target.dim() == 1:
        return output, target  # the common case; torch checks the sizes itself
    if layout.class_dim(output, target) == -1 and output.dim() > 2:
        classes = output.shape[-1]  # (N, L, C) → (N·L, C): classes in dim 1, as a view
        soft = target.is_floating_point()
        return output.reshape(-1, classes), target.reshape(-1, classes) if soft else \
            target.reshape(-1)
    return output, target


def _class_weight(weight: list[float] | str | None) -> Tensor | None:
    """Class weights from a list or a tensor file (torch.save of a 1-d tensor)."""
    if weight is None:
        return None
    if isinstance(weight, str):
        try:
            weight = load_tensors(weight)
        except ValueError as exc:
            raise UsageError(f"loss.args.weight: cannot load {weight}: {exc}") from exc
    try:
        tensor = torch.as_tensor(weight, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"loss.args.weight: expected a list of numbers, got {weight!r}") from exc
    if tensor.dim() != 1 or not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise UsageError("loss.args.weight: expected one finite, non-negative weight per class")
    return tensor


class ClassificationLoss:
    """A class-score loss as (sum of item losses, item count), plus top-1 accuracy.

    Torch's mean divides by the sum of the counted targets' class weights (the number of
    counted targets without weights; ignored targets are not counted), so that is the count.
    """

    def __init__(self, loss: Callable[..., Tensor], ignore_index: int,
                 weight: list[float] | str | None, class_dim: int | None,
                 **options: float) -> None:
        self.loss, self.ignore_index, self.layout = loss, ignore_index, ClassLayout(class_dim)
        self.options = options
        self.weight = _class_weight(weight)
        self.may_ignore = True  # whether a target may be ignore_index (counting_every_target)
        self._weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def counting_every_target(self) -> ClassificationLoss:
        """This loss for data none of whose targets is ignore_index: the count is then the
        number of targets, with no op per micro-batch."""
        spared = copy.copy(self)
        spared.may_ignore = False
        return spared

    def _weight_like(self, output: Tensor) -> Tensor | None:
        if self.weight is None:
            return None
        key = (output.device, output.dtype)
        if key not in self._weights:  # moved once per device and dtype, not per micro-batch
            self._weights[key] = self.weight.to(output.device, output.dtype)
        return self._weights[key]

    def __call__(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor | int]:
        scores, target = _scores_and_target(output, target, self.layout)
        weight = self._weight_like(scores)
        total = self.loss(scores, target, weight=weight, ignore_index=self.ignore_index,
                          reduction="sum", **self.options)
        if target.is_floating_point():  # class probabilities: every position is an item
            return total, target.numel() // target.shape[1]
        if weight is None and not self.may_ignore:
            return total, target.numel()
        counted = target != self.ignore_index
        if weight is None:
            return total, torch.count_nonzero(counted)
        return total, (weight[torch.where(counted, target, 0)] * counted).sum()

    def correct(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(right, counted) top-1 predictions, as tensors on the device."""
        scores, target = _scores_and_target(output, target, self.layout)
        if target.is_floating_point():
            target = target.argmax(1)
        counted = target != self.ignore_index
        return ((scores.argmax(1) == target) & counted).sum(), counted.sum()


def cross_entropy(*, ignore_index: int = -100, label_smoothing: float = 0.0,
                  weight: list[float] | str | None = None,
                  class_dim: int | None = None) -> ClassificationLoss:
    """Cross-entropy as torch computes it: classes in dim 1, or last (decided by shapes)."""
    return ClassificationLoss(F.cross_entropy, ignore_index, weight, class_dim,
                              label_smoothing=label_smoothing)


def nll(*, ignore_index: int = -100, weight: list[float] | str | None = None,
        class_dim: int | None = None) -> ClassificationLoss:
    """Negative log-likelihood of log-probabilities, classes in dim 1 or last."""
    return ClassificationLoss(F.nll_loss, ignore_index, weight, class_dim)
