"""Held-out evaluation: mean loss over loss items and top-1 accuracy, in micro-batches; the run's
own, which says how to score a model it kept where it fails at the end."""

from __future__ import annotations

from pathlib import Path

import torch

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.data.batching import HELD_OUT_KEYS, eval_loader, stack_held_out
from mbp_cli.engine.micro_step import is_misfit
from mbp_cli.engine.setup import Setup
from mbp_cli.errors import MbpError, UsageError
from mbp_cli.rng import restore_rng_states, rng_states


def evaluate(setup: Setup, micro_batch: int, num_workers: int) -> dict[str, float | None]:
    """Mean loss (and top-1 accuracy for classification) on the held-out split, under no_grad,
    through the same micro-step as training. Every random generator is left as it was found
    (a random eval transform draws too), so a checkpoint written before it resumes exactly."""
    if setup.eval_set is None or not is_stream(setup.eval_set) and len(setup.eval_set) == 0:
        return {}
    loader = eval_loader(setup.eval_set, micro_batch, num_workers, setup.device.type == "cuda",
                         setup.collate or stack_held_out)
    correct = getattr(setup.loss_fn, "correct", None)  # classification losses count hits
    totals = torch.zeros(4, device=setup.device, dtype=torch.float64)  # loss, items, right, all
    states = rng_states()
    setup.model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                result = setup.micro_step(batch)
                totals[0] += result.loss_sum
                totals[1] += result.items
                if correct is not None:
                    right, counted = correct(result.output, result.target)
                    totals[2] += right
                    totals[3] += counted
    except MbpError:
        raise
    except Exception as exc:  # sorted just below: torch's complaint about a misfit alone
        if not is_misfit(exc):
            raise
        raise UsageError(f"the evaluation on the held-out split failed: "
                         f"{str(exc).rstrip('.')}. Its samples reach the model through "
                         f"{HELD_OUT_KEYS}: check that they fit the model as training's "
                         "do") from exc
    finally:
        setup.train_mode()
        restore_rng_states(states)
    loss_sum, items, right, counted = totals.tolist()
    accuracy = right / counted if correct is not None and counted else None
    return {"eval_loss": loss_sum / items if items else None, "eval_accuracy": accuracy}


def held_out_eval(setup: Setup, micro_batch: int, num_workers: int,
                  kept_in: Path | None) -> dict[str, float | None]:
    """The held-out evaluation; one that fails at the end, after model.pt and the checkpoint
    are written in `kept_in`, says they are kept and how to score them."""
    try:
        return evaluate(setup, micro_batch, num_workers)
    except UsageError as exc:
        if kept_in is None:
            raise
        raise UsageError(f"{exc}. The trained model is kept in {kept_in / 'model.pt'} (and a "
                         f"checkpoint in {kept_in / 'checkpoints'}); score it with: mbp eval "
                         f"{kept_in} --set data.eval_transforms=…") from exc
