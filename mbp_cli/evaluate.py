"""Held-out evaluation: mean loss over loss items and top-1 accuracy, in micro-batches."""

from __future__ import annotations

import torch

from mbp_cli.batching import eval_loader
from mbp_cli.build import Setup


def evaluate(setup: Setup, micro_batch: int, num_workers: int) -> dict[str, float | None]:
    """Mean loss (and top-1 accuracy for classification) on the held-out split, under no_grad,
    through the same micro-step as training."""
    if setup.eval_set is None or len(setup.eval_set) == 0:
        return {}
    loader = eval_loader(setup.eval_set, micro_batch, num_workers, setup.device.type == "cuda",
                         setup.collate)
    correct = getattr(setup.loss_fn, "correct", None)  # classification losses count hits
    totals = torch.zeros(4, device=setup.device, dtype=torch.float64)  # loss, items, right, all
    setup.model.eval()
    with torch.no_grad():
        for batch in loader:
            result = setup.micro_step(batch)
            totals[0] += result.loss_sum
            totals[1] += result.items
            if correct is not None:
                right, counted = correct(result.output, result.target)
                totals[2] += right
                totals[3] += counted
    setup.train_mode()
    loss_sum, items, right, counted = totals.tolist()
    accuracy = right / counted if correct is not None and counted else None
    return {"eval_loss": loss_sum / items if items else None, "eval_accuracy": accuracy}
