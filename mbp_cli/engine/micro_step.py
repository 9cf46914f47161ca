"""The micro-step: one micro-batch onto the device, forward, and the loss as (sum, item count).

Training, the probe and evaluation all call it, so the probe measures exactly what training
runs, and a strategy added here (autocast, checkpointing, no_sync) is added once for all three.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import sysconfig
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import mbp_cli
from mbp_cli.catalog.losses import ItemLoss, LossFn
from mbp_cli.catalog.model_loss import is_real, refuse_copy_task
from mbp_cli.errors import MbpError, UsageError, UserCodeError, describe
from mbp_cli.strategies.precision import Precision

# What torch raises when a model does not fit its data or loss (shapes, classes, dtypes)
MISFIT_ERRORS = (RuntimeError, IndexError, ValueError, TypeError, KeyError)
TARGET_KEYS = ("labels", "label", "target")  # looked up in dict batches, in this order
OUTPUT_KEYS = ("logits", "out")  # looked up in dict or object outputs, in this order
WHOLE_OUTPUT = "all"  # model.output: all — a loss of your own reads the whole output


class MicroResult(NamedTuple):
    """What one micro-batch gave: the scores, its target and the loss terms."""

    output: Tensor  # the scores the loss saw (with model.output: all, those found beside)
    target: Tensor
    loss_sum: Tensor  # sum of the loss items (on the device, with its graph in training)
    items: Tensor | int  # how many items that sum is over (or the sum of their class weights)
    samples: int


def to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move a batch tensor to the device; floating-point inputs take the training dtype."""
    if not isinstance(value, Tensor):
        return value
    if dtype is not None and value.is_floating_point():
        return value.to(device=device, dtype=dtype, non_blocking=True)
    return value.to(device=device, non_blocking=True)


def split_batch(batch: Any, target_key: str | None = None
                ) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """(positional inputs, keyword inputs, target) of a collated batch.

    `(inputs, target)` and `(x1, x2, …, target)` give positional arguments; a dict gives keyword
    arguments, its target under `target_key` (default: labels, label or target).
    """
    if type(batch) in (tuple, list) or isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) >= 2:
            return batch[:-1], {}, batch[-1]
    if isinstance(batch, Mapping):
        keys = (target_key,) if target_key else TARGET_KEYS
        key = next((k for k in keys if k in batch), None)
        if key is None:
            raise UsageError(f"a batch is a dict with keys {sorted(batch)}, but none is the "
                             f"target ({' or '.join(keys)}); name it with data.target")
        return (), {k: v for k, v in batch.items() if k != key}, batch[key]
    raise UsageError(f"a batch is {describe(batch)}; expected (inputs, target), "
                     "(input1, input2, …, target) or a dict with a target key")


def pick_output(output: Any, key: str | int | None = None) -> Tensor:
    """The scores in a model's output (what a loss reads, accuracy counts and predict shows):
    the output itself if a tensor; else `key` (a key, an attribute, or an index into a tuple
    or list), or `logits`, then `out` (dicts, Hugging Face outputs), then the first element.
    With `key` WHOLE_OUTPUT the loss reads the whole output, and the scores are found as
    without a key."""
    if isinstance(output, Tensor):
        return output
    if key == WHOLE_OUTPUT:
        return _scores_beside_whole_output(output)
    found = None
    if isinstance(key, int):
        is_indexable = isinstance(output, Sequence) and -len(output) <= key < len(output)
        found = output[key] if is_indexable else None
    for name in () if isinstance(key, int) else (key,) if key else OUTPUT_KEYS:
        found = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if found is not None:
            break
    if found is None and key is None:
        if isinstance(output, Mapping) and output:
            found = next(iter(output.values()))
        elif isinstance(output, Sequence) and output:
            found = output[0]
    if isinstance(found, Tensor):
        return found
    wanted = f"a tensor at {key!r}" if key is not None else "a tensor, a dict or object with " \
        "logits or out, or a tuple or list whose first element is a tensor"
    raise UsageError(f"the model returned {describe(output)}; expected {wanted} "
                     "(name the output with model.output)")


def _scores_beside_whole_output(output: Any) -> Tensor:
    try:
        return pick_output(output)
    except UsageError:
        raise UsageError(f"the model returned {describe(output)}; with model.output: all a "
                         "loss of your own reads it whole, and mbp reads the scores (for "
                         "validate, evaluation and predict) beside it: a tensor, a dict or "
                         "object with logits or out, or a tuple or list whose first element "
                         "is a tensor") from None


def _check_tensor(value: Any, what: str) -> None:
    if not isinstance(value, Tensor):
        raise UsageError(f"the {what} of a batch is {describe(value)}; expected a tensor "
                         "(return tensors from the dataset — a Hugging Face datasets.Dataset: "
                         "with_format('torch') — add data.transforms, or give data.collate)")


