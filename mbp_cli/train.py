"""The run: build from the recipe, step through target batches, evaluate, write; never prints."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mbp_cli
from mbp_cli.accumulate import StepTotals, accumulate_gradients
from mbp_cli.batching import MicroBatchStream, steps_per_epoch
from mbp_cli.build import (
    Setup,
    build,
    build_optimizer,
    build_schedule,
    has_batch_norm,
    resolve_device,
    smallest_micro_batch,
)
from mbp_cli.checkpoint import LoopState, save_checkpoint
from mbp_cli.errors import DoesNotFitError, NonFiniteLossError, StoppedError, UsageError
from mbp_cli.evaluate import evaluate
from mbp_cli.memory.probe import ProbeOptions, probe_setup
from mbp_cli.memory.tracker import (
    PeakMemory,
    StorageTracker,
    free_cached_memory,
    is_out_of_memory,
    training_state_tensors,
)
from mbp_cli.recipe import Recipe, dump_recipe
from mbp_cli.resume import resume_state
from mbp_cli.rundir import (
    MetricsLog,
    prepare_run_dir,
    save_state_dict,
    write_atomic,
    write_json,
)
from mbp_cli.stopping import StopRequest, graceful_stop

Event = dict[str, Any]
EventSink = Callable[[Event], None]


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe."""

    run_dir: Path
    max_steps: int | None = None
    budget_bytes: int | None = None  # for `batch.micro: auto`
    simulated_memory: StorageTracker | None = None  # a simulated device of tracker's capacity
    resume: bool = False  # continue from the run folder's newest good checkpoint
    overwrite: bool = False  # replace the results of an earlier run in run_dir


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


def starting_micro_batch(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                       options: RunOptions, record: EventSink) -> int:
    """The recipe's micro-batch, or for `auto` the probe's choice (saved as probe.json, and
    taken from there when a run resumes)."""
    if recipe.batch.micro != "auto":
        return recipe.batch.micro
    saved = options.run_dir / "probe.json"
    if options.resume and saved.exists():
        micro_batch = int(json.loads(saved.read_text())["micro_batch"])
        record({"event": "probe", "reused": str(saved), "micro_batch": micro_batch})
        return micro_batch
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
    scheduler = build_schedule(optimizer, recipe.schedule, total_steps)

    run_dir = options.run_dir
    if options.resume:
        loop = resume_state(run_dir, setup.model, optimizer, scheduler, emit)
    else:  # only now, with everything built, is the folder made (and old results removed)
        loop = None
        prepare_run_dir(run_dir, options.overwrite)
    write_atomic(run_dir / "recipe.yaml", dump_recipe(recipe).encode(), what="recipe")
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    simulated = options.simulated_memory
    if simulated is not None:
        simulated.register(training_state_tensors(model, optimizer))
    memory = PeakMemory(device, simulated)

    def record(event: Event) -> None:
        metrics.write(event)
        emit(event)

    if loop is None:
        loop = LoopState(starting_micro_batch(recipe, setup, optimizer, options, record))
    stream = MicroBatchStream(setup.train_set, target, loop.micro_batch, recipe.seed,
                              recipe.batch.drop_last, total_steps, recipe.train.num_workers,
                              device.type == "cuda", start_step=loop.step)
    emit({"event": "start", "name": recipe.name, "device": str(device),
          "dtype": recipe.train.dtype, "target_batch": target, "micro_batch": loop.micro_batch,
          "accumulation_steps": math.ceil(target / loop.micro_batch),
          "total_steps": total_steps, "start_step": loop.step, "steps_per_epoch": per_epoch,
          "train_samples": len(setup.train_set),
          "eval_samples": len(setup.eval_set) if setup.eval_set is not None else 0,
          "parameters": sum(p.numel() for p in model.parameters()), "run_dir": str(run_dir)})
    if has_batch_norm(model) and loop.micro_batch < target:
        record({"event": "warning", "message": (
            "the model has BatchNorm layers: their statistics are computed per micro-batch of "
            f"{loop.micro_batch}, so training is not exactly equal to full batches of {target}")})

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, model, optimizer, scheduler, loop,
                               recipe.train.keep_checkpoints)

    model.train()
    with graceful_stop() as stop, (simulated or contextlib.nullcontext()):
        try:
            while loop.step < total_steps:
                step_started = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                totals = run_step(setup, stream.pieces(loop.step), loop.step)
                if totals is None:  # out of memory: redo this whole target batch, smaller
                    shrink_micro_batch(loop, stream, smallest_micro_batch(model), record)
                    continue
                if not math.isfinite(totals.loss):
                    handle_nonfinite(recipe, loop, totals, optimizer, checkpoint, record)
                else:
                    optimizer.step()
                    loop.last_loss = totals.loss
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_seconds = time.perf_counter() - step_started
                loop.step += 1
                loop.train_seconds += step_seconds
                loop.samples_seen += totals.samples
                record({"event": "step", "step": loop.step, "total_steps": total_steps,
                        "epoch": (loop.step - 1) // per_epoch + 1, "loss": totals.loss,
                        "lr": lr, "samples": totals.samples, "items": totals.items,
                        "micro_batches": totals.micro_batches, "step_seconds": step_seconds,
                        "samples_per_second": totals.samples / step_seconds,
                        "peak_memory_bytes": memory.peak_bytes()})
                if is_due(loop.step, recipe.train.eval_every, total_steps):
                    loop.eval_result = evaluate(setup, recipe, stream.micro_batch)
                    if loop.eval_result:
                        record({"event": "eval", "step": loop.step, **loop.eval_result})
                if is_due(loop.step, recipe.train.checkpoint_every, total_steps):
                    checkpoint()
                if stop.is_set:
                    stop_now(stop, loop, checkpoint, record)
        finally:
            metrics.close()

    save_state_dict(run_dir / "model.pt", model.state_dict())
    summary = summarize(recipe, loop, total_steps, memory, time.perf_counter() - started,
                        device, run_dir)
    write_json(run_dir / "summary.json", summary)
    emit({"event": "done", **summary})
    return summary


