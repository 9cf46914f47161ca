"""Held-out evaluation: mean loss over loss items and top-1 accuracy, in micro-batches."""

from __future__ import annotations

import torch

from mbp_cli.accumulate import to_device
from mbp_cli.batching import eval_loader
from mbp_cli.build import Setup
from mbp_cli.losses import CLASSIFICATION_LOSSES, correct_predictions
from mbp_cli.recipe import Recipe


def evaluate(setup: Setup, recipe: Recipe, micro_batch: int) -> dict[str, float | None]:
    """Mean loss (and top-1 accuracy for classification) on the held-out split, under no_grad."""
    if setup.eval_set is None or len(setup.eval_set) == 0:
        return {}
    pin = setup.device.type == "cuda"
    loader = eval_loader(setup.eval_set, micro_batch, recipe.train.num_workers, pin)
    ignore_index = recipe.loss.args.get("ignore_index", -100)
    is_classification = recipe.loss.name in CLASSIFICATION_LOSSES
    loss_sum, items, right, counted = 0.0, 0, 0, 0
    setup.model.eval()
    with torch.no_grad():
        for inputs, targets in loader:
            inputs = to_device(inputs, setup.device, setup.dtype)
            targets = to_device(targets, setup.device, setup.dtype)
            output = setup.model(inputs)
            micro_sum, micro_items = setup.loss_fn(output, targets)
            loss_sum += float(micro_sum)
            items += int(micro_items)
            if is_classification:
                r, c = correct_predictions(output, targets, ignore_index)
                right, counted = right + r, counted + c
    setup.model.train()
    accuracy = right / counted if is_classification and counted else None
    return {"eval_loss": loss_sum / items if items else None, "eval_accuracy": accuracy}