@contextlib.contextmanager
def explained_step_errors(is_first: bool) -> Iterator[None]:
    """The first step is where a model that does not fit its data or loss shows: its errors
    become one message (exit 2), after the traceback where code of your own ran (a model's
    forward, a loss). Later ones are raised as they are."""
    try:
        yield
    except MbpError:
        raise
    except Exception as exc:  # sorted just below
        if not is_first:
            raise
        frames = [(frame.filename, _is_users(frame.filename))
                  for frame in traceback.extract_tb(exc.__traceback__)]
        if is_misfit(exc):
            raise UsageError(f"the first training step failed: {str(exc).rstrip('.')}. Check "
                             "that model.args fit the data (input shape, number of classes) "
                             "and the loss") from exc
        where = next((name for name, is_users in reversed(frames) if is_users), None)
        if where is None:
            raise
        raise UserCodeError(f"the first training step failed in {where}: "
                            f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc


def is_misfit(exc: BaseException) -> bool:
    """Whether an error is torch's (or a library's) complaint that a model does not fit its
    data or loss: a misfit raised outside code of your own."""
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, MISFIT_ERRORS) and not (frames and _is_users(frames[-1].filename))


def _is_users(filename: str) -> bool:
    """Whether a file is code of your own (a model, a loss): not torch's, torchvision's,
    transformers', mbp's or Python's."""
    packages = [m for m in (torch, sys.modules.get("torchvision"),
                            sys.modules.get("transformers"), mbp_cli) if m is not None]
    ours = (*(str(Path(m.__file__).parent) for m in packages), sysconfig.get_paths()["stdlib"])
    return not filename.startswith(ours)


class MicroStep:
    """Forward and loss for one micro-batch, as training, the probe and evaluation run it,
    under the run's precision (autocast for bf16 and fp16)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, device: torch.device,
                 dtype: torch.dtype, *, output_key: str | int | None = None,
                 target_key: str | None = None, precision: Precision | None = None) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.device, self.dtype = device, dtype
        self.output_key, self.target_key = output_key, target_key
        self.is_whole_output = output_key == WHOLE_OUTPUT
        if self.is_whole_output and not isinstance(loss_fn, ItemLoss) \
                and not getattr(loss_fn, "takes_model_output", False):
            raise UsageError("model.output: all hands the model's whole output to a loss of "
                             "your own (loss.name: module:callable); the built-in losses read "
                             "one tensor: name it with model.output (a key, an attribute or "
                             "an index)")
        self.precision = precision or Precision("fp32", device)
        self.is_checked = False  # the first micro-batch's targets are checked once

    def on(self, device: torch.device) -> MicroStep:
        """This micro-step, run on another device."""
        moved = copy.copy(self)
        moved.device = device
        return moved

    def __call__(self, batch: Any) -> MicroResult:
        """Run the model on one micro-batch and return its loss sum and item count."""
        if self.precision.dtype is None:
            return self._forward(batch)
        with self.precision.autocast():
            return self._forward(batch)

    def on_device(self, batch: Any) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """A batch's (positional inputs, keyword inputs, target), checked and on the device."""
        if type(batch) in (tuple, list) and len(batch) == 2:
            inputs, target = batch
            if type(inputs) is type(target) is Tensor:  # as most data comes: nothing to look up
                return [to_device(inputs, self.device, self.dtype)], {}, \
                    to_device(target, self.device, self.dtype)
        args, kwargs, target = split_batch(batch, self.target_key)
        _check_tensor(target, "target")
        for value in (*args, *kwargs.values()):
            _check_tensor(value, "input")
        device, dtype = self.device, self.dtype
        args = [to_device(a, device, dtype) for a in args]
        kwargs = {k: to_device(v, device, dtype) for k, v in kwargs.items()} if kwargs else {}
        return args, kwargs, to_device(target, device, dtype)

    def _forward(self, batch: Any) -> MicroResult:
        args, kwargs, target = self.on_device(batch)
        if not self.is_checked and is_real(target):
            self.is_checked = True
            refuse_copy_task(self.loss_fn, kwargs, target)
        if getattr(self.loss_fn, "takes_model_output", False):
            return self._forward_own_loss(args, kwargs, target)
        raw = self.model(*args, **kwargs)
        output = pick_output(raw, self.output_key)
        loss_sum, items = self.loss_fn(raw if self.is_whole_output else output, target)
        return MicroResult(output, target, loss_sum, items, target.shape[0])

    def _forward_own_loss(self, args: list[Tensor], kwargs: dict[str, Tensor],
                          labels: Tensor) -> MicroResult:
        """loss: model — the labels go in with the inputs, as Hugging Face's models take them."""
        loss = self.loss_fn
        items = loss.count(labels)
        raw = self.model(*args, **kwargs, labels=labels, **loss.extra_inputs(items))
        output = pick_output(raw, self.output_key)
        return MicroResult(output, labels, loss.loss_sum(raw, output, labels, items), items,
                           labels.shape[0])