def is_due(step: int, every: int, total_steps: int) -> bool:
    """Whether something done every `every` steps (0: never) and at the end is due now."""
    return step == total_steps or bool(every and step % every == 0)


def summarize(recipe: Recipe, loop: LoopState, total_steps: int, memory: PeakMemory,
              wall_seconds: float, device: torch.device, run_dir: Path) -> dict[str, Any]:
    """summary.json: what the run did, how fast, in how much memory, with which versions."""
    target = recipe.batch.target
    return {
        "name": recipe.name, "steps": total_steps, "samples_seen": loop.samples_seen,
        "final_train_loss": loop.last_loss, **loop.eval_result, "target_batch": target,
        "micro_batch": loop.micro_batch,
        "accumulation_steps": math.ceil(target / loop.micro_batch),
        "oom_retries": loop.oom_retries, "skipped_steps": loop.skipped_steps,
        "samples_per_second": (loop.samples_seen / loop.train_seconds
                               if loop.train_seconds else None),
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_source": memory.source,
        "wall_seconds": wall_seconds, "device": str(device),
        "versions": {"mbp": mbp_cli.__version__, "torch": torch.__version__},
        "run_dir": str(run_dir),
    }


def shrink_micro_batch(loop: LoopState, stream: MicroBatchStream, smallest: int,
                       record: EventSink) -> None:
    """After an out-of-memory step: halve the micro-batch and restart this step's batch."""
    if loop.micro_batch <= smallest:
        raise DoesNotFitError("out of memory during training even with a micro-batch of "
                              f"{loop.micro_batch}")
    smaller = max(smallest, loop.micro_batch // 2)
    loop.oom_retries += 1
    record({"event": "oom", "step": loop.step + 1, "micro_batch_before": loop.micro_batch,
            "micro_batch": smaller})
    loop.micro_batch = smaller
    stream.restart(loop.step, loop.micro_batch)


def handle_nonfinite(recipe: Recipe, loop: LoopState, totals: StepTotals,
                     optimizer: torch.optim.Optimizer, checkpoint: Callable[[], Path],
                     record: EventSink) -> None:
    """A NaN or infinite loss: stop with a checkpoint of the last good state, or skip the batch."""
    optimizer.zero_grad(set_to_none=True)  # the update is dropped either way
    step = loop.step + 1
    if recipe.train.on_nonfinite == "skip":
        loop.skipped_steps += 1
        record({"event": "warning", "message": f"the loss at step {step} is {totals.loss}: "
                "this target batch's update is skipped (train.on_nonfinite: skip)"})
        return
    path = checkpoint()
    raise NonFiniteLossError(
        f"the loss at step {step} is {totals.loss}; stopped before updating the model. The last "
        f"good state (after step {loop.step}) is in {path}. Lower optim.args.lr, or set "
        "train.on_nonfinite: skip to drop such batches")


def stop_now(stop: StopRequest, loop: LoopState, checkpoint: Callable[[], Path],
             record: EventSink) -> None:
    """After a stop signal: checkpoint the finished target batch and end with 130 or 143."""
    path = checkpoint()
    record({"event": "stopped", "step": loop.step, "signal": stop.signal.name,
            "checkpoint": str(path)})
    raise StoppedError(f"by {stop.signal.name} after step {loop.step}; checkpoint "
                       f"{path}. Resume with: mbp train --resume {path.parent.parent}",
                       exit_code=stop.exit_code)
