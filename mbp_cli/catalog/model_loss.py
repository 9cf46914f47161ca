"""The model's own loss (`loss: model`), Hugging Face's way: the labels go in with the inputs and
the model returns its loss. mbp still normalizes: each micro-batch's loss is turned back into the
*sum* of its items, and the target batch is divided once by the real number of items."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from mbp_cli.catalog.losses import parameters_of
from mbp_cli.errors import UsageError

# What a model's mean loss is over (loss.args.items), counted from the labels
ITEMS = {
    "next_tokens": "labels but the first of each sequence, not ignore_index (causal LMs shift "
                   "inside their loss)",
    "tokens": "labels that are not ignore_index (masked LMs, token classification)",
    "samples": "labels that are not ignore_index, one per sample (sequence classification)",
    "elements": "every label element (regression, multi-label classification)",
}
# Hugging Face's loss types (model.loss_type) whose items are known; HF itself takes a model
# without one for a causal LM (PreTrainedModel.loss_function)
HF_ITEMS = {None: "next_tokens", "ForCausalLM": "next_tokens", "ForMaskedLM": "tokens",
            "ForTokenClassification": "tokens"}
HF_CLASSIFICATION = ("ForSequenceClassification", "ForImageClassification",
                     "ForVideoClassification", "ForAudioClassification")
COPY_HINT = ("loss: model (the model's own loss, which shifts them) or shift the labels in "
             "data.collate")


def is_real(tensor: Tensor) -> bool:
    """Whether a tensor holds values (not fake, as --estimate's, nor on the meta device)."""
    return not isinstance(tensor, FakeTensor) and tensor.device.type != "meta"


def takes_labels(model: nn.Module) -> bool:
    """Whether the model's forward takes `labels`, as Hugging Face's models do."""
    return "labels" in parameters_of(model.forward)


def is_hugging_face(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (known by its parts: transformers is not imported)."""
    return hasattr(model, "config") and hasattr(type(model), "loss_function")


def items_of(model: nn.Module, asked: str | None) -> str:
    """Which label positions the model's mean loss is over: `asked` (loss.args.items), else
    what the Hugging Face loss type says; refused where neither tells."""
    if asked is not None:
        if asked not in ITEMS:
            raise UsageError(f"loss.args.items: expected one of {', '.join(ITEMS)}, got {asked!r}")
        return asked
    loss_type = getattr(model, "loss_type", None)
    if is_hugging_face(model) and loss_type in HF_ITEMS:
        return HF_ITEMS[loss_type]
    if is_hugging_face(model) and loss_type in HF_CLASSIFICATION:
        config = model.config
        if config.problem_type == "regression" or config.num_labels == 1:
            return "elements"
        # samples, or label elements where the labels are floats (multi-label, as HF decides)
        return "elements" if config.problem_type == "multi_label_classification" else "samples"
    kind = f"loss type {loss_type}" if loss_type else type(model).__name__
    if loss_type == "ForConditionalGeneration":
        kind += " (encoder-decoders such as T5 and BART average over tokens; models that shift " \
                "their labels inside, over next_tokens)"
    raise UsageError(
        f"loss: model — mbp divides the target batch's loss sum by its number of items, and "
        f"cannot tell what the mean loss of {kind} is over: set loss.args.items to "
        + "; ".join(f"{name} ({what})" for name, what in ITEMS.items()))


def _loss_of(output: Any) -> Tensor:
    """The loss a model returned: `.loss`, a `loss` key, or a tuple's leading scalar."""
    found = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if found is None and isinstance(output, Sequence) and output:
        found = output[0]
    if not isinstance(found, Tensor) or found.dim() != 0:
        raise UsageError("loss: model, but the model returned no loss (a `.loss`, a `loss` key, "
                         "or a tuple whose first element is one number) for its labels")
    return found


class ModelLoss:
    """The model's mean loss as (sum of items, count): the mean times the micro-batch's count.

    Where the model takes `num_items_in_batch` (Hugging Face's), it is given that count, so its
    loss is the sum divided by it whatever its own rule; either way the count must be what the
    model's mean is over, so the first micro-batch is checked against the mean cross-entropy
    (or squared error, or binary cross-entropy) of the model's own scores.
    """

    takes_model_output = True  # the micro-step hands it the model's whole output

    def __init__(self, model: nn.Module, *, items: str | None = None, ignore_index: int = -100,
                 check: bool = True) -> None:
        self.items = items_of(model, items)
        self.ignore_index = ignore_index
        self.is_checked = not check  # check: false, for a mean that is not of these kinds
        forward = parameters_of(model.forward)
        self.passes_count = getattr(model, "accepts_loss_kwargs", True) is not False and (
            "num_items_in_batch" in forward or is_hugging_face(model) and any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in forward.values()))
        self.correct = self._correct if self.items != "elements" else None

    def count(self, labels: Tensor, items: str | None = None) -> Tensor | int:
        """How many items the labels hold (a device tensor where ignore_index can be among
        them), counted as `items` (default: the model's)."""
        items = items or self.items
        if items == "elements" or labels.is_floating_point():  # multi-label's, say
            return labels.numel()
        counted = labels[..., 1:] if items == "next_tokens" else labels
        return (counted != self.ignore_index).sum()

    def extra_inputs(self, count: Tensor | int) -> dict[str, Any]:
        """What the model is given besides the batch: the count where it takes one (at least 1,
        so a micro-batch of ignored labels sums to 0 instead of 0/0)."""
        if not self.passes_count:
            return {}
        return {"num_items_in_batch": count.clamp(min=1) if isinstance(count, Tensor)
                else max(count, 1)}

    def loss_sum(self, output: Any, scores: Tensor, labels: Tensor, count: Tensor | int) -> Tensor:
        """The sum of the micro-batch's loss items, from the model's mean."""
        mean = _loss_of(output)
        given = self.extra_inputs(count).get("num_items_in_batch", count)
        if not self.is_checked and is_real(mean):
            self.is_checked = True
            with torch.no_grad():
                self._check(mean * given, scores, labels, count)
        return mean * given

    def _scored(self, scores: Tensor, labels: Tensor,
                items: str | None = None) -> tuple[Tensor, Tensor]:
        """(scores, labels) position by position, classes last, shifted for next tokens."""
        if (items or self.items) == "next_tokens":
            scores, labels = scores[..., :-1, :], labels[..., 1:]
        return scores.reshape(-1, scores.shape[-1]), labels.reshape(-1)

    def _reference(self, items: str, scores: Tensor, labels: Tensor) -> Tensor | None:
        """The sum of the loss items the scores give, counted by `items` (None: no fit)."""
        scores = scores.float()
        if items == "elements" or labels.is_floating_point():
            values = labels.to(scores.dtype).reshape(scores.shape) \
                if labels.numel() == scores.numel() else None
            reference = None if values is None else (
                F.mse_loss(scores, values, reduction="sum") if scores.shape[-1] == 1
                else F.binary_cross_entropy_with_logits(scores, values, reduction="sum"))
        else:
            flat_scores, flat_labels = self._scored(scores, labels, items)
            reference = F.cross_entropy(flat_scores, flat_labels, ignore_index=self.ignore_index,
                                        reduction="sum") \
                if flat_scores.shape[0] == flat_labels.shape[0] else None
        return reference

    def _check(self, total: Tensor, scores: Tensor, labels: Tensor, count: Tensor | int) -> None:
        """Refuse a count that is not what the model's mean is over: name the one that is,
        where one is, else say that the loss is no such mean (an auxiliary term, say)."""
        mean = float(total) / max(float(count), 1)

        def fits(items: str) -> bool:  # as a sum (num_items_in_batch taken) or as a mean
            reference = self._reference(items, scores, labels)
            if reference is None:
                return False
            means = reference / max(float(self.count(labels, items)), 1), torch.tensor(mean)
            return bool(torch.isclose(total.float(), reference, rtol=1e-4, atol=1e-5)
                        or torch.isclose(*means, rtol=1e-4, atol=1e-6))

        if fits(self.items):
            return
        fitting = next((items for items in ITEMS if items != self.items and fits(items)), None)
        if fitting is not None:
            raise UsageError(f"loss: model — the model's loss is the mean over its {fitting} "
                             f"({ITEMS[fitting]}), not over its {self.items}: set "
                             f"loss.args.items: {fitting}")
        raise UsageError(
            f"loss: model — the model's loss ({mean:.6g} on the first micro-batch) is not the "
            f"mean cross-entropy (or squared error, or binary cross-entropy) of its scores over "
            f"any of {', '.join(ITEMS)} (an auxiliary term, such as a router's?), so mbp cannot "
            "normalize it exactly over micro-batches: use a loss of mbp's or your own on its "
            "scores, or loss.args.check: false where it is a mean of another kind over "
            "loss.args.items")

    def _correct(self, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(right, counted) top-1 predictions of the counted labels (none of float labels)."""
        if labels.is_floating_point():
            none = torch.zeros((), device=labels.device, dtype=torch.long)
            return none, none
        flat_scores, flat_labels = self._scored(scores, labels)
        counted = flat_labels != self.ignore_index
        return ((flat_scores.argmax(-1) == flat_labels) & counted).sum(), counted.sum()


def refuse_copy_task(loss_fn: Any, inputs: Mapping[str, Any], target: Tensor) -> None:
    """A token loss whose targets are the model's input_ids (Hugging Face's causal-LM labels,
    shifted only inside the model's own loss) would train each position to copy its input."""
    input_ids = inputs.get("input_ids")
    if getattr(loss_fn, "takes_model_output", False) or not isinstance(input_ids, Tensor) or \
            input_ids.shape != target.shape or target.dim() < 2 or target.is_floating_point():
        return
    ignored = getattr(loss_fn, "ignore_index", -100)
    if bool(((target == input_ids) | (target == ignored)).all()):
        raise UsageError("the targets are the model's input_ids, as Hugging Face's causal-LM "
                         "labels are (the model shifts them inside its own loss): this loss "
                         "would train each position to copy its own token. Use "
                         + COPY_HINT)
