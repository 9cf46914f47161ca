"""The loop: a started run trained target batch by target batch — step, update, checkpoint,
evaluate, stop — and its summary written; never prints."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mbp_cli
from mbp_cli.data.batching import accumulation_steps
from mbp_cli.engine.model import smallest_micro_batch
from mbp_cli.errors import DoesNotFitError, NonFiniteLossError, StoppedError, is_out_of_memory
from mbp_cli.events import Done, Eval, OutOfMemory, Overflow, Rebalance, RunWarning, Step, Stopped
from mbp_cli.memory.tracker import process_peak_rss
from mbp_cli.run.checkpoint import rank_state, save_checkpoint
from mbp_cli.run.evaluate import held_out_eval
from mbp_cli.run.folder import save_state_dict, write_json
from mbp_cli.run.shares import balanced_shares, record_speeds
from mbp_cli.run.start import Run
from mbp_cli.run.stopping import StopRequest, graceful_stop
from mbp_cli.run.target_batch import StepOutcome, clip_gradients, target_batch_step
from mbp_cli.strategies.precision import Precision


def train_loop(run: Run) -> dict[str, Any]:
    """Train the started run to its stop step and return the summary (rank 0 writes it and
    every result file; every rank runs the same steps)."""
    settings, state, stream, ranks = run.settings, run.state, run.stream, run.ranks
    setup, optimizer, emit = run.setup, run.optimizer, run.emit
    with graceful_stop() as stop, contextlib.ExitStack() as ending:
        ending.callback(run.folder.close_loggers)  # after the summary, which they log too
        with run.memory.tracker or contextlib.nullcontext():  # a simulated device counts
            try:
                while state.step < settings.stop_step:
                    step_started = time.perf_counter()
                    lr = optimizer.param_groups[0]["lr"]
                    is_first = state.step == settings.first_step
                    with run.memory.measuring():  # the CPU's first target batches: tracked
                        outcome = target_batch_step(
                            setup.micro_step, stream.pieces(state.step), ranks,
                            statistics=setup.target_batch(ranks), is_first=is_first,
                            peak_bytes=run.memory.peak_bytes, micro_batch=stream.micro_batch,
                            share=stream.share_at(state.step),
                            stop_asked=lambda: stop.is_set)
                        grad_norm = update(run, outcome) if outcome.totals else None
                    layout = getattr(setup.loss_fn, "layout", None)  # classification losses'
                    if is_first and layout is not None and layout.guess():
                        emit(RunWarning(layout.guess()))
                    if outcome.totals is None:  # out of memory: redo the target batch, smaller
                        shrink_micro_batch(run, outcome)
                        continue
                    step_seconds = time.perf_counter() - step_started
                    state.step += 1
                    state.train_seconds += step_seconds
                    state.samples_seen += outcome.totals.samples
                    emit_step(run, outcome, lr, grad_norm, step_seconds)
                    if settings.rebalance_every is not None:
                        rebalance(run, outcome)
                    after_step(run)
                    is_last = state.step == settings.stop_step  # a stop asked now is moot
                    # Ranks stop after the same target batch: the one whose exchange first
                    # carried the signal; one process, the one it came during.
                    asked = outcome.stop_asked if ranks.is_distributed else stop.is_set
                    if not is_last and asked:
                        stop_now(run, stop)
            finally:
                run.folder.close()
        return finish(run)  # a stop signal during it changes nothing


def update(run: Run, outcome: StepOutcome) -> float | None:
    """The optimizer step of a finished target batch (clipped; skipped on an fp16 overflow;
    stopped or skipped on a non-finite loss) and the schedule's; the gradient's norm before
    clipping, where clipping is asked."""
    settings, state, totals = run.settings, run.state, outcome.totals
    precision, optimizer = run.setup.micro_step.precision, run.optimizer
    grad_norm = None
    is_finite = math.isfinite(totals.loss)  # the same on every rank: the global mean
    if is_finite:
        precision.unscale_(optimizer)
        grad_norm = clip_gradients(run.setup.model, settings.clip_grad_norm,
                                   settings.clip_grad_value)
        if optimizer_step(precision, optimizer):
            state.last_loss = totals.loss
        else:  # fp16 overflow: the whole target batch is skipped, once
            state.overflow_skips += 1
            run.emit(Overflow(step=state.step + 1, loss_scale=precision.scale))
    if run.ranks.world.is_main:  # the first target batch went through (or stops with a
        run.folder.open()  # checkpoint of the last good state)
    if not is_finite:
        handle_nonfinite(run, totals.loss)
    step_schedule(run.scheduler)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def emit_step(run: Run, outcome: StepOutcome, lr: float, grad_norm: float | None,
              step_seconds: float) -> None:
    """The Step event of the target batch just trained (and a stream's short pass, once)."""
    settings, state, stream, totals = run.settings, run.state, run.stream, outcome.totals
    if settings.is_streamed:
        epoch = stream.held_epoch + 1
        if stream.short_pass and state.step == settings.first_step + 1:
            run.emit(RunWarning(
                f"the stream's pass ended after {stream.short_pass} samples, short of a target "
                f"batch of {settings.target_batch}: each step is one whole pass, smaller than "
                "batch.target"))
    else:
        epoch = (state.step - 1) // settings.steps_per_epoch + 1
    world = run.ranks.world
    run.emit(Step(step=state.step, total_steps=settings.total_steps, epoch=epoch,
                  loss=totals.loss, lr=lr, samples=totals.samples, items=totals.items,
                  micro_batches=totals.micro_batches, step_seconds=step_seconds,
                  samples_per_second=totals.samples / step_seconds,
                  peak_memory_bytes=run.memory.peak_bytes(), grad_norm=grad_norm,
                  ranks=[r.to_dict(i) for i, r in enumerate(outcome.reports)]
                  if world.is_distributed else None,
                  micro_batch=stream.micro_batch))


def after_step(run: Run) -> None:
    """What is due after a step: the checkpoint and the model before the evaluation, so one
    that fails (held-out samples the model cannot take) loses no trained step."""
    settings, state = run.settings, run.state
    is_last = state.step == settings.stop_step
    is_main = run.ranks.world.is_main
    if is_due(state.step, settings.checkpoint_every, settings.stop_step):
        write_checkpoint(run)
    if is_last and is_main:
        save_state_dict(settings.run_dir / "model.pt", run.setup.model.state_dict())
    if is_due(state.step, settings.eval_every, settings.stop_step) and is_main:
        state.eval_result = held_out_eval(run.setup, run.stream.micro_batch,
                                          settings.num_workers,
                                          settings.run_dir if is_last else None)
        if state.eval_result:
            run.emit(Eval(step=state.step, **state.eval_result))


def write_checkpoint(run: Run) -> Path | None:
    """Every rank takes part (their RNG states are gathered); rank 0 writes."""
    state, stream = run.state, run.stream
    state.micro_batch = stream.micro_batch
    state.loss_scale = run.setup.micro_step.precision.state_dict()
    state.wall_seconds = run.earlier_wall_seconds + time.perf_counter() - run.started
    if run.settings.is_streamed:  # where a resumed run picks the stream up
        state.stream_position = stream.position
    states = run.ranks.gather_objects(rank_state(stream.micro_batch))
    if not run.ranks.world.is_main:
        return None
    return save_checkpoint(run.settings.run_dir, run.setup.model, run.optimizer, run.scheduler,
                           state, run.settings.keep_checkpoints, states,
                           run.folder.recipe.to_dict())


def finish(run: Run) -> dict[str, Any]:
    """summary.json: what the run did, how fast, in how much memory, with which versions."""
    settings, state, ranks = run.settings, run.state, run.ranks
    state.micro_batch = run.stream.micro_batch
    this_part = time.perf_counter() - run.started
    target, micro_batch = settings.target_batch, state.micro_batch
    summary = {
        "name": settings.name, "steps": state.step, "total_steps": settings.total_steps,
        "samples_seen": state.samples_seen, "final_train_loss": state.last_loss,
        **state.eval_result, "target_batch": target, "micro_batch": micro_batch,
        "accumulation_steps": accumulation_steps(target, micro_batch),
        "oom_retries": state.oom_retries, "skipped_steps": state.skipped_steps,
        "overflow_skips": state.overflow_skips, "dtype": settings.dtype,
        "precision": run.choice.precision, "strategies": run.choice.label,
        "samples_per_second": (state.samples_seen / state.train_seconds
                               if state.train_seconds else None),
        "peak_memory_bytes": run.memory.peak_bytes(), "peak_memory_source": run.memory.source,
        "process_peak_rss_bytes": process_peak_rss(),
        "wall_seconds": run.earlier_wall_seconds + this_part,
        "device": str(run.setup.device),
        "versions": {"mbp": mbp_cli.__version__, "torch": torch.__version__},
        "run_dir": str(settings.run_dir),
    }
    if settings.first_step:  # a resumed run: the summary covers every part, this one said apart
        summary.update(resumed_at_step=settings.first_step, resumed_wall_seconds=this_part)
    summary.update(compile_seconds=run.compile_seconds,
                   loss_scale=run.setup.micro_step.precision.scale)
    if ranks.is_distributed:
        summary.update(world_size=ranks.world.size,
                       micro_batches=ranks.gather_objects(micro_batch), shares=state.shares)
    if ranks.world.is_main:
        write_json(settings.run_dir / "summary.json", summary)
    run.emit(Done(summary))
    return summary


def rebalance(run: Run, outcome: StepOutcome) -> None:
    """batch.balance: dynamic — when due, move the shares towards the faster ranks (every rank
    computes the same shares from the same gathered timings)."""
    state = run.state
    record_speeds(state, outcome.reports)
    if state.step % run.settings.rebalance_every:
        return
    shares, speeds = balanced_shares(run.settings.target_batch, state,
                                     [r.micro_batch for r in outcome.reports])
    if shares != state.shares:
        state.shares = shares
        run.stream.restart(state.step, run.stream.micro_batch, shares)
        run.emit(Rebalance(step=state.step, shares=shares, samples_per_second=speeds))


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance the schedule once per target batch, stepped or skipped (a skipped first update
    is not the ordering mistake torch warns about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step",
                                category=UserWarning)
        scheduler.step()


def is_due(step: int, every: int, total_steps: int) -> bool:
    """Whether something done every `every` steps (0: never) and at the end is due now."""
    return step == total_steps or bool(every and step % every == 0)


def optimizer_step(precision: Precision, optimizer: torch.optim.Optimizer) -> bool:
    """`precision.step`; running out of memory there ends the run, as no smaller micro-batch
    makes room for the optimizer's state (made at its first step, as large as the model or
    twice)."""
    try:
        return precision.step(optimizer)
    except Exception as exc:  # sorted just below: only out-of-memory is handled
        if not is_out_of_memory(exc):
            raise
    raise DoesNotFitError("out of memory in the optimizer's step: its state does not fit beside "
                          "the model and its gradients, whatever the micro-batch (an optimizer "
                          "with less state, such as SGD, or a device with more memory)")


def shrink_micro_batch(run: Run, outcome: StepOutcome) -> None:
    """After an out-of-memory step on any rank: each rank that ran out halves its micro-batch,
    and every rank restarts this step's target batch (all decide alike, from the reports)."""
    state, world = run.state, run.ranks.world
    smallest = smallest_micro_batch(run.setup.model)
    micro_batch = run.stream.micro_batch
    for rank, report in enumerate(outcome.reports):
        if not report.out_of_memory:
            continue
        where = f" on rank {rank}" if world.is_distributed else ""
        if report.micro_batch <= smallest:
            raise DoesNotFitError(f"out of memory during training{where} even with a "
                                  f"micro-batch of {report.micro_batch}")
        smaller = max(smallest, report.micro_batch // 2)
        run.emit(OutOfMemory(step=state.step + 1, micro_batch_before=report.micro_batch,
                             micro_batch=smaller,
                             accumulation_steps=accumulation_steps(run.settings.target_batch,
                                                                   smaller),
                             rank=rank if world.is_distributed else None))
        if rank == world.rank:
            micro_batch = smaller
    state.oom_retries += 1
    run.stream.restart(state.step, micro_batch)


def handle_nonfinite(run: Run, loss: float) -> None:
    """A NaN or infinite loss: stop with a checkpoint of the last good state, or skip the batch."""
    state = run.state
    run.optimizer.zero_grad(set_to_none=True)  # the update is dropped either way
    step = state.step + 1
    if run.settings.skip_nonfinite:
        state.skipped_steps += 1
        run.emit(RunWarning(f"the loss at step {step} is {loss}: this target batch's update "
                            "is skipped (train.on_nonfinite: skip)"))
        return
    if all(bool(torch.isfinite(p).all()) for p in run.setup.model.parameters()):
        kept = f"The last good state (after step {state.step}) is in {write_checkpoint(run)}"
    else:  # the same on every rank: their weights are one
        kept = ("The weights themselves are no longer finite (an update before this step made "
                "them so): no checkpoint is written of them")
    raise NonFiniteLossError(
        f"the loss at step {step} is {loss}; stopped before updating the model. {kept}. "
        "Lower optim.args.lr, or set train.on_nonfinite: skip to drop such batches")


def stop_now(run: Run, stop: StopRequest) -> None:
    """After a stop signal (on any rank): checkpoint the finished target batch and end with
    130 or 143, saying how to resume."""
    path = write_checkpoint(run)
    name = stop.signal.name if stop.is_set else "SIGTERM"  # another rank's signal
    run.emit(Stopped(step=run.state.step, signal=name, checkpoint=str(path)))
    raise StoppedError(f"by {name} after step {run.state.step}; checkpoint {path}. Resume "
                       f"with: {run.settings.resume_command}",
                       exit_code=stop.exit_code if stop.is_set else 143)
