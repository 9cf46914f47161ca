"""The run: build from the recipe, step through target batches, evaluate, write; never prints."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mbp_cli
from mbp_cli import registry
from mbp_cli.accumulate import StepTotals, accumulate_gradients, to_device
from mbp_cli.batching import MicroBatchStream, eval_loader, steps_per_epoch
from mbp_cli.errors import DoesNotFitError, UsageError
from mbp_cli.losses import CLASSIFICATION_LOSSES, correct_predictions
from mbp_cli.memory import (
    PeakMemory,
    StorageTracker,
    free_cached_memory,
    is_out_of_memory,
    training_state_tensors,
)
from mbp_cli.probe import ProbeOptions, probe_setup
from mbp_cli.recipe import Recipe, dump_recipe
from mbp_cli.rundir import MetricsLog, save_state_dict, write_atomic, write_json
from mbp_cli.setup import Setup, build, build_optimizer, has_batch_norm, resolve_device

Event = dict[str, Any]
EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe."""

    run_dir: Path
    max_steps: int | None = None
    budget_bytes: int | None = None  # for `batch.micro: auto`
    simulated_memory: StorageTracker | None = None  # a simulated device of tracker's capacity


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


def run_step(setup: Setup, pieces: Iterable[tuple[Tensor, Tensor]],
             step: int) -> StepTotals | None:
    """One target batch's gradient, or None when it ran out of memory (gradients cleared)."""
    try:
        return accumulate_gradients(setup.model, pieces, setup.loss_fn, setup.device, setup.dtype)
    except Exception as exc:  # sorted just below: only out-of-memory is handled
        if not is_out_of_memory(exc):
            if step > 0 or not isinstance(exc, RuntimeError | IndexError | ValueError):
                raise
            # The first step is where a model that does not fit its data or loss shows.
            raise UsageError(f"the first training step failed: {exc}. Check that model.args "
                             "fit the data (input shape, number of classes) and the loss") from exc
    # Out of the except block, whose traceback held the failed step's tensors: free them.
    setup.model.zero_grad(set_to_none=True)  # a backward that failed halfway left partial sums
    free_cached_memory(setup.device)
    return None


def choose_micro_batch(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                       options: RunOptions, record: EventSink) -> int:
    """The recipe's micro-batch, or for `auto` the probe's choice (saved as probe.json)."""
    if recipe.batch.micro != "auto":
        return recipe.batch.micro
    capacity = options.simulated_memory.capacity_bytes if options.simulated_memory else None
    result = probe_setup(recipe, setup, optimizer, ProbeOptions(
        setup.device, budget_bytes=options.budget_bytes, capacity_bytes=capacity))
    write_json(options.run_dir / "probe.json", result.to_dict())
    record({"event": "probe", "micro_batch": result.micro_batch,
            "accumulation_steps": result.accumulation_steps, "budget_bytes": result.budget_bytes,
            "predicted_peak_bytes": result.predicted_peak_bytes,
            "verified_peak_bytes": result.verified_peak_bytes, "backend": result.backend})
    return result.micro_batch


def train(recipe: Recipe, options: RunOptions, emit: EventSink) -> dict[str, Any]:
    """Train the recipe into `options.run_dir` and return the summary; events go to `emit`."""
    started = time.perf_counter()
    device = resolve_device(recipe.train.device)
    setup = build(recipe, device)
    model, target = setup.model, recipe.batch.target
    if len(setup.train_set) < target and recipe.batch.drop_last:
        raise UsageError(f"batch.drop_last: the training split has {len(setup.train_set)} "
                         f"samples, fewer than one target batch of {target}")
    optimizer = build_optimizer(recipe, model)
    per_epoch = steps_per_epoch(len(setup.train_set), target, recipe.batch.drop_last)
    total_steps = recipe.train.steps or recipe.train.epochs * per_epoch
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    scheduler = registry.build_schedule(optimizer, recipe.schedule, total_steps)

    run_dir = options.run_dir
    write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe).encode())
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    simulated = options.simulated_memory
    if simulated is not None:
        simulated.register(training_state_tensors(model, optimizer))
    memory = PeakMemory(device, simulated)

    def record(event: Event) -> None:
        metrics.write(event)
        emit(event)

    micro = choose_micro_batch(recipe, setup, optimizer, options, record)
    stream = MicroBatchStream(setup.train_set, target, micro, recipe.seed, recipe.batch.drop_last,
                              total_steps, recipe.train.num_workers, device.type == "cuda")
    emit({"event": "start", "name": recipe.name, "device": str(device),
          "dtype": recipe.train.dtype, "target_batch": target, "micro_batch": micro,
          "accumulation_steps": math.ceil(target / micro), "total_steps": total_steps,
          "steps_per_epoch": per_epoch, "train_samples": len(setup.train_set),
          "eval_samples": len(setup.eval_set) if setup.eval_set is not None else 0,
          "parameters": sum(p.numel() for p in model.parameters()), "run_dir": str(run_dir)})
    if has_batch_norm(model) and micro < target:
        record({"event": "warning", "message": (
            "the model has BatchNorm layers: their statistics are computed per micro-batch of "
            f"{micro}, so training is not exactly equal to full batches of {target}")})

    samples_seen, last_loss, train_seconds, oom_retries = 0, float("nan"), 0.0, 0
    eval_result: dict[str, float | None] = {}
    model.train()
    step = 0
    with simulated if simulated is not None else contextlib.nullcontext():
        try:
            while step < total_steps:
                step_started = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                totals = run_step(setup, stream.pieces(step), step)
                if totals is None:  # out of memory: redo this whole target batch, smaller
                    if stream.micro_batch == 1:
                        raise DoesNotFitError("out of memory during training even with a "
                                              "micro-batch of 1")
                    oom_retries += 1
                    record({"event": "oom", "step": step + 1, "micro_batch_before":
                            stream.micro_batch, "micro_batch": stream.micro_batch // 2})
                    stream.restart(step, stream.micro_batch // 2)
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds = time.perf_counter() - step_started
                train_seconds += step_seconds
                samples_seen += totals.samples
                last_loss = totals.loss
                step += 1
                record({"event": "step", "step": step, "total_steps": total_steps,
                        "epoch": (step - 1) // per_epoch + 1, "loss": totals.loss, "lr": lr,
                        "samples": totals.samples, "items": totals.items,
                        "micro_batches": totals.micro_batches, "step_seconds": step_seconds,
                        "samples_per_second": totals.samples / step_seconds,
                        "peak_memory_bytes": memory.peak_bytes()})
                if step == total_steps or (recipe.train.eval_every
                                           and step % recipe.train.eval_every == 0):
                    eval_result = evaluate(setup, recipe, stream.micro_batch)
                    if eval_result:
                        record({"event": "eval", "step": step, **eval_result})
        finally:
            metrics.close()

    save_state_dict(run_dir / "model.pt", model.state_dict())
    summary = {
        "name": recipe.name, "steps": total_steps, "samples_seen": samples_seen,
        "final_train_loss": last_loss, **eval_result, "target_batch": target,
        "micro_batch": stream.micro_batch, "accumulation_steps": math.ceil(
            target / stream.micro_batch), "oom_retries": oom_retries,
        "samples_per_second": samples_seen / train_seconds if train_seconds else None,
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_source": memory.source,
        "wall_seconds": time.perf_counter() - started, "device": str(device),
        "versions": {"mbp": mbp_cli.__version__, "torch": torch.__version__},
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    emit({"event": "done", **summary})
    return summary
