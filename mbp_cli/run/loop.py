"""The run: build from the recipe, step through target batches, evaluate, write; never prints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mbp_cli
from mbp_cli.catalog.datasets import is_stream
from mbp_cli.catalog.loggers import LOGGERS
from mbp_cli.data.batching import MicroBatchStream, accumulation_steps, steps_per_epoch
from mbp_cli.data.samples import batch_maker
from mbp_cli.data.streaming import StreamedBatches, check_stream_recipe
from mbp_cli.distributed.ranks import (
    RankReport,
    Ranks,
    World,
    process_group,
    rank_device,
    world_from_env,
)
from mbp_cli.engine.micro_step import explained_step_errors
from mbp_cli.engine.setup import (
    Setup,
    build,
    build_optimizer,
    build_schedule,
    check_target_batch,
    has_batch_norm,
    resolve_device,
    smallest_micro_batch,
)
from mbp_cli.errors import DoesNotFitError, NonFiniteLossError, StoppedError, UsageError
from mbp_cli.events import (
    Done,
    Eval,
    OutOfMemory,
    Overflow,
    Probe,
    Rebalance,
    RunWarning,
    Sink,
    Sinks,
    Start,
    Step,
    Stopped,
)
from mbp_cli.memory.measure import preserved_training_state
from mbp_cli.memory.probe import ProbeOptions, probe_setup, probe_strategies
from mbp_cli.memory.tracker import (
    PeakMemory,
    StorageTracker,
    is_out_of_memory,
    training_state_tensors,
    unless_out_of_memory,
)
from mbp_cli.recipe.spec import Recipe
from mbp_cli.run.checkpoint import LoopState, rank_state, save_checkpoint
from mbp_cli.run.evaluate import evaluate
from mbp_cli.run.folder import RunFolder, save_state_dict, write_json
from mbp_cli.run.records import is_running
from mbp_cli.run.resume import resume_state
from mbp_cli.run.shares import (
    balanced_shares,
    is_rebalance_due,
    rank_micro_batch,
    record_speeds,
    starting_shares,
)
from mbp_cli.run.stopping import StopRequest, graceful_stop, resume_command
from mbp_cli.run.target_batch import (
    StepSums,
    StepTotals,
    backward_sums,
    clip_gradients,
    normalize_gradients,
)
from mbp_cli.strategies.choice import StrategyChoice, candidates, fixed_choice, is_auto
from mbp_cli.strategies.precision import Precision


@dataclass(frozen=True)
class RunOptions:
    """What the command line adds to a recipe."""

    run_dir: Path
    max_steps: int | None = None
    budget_bytes: int | None = None  # for `batch.micro: auto`
    simulated_memory: StorageTracker | None = None  # a simulated device of tracker's capacity
    resume: bool = False  # continue from the run folder's newest good checkpoint
    overwrite: bool = False  # replace the results of an earlier run in run_dir
    resume_command: str | None = None  # what a stop says to run (a partitioned run's)


@dataclass(frozen=True)
class StepOutcome:
    """One target batch over every rank: its totals (None when some rank ran out of memory:
    gradients cleared, redo it) and what each rank did."""

    totals: StepTotals | None
    reports: list[RankReport]


class _RedoTargetBatch(Exception):
    """Some rank ran out of memory: every rank drops this target batch."""


def run_step(setup: Setup, pieces: Iterable[Any], is_first: bool, ranks: Ranks,
             micro_batch: int, share: int, memory: PeakMemory) -> StepOutcome:
    """One target batch's gradient: this rank's share backpropagated as micro-batches, the
    ranks agreeing on the outcome (one gather), their gradients summed, then normalized by the
    item count of the whole target batch."""
    started = time.perf_counter()
    model = setup.model
    params = list(model.parameters())

    def backward() -> StepSums | None:
        with explained_step_errors(is_first):
            return unless_out_of_memory(lambda: backward_sums(setup.micro_step, pieces),
                                        setup.device, model)

    try:
        # BatchNorm's running statistics: one update, at the end, from every rank's pieces
        with setup.target_batch(ranks):
            failure = sums = None
            try:
                sums = backward()
            except Exception as exc:
                if not ranks.is_distributed:
                    raise
                failure = exc  # the other ranks learn it in the gather, and all stop
            mine = RankReport(*(dataclasses.astuple(sums) if sums else (0.0, 0.0, 0, 0)),
                              sums is None and failure is None, failure is not None,
                              time.perf_counter() - started, memory.peak_bytes(), micro_batch,
                              share)
            reports, has_grad = ranks.gather_reports(mine, [p.grad is not None for p in params])
            if any(r.failed for r in reports):
                ranks.raise_any(failure)
            if any(r.out_of_memory for r in reports):
                model.zero_grad(set_to_none=True)
                raise _RedoTargetBatch
            try:
                ranks.sum_gradients(params, has_grad)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                raise DoesNotFitError(  # mid-exchange: this rank alone, the others wait on it
                    f"out of memory on rank {ranks.world.rank} while summing the gradients "
                    "over the ranks (small gradients are summed in 1 MiB pieces, beyond the "
                    "step's peak): lower the micro-batch or raise the memory") from None
            total = StepSums(sum(r.loss_sum for r in reports), sum(r.items for r in reports),
                             sum(r.samples for r in reports),
                             sum(r.micro_batches for r in reports))
            return StepOutcome(normalize_gradients(model, total), reports)
    except _RedoTargetBatch:
        return StepOutcome(None, reports)


def starting_point(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                   options: RunOptions, emit: Sink, resumed_micro_batch: int | None,
                   world: World) -> tuple[StrategyChoice, int, dict | None]:
    """The strategies and the micro-batch to start with: the recipe's, or where it says `auto`
    the probe's choice (and its answer, to be saved as probe.json; a resumed run takes it from
    there). Each rank probes its own device."""
    fixed = fixed_choice(recipe, setup.device, lambda: len(setup.blocks("memory.offload")))
    micro_batch = resumed_micro_batch or rank_micro_batch(recipe.batch.micro, world)
    if micro_batch != "auto" and not is_auto(recipe):
        return fixed, micro_batch, None
    saved = options.run_dir / "probe.json"
    if options.resume and saved.exists():
        answer = json.loads(saved.read_text())
        choice = StrategyChoice(**answer["choice"]) if "choice" in answer else fixed
        per_rank = answer.get("micro_batches") or []
        micro_batch = resumed_micro_batch or int(
            per_rank[world.rank] if len(per_rank) == world.size else answer["micro_batch"])
        emit(Probe(micro_batch, reused=str(saved),
                   strategies=choice.label if is_auto(recipe) else None))
        return choice, micro_batch, None
    capacity = options.simulated_memory.capacity_bytes if options.simulated_memory else None
    probe_options = ProbeOptions(setup.device, budget_bytes=options.budget_bytes,
                                 capacity_bytes=capacity)
    with explained_step_errors(True):
        if is_auto(recipe):
            choices = candidates(recipe, setup.device, setup.block_count(), estimate=False)
            weighed = probe_strategies(recipe, setup, optimizer, probe_options, choices,
                                       micro_batch=None if micro_batch == "auto" else micro_batch)
            choice, result = weighed.choice, weighed.chosen_result
            answer = weighed.to_dict()
        else:
            choice = fixed
            setup.use(choice)
            result = probe_setup(recipe, setup, optimizer, probe_options)
            answer = result.to_dict()
    micro_batch = result.micro_batch if micro_batch == "auto" else micro_batch
    emit(Probe(micro_batch, accumulation_steps(recipe.batch.target, micro_batch),
               result.budget_bytes,
               result.predicted_peak_bytes, result.verified_peak_bytes, result.backend,
               strategies=choice.label if is_auto(recipe) else None))
    return choice, micro_batch, answer


def train(recipe: Recipe, options: RunOptions, sinks: Iterable[Sink]) -> dict[str, Any]:
    """Train the recipe into `options.run_dir` and return the summary; events go to `sinks`
    (and to metrics.jsonl). Under torchrun (or `mbp train --nproc`), every rank calls it and
    rank 0 alone reports and writes."""
    world = world_from_env()
    device = rank_device(resolve_device(recipe.train.device), world)
    if recipe.train.partition is not None:  # experimental: parts trained apart
        from mbp_cli.partition.run import WAIT_SECONDS, train_partitioned

        timeout = max(recipe.train.collective_timeout, WAIT_SECONDS)
        with process_group(world, device, timeout) as ranks:
            return train_partitioned(recipe, options, sinks, ranks, device, _train)
    with process_group(world, device, recipe.train.collective_timeout) as ranks:
        return _train(recipe, options, sinks, ranks, device)


def _train(recipe: Recipe, options: RunOptions, sinks: Iterable[Sink], ranks: Ranks,
           device: torch.device, make_setup: Callable[[], Setup] | None = None
           ) -> dict[str, Any]:
    started = time.perf_counter()
    world = ranks.world
    run_dir = ranks.broadcast(options.run_dir)  # torchrun's ranks may have named it apart
    make_setup = make_setup or (lambda: build(recipe, device))
    # Each part runs on every rank; an error on one rank stops every rank with its message.
    with ranks.agreed():  # rank 0 builds first: a download happens once
        setup = make_setup() if world.is_main else None
    with ranks.agreed():
        setup = setup or make_setup()
        model, target = setup.model, recipe.batch.target
        is_streamed = is_stream(setup.train_set)
        if is_streamed:
            check_stream_recipe(recipe)
        else:
            check_target_batch(recipe, len(setup.train_set))
        optimizer = build_optimizer(recipe, model)
        per_epoch = 0 if is_streamed else steps_per_epoch(len(setup.train_set), target,
                                                          recipe.batch.drop_last)
        total_steps = recipe.train.steps or recipe.train.epochs * per_epoch
        scheduler = build_schedule(optimizer, recipe.schedule, total_steps)  # the real one
        if world.is_main and is_running(run_dir):  # before anything in it is touched
            raise UsageError(f"{run_dir} is in use by another mbp train")
        folder = RunFolder(run_dir, recipe, options.resume, options.overwrite)
        emit = Sinks([folder.metrics, *sinks] if world.is_main else [])
        loop = resume_state(run_dir, model, optimizer, scheduler, emit, world) \
            if options.resume else None
        if loop is not None and loop.step >= total_steps:  # nothing to do: leave it as it is
            raise UsageError(f"{run_dir} has already trained all {total_steps} steps: nothing "
                             "to resume (to train longer: --resume with --set train.steps=N)")
        if options.resume and world.is_main:
            folder.open()  # it exists: log into it from the start
        if world.is_main:
            folder.loggers = [LOGGERS[name](run_dir, loop.step if loop else 0)
                              for name in recipe.train.log or []]
            emit.sinks += folder.loggers
        stop_step = total_steps
        if options.max_steps is not None:
            stop_step = min(total_steps, (loop.step if loop else 0) + options.max_steps)
        simulated = options.simulated_memory
        if simulated is not None:
            simulated.register(training_state_tensors(model, optimizer))
        memory = PeakMemory(device, simulated)
        setup.train_mode()  # the probe measures the step as training runs it
        keeps = keeps_split(loop, recipe, world)
        choice, micro_batch, folder.probe = starting_point(
            recipe, setup, optimizer, options, emit, loop.micro_batch if keeps else None, world)
        loop = split_state(loop, keeps, recipe, world, micro_batch, emit)
        setup.use(choice, micro_batch=loop.micro_batch)
    micro_batches = ranks.gather_objects(loop.micro_batch)
    if folder.probe is not None and world.is_distributed:
        folder.probe["micro_batches"] = micro_batches
    precision = setup.micro_step.precision
    precision.load_state_dict(loop.loss_scale)
    with ranks.agreed():
        compile_seconds = compile_now(setup, optimizer, loop.micro_batch) \
            if recipe.train.compile else None
    first_step = loop.step
    stream = StreamedBatches(setup.train_set, target, loop.micro_batch, recipe.batch.drop_last,
                             setup.collate, loop.shares, world.rank,
                             loop.stream_position) if is_streamed else \
        MicroBatchStream(setup.train_set, target, loop.micro_batch, recipe.seed,
                         recipe.batch.drop_last, stop_step, recipe.train.num_workers,
                         device.type == "cuda", start_step=loop.step, collate=setup.collate,
                         shares=loop.shares, rank=world.rank)
    emit(Start(recipe.name, str(device), recipe.train.dtype, target, loop.micro_batch,
               accumulation_steps(target, loop.micro_batch), total_steps, stop_step, loop.step,
               per_epoch, 0 if is_streamed else len(setup.train_set),
               len(setup.eval_set) if setup.eval_set is not None and not
               is_stream(setup.eval_set) else 0,
               sum(p.numel() for p in model.parameters()), str(run_dir),
               " on ".join(filter(None, (choice.label, setup.describe_blocks()))),
               micro_batches if world.is_distributed else None, loop.shares or None))
    if world.is_distributed and any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p
                                    for m in model.modules()):
        emit(RunWarning("the model has dropout: each rank draws its own masks, so the run "
                        "equals a single process's in distribution, not number for number"))
    if choice.precision == "fp16" and device.type == "cpu":
        emit(RunWarning("train.precision: fp16 on the CPU runs slowly (autocast has few fp16 "
                        "kernels there, and nothing needs its loss scaling); bf16 is the CPU's "
                        "format"))
    if has_batch_norm(model) and loop.micro_batch < target and not setup.freeze_batchnorm:
        emit(RunWarning(
            "the model has BatchNorm layers: they normalize by the statistics of each "
            f"micro-batch of {loop.micro_batch}, so training is not exactly equal to full "
            f"batches of {target} (their running statistics are updated once per target batch, "
            "as a full batch would; batch.batchnorm: frozen keeps them in eval mode, for "
            "fine-tuning)"))

    earlier_wall_seconds = loop.wall_seconds  # of the parts before a resume

    def checkpoint() -> Path | None:
        """Every rank takes part (their RNG states are gathered); rank 0 writes."""
        loop.loss_scale = precision.state_dict()
        loop.wall_seconds = earlier_wall_seconds + time.perf_counter() - started
        if is_streamed:  # where a resumed run picks the stream up
            loop.stream_position = stream.position
        states = ranks.gather_objects(rank_state(loop.micro_batch))
        if not world.is_main:
            return None
        return save_checkpoint(run_dir, model, optimizer, scheduler, loop,
                               recipe.train.keep_checkpoints, states)

    with graceful_stop() as stop, (simulated or contextlib.nullcontext()):
        try:
            while loop.step < stop_step:
                step_started = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                outcome = run_step(setup, stream.pieces(loop.step), loop.step == first_step,
                                   ranks, loop.micro_batch, stream.share_at(loop.step),
                                   memory)
                totals = outcome.totals
                layout = getattr(setup.loss_fn, "layout", None)  # classification losses'
                if loop.step == first_step and layout is not None and layout.guess():
                    emit(RunWarning(layout.guess()))
                if totals is None:  # out of memory: redo this whole target batch, smaller
                    shrink_micro_batch(loop, stream, smallest_micro_batch(model), target,
                                       outcome.reports, world, emit)
                    continue
                grad_norm = None
                is_finite = math.isfinite(totals.loss)  # the same on every rank: the global mean
                if is_finite:
                    precision.unscale_(optimizer)
                    grad_norm = clip_gradients(model, recipe.optim.clip_grad_norm,
                                               recipe.optim.clip_grad_value)
                    if optimizer_step(precision, optimizer):
                        loop.last_loss = totals.loss
                    else:  # fp16 overflow: the whole target batch is skipped, once
                        loop.overflow_skips += 1
                        emit(Overflow(loop.step + 1, precision.scale))
                if world.is_main:  # the first target batch went through (or stops with a
                    folder.open()  # checkpoint of the last good state)
                if not is_finite:
                    handle_nonfinite(recipe, loop, totals, optimizer, checkpoint, emit)
                step_schedule(scheduler)
                optimizer.zero_grad(set_to_none=True)
                step_seconds = time.perf_counter() - step_started
                loop.step += 1
                loop.train_seconds += step_seconds
                loop.samples_seen += totals.samples
                epoch = stream.held_epoch + 1 if is_streamed else (loop.step - 1) // per_epoch + 1
                if is_streamed and stream.short_pass and loop.step == first_step + 1:
                    emit(RunWarning(f"the stream's pass ended after {stream.short_pass} samples, "
                                    f"short of a target batch of {target}: each step is one "
                                    "whole pass, smaller than batch.target"))
                per_rank = [r.to_dict(i) for i, r in enumerate(outcome.reports)] \
                    if world.is_distributed else None
                emit(Step(loop.step, total_steps, epoch, totals.loss,
                          lr, totals.samples, totals.items, totals.micro_batches, step_seconds,
                          totals.samples / step_seconds, memory.peak_bytes(), grad_norm,
                          per_rank, loop.micro_batch))
                if world.is_distributed:
                    rebalance(recipe, loop, stream, outcome.reports, per_epoch, emit)
                # The checkpoint and the model before the evaluation: one that fails (held-out
                # samples the model cannot take) loses no trained step.
                if is_due(loop.step, recipe.train.checkpoint_every, stop_step):
                    checkpoint()
                if loop.step == stop_step and world.is_main:
                    save_state_dict(run_dir / "model.pt", model.state_dict())
                if is_due(loop.step, recipe.train.eval_every, stop_step) and world.is_main:
                    loop.eval_result = held_out_eval(setup, stream.micro_batch, recipe,
                                                     run_dir if loop.step == stop_step else None)
                    if loop.eval_result:
                        emit(Eval(loop.step, **loop.eval_result))
                if ranks.any(stop.is_set):  # every rank stops after the same target batch
                    stop_now(stop, loop, checkpoint, emit, options.resume_command
                             or resume_command(run_dir, world.size))
        finally:
            folder.close()

    this_part = time.perf_counter() - started
    summary = summarize(recipe, loop, choice, total_steps, memory,
                        earlier_wall_seconds + this_part, device, run_dir)
    if first_step:  # a resumed run: the summary covers every part, this one said apart
        summary.update(resumed_at_step=first_step, resumed_wall_seconds=this_part)
    summary.update(compile_seconds=compile_seconds, loss_scale=precision.scale)
    if world.is_distributed:
        summary.update(world_size=world.size, micro_batches=ranks.gather_objects(
            loop.micro_batch), shares=loop.shares)
    if world.is_main:
        write_json(run_dir / "summary.json", summary)
    emit(Done(summary))
    return summary


def batch_setting(recipe: Recipe) -> dict[str, Any]:
    """How the recipe cuts target batches between ranks; a resume that changes it (or the
    number of ranks) cuts afresh."""
    return {"micro": recipe.batch.micro, "shares": recipe.batch.shares}


def keeps_split(loop: LoopState | None, recipe: Recipe, world: World) -> bool:
    """Whether a resumed run keeps its checkpoint's cut: the same ranks, the same settings."""
    return loop is not None and loop.world_size == world.size \
        and loop.batch_setting in ({}, batch_setting(recipe))


def split_state(loop: LoopState | None, keeps: bool, recipe: Recipe, world: World,
                micro_batch: int, emit: Sink) -> LoopState:
    """The loop state to train from, with this rank's micro-batch and every rank's share: the
    checkpoint's where the cut is kept, else taken afresh (said in a warning)."""
    setting = batch_setting(recipe)
    if loop is not None and not keeps:
        emit(RunWarning(
            f"the checkpoint was made by {loop.world_size} rank(s) with batch.micro "
            f"{loop.batch_setting.get('micro', '?')} and batch.shares "
            f"{loop.batch_setting.get('shares')}; this run has {world.size} with "
            f"{setting['micro']} and {setting['shares']}: each rank's share and micro-batch "
            "are taken afresh; every update is still the full batch's, but the run is no "
            "longer bitwise equal to an uninterrupted one"))
        loop.micro_batch, loop.world_size, loop.speed_window = micro_batch, world.size, []
        loop.shares = []
    loop = loop or LoopState(micro_batch, world_size=world.size)
    loop.batch_setting = setting
    if not loop.shares:
        loop.shares = starting_shares(recipe.batch, world.size)
    return loop


def rebalance(recipe: Recipe, loop: LoopState, stream: MicroBatchStream | StreamedBatches,
              reports: list[RankReport], per_epoch: int, emit: Sink) -> None:
    """batch.balance: dynamic — when due, move the shares towards the faster ranks (every rank
    computes the same shares from the same gathered timings)."""
    if recipe.batch.balance != "dynamic":
        return
    record_speeds(loop, reports)
    if not is_rebalance_due(recipe.batch, loop.step, per_epoch):
        return
    shares, speeds = balanced_shares(recipe.batch.target, loop,
                                     [r.micro_batch for r in reports])
    if shares != loop.shares:
        loop.shares = shares
        stream.restart(loop.step, loop.micro_batch, shares)
        emit(Rebalance(loop.step, shares, speeds))


def compile_now(setup: Setup, optimizer: torch.optim.Optimizer, micro_batch: int) -> float:
    """Compile the model before the clock starts (one forward and backward at the
    micro-batch, everything put back) and return how long it took."""
    make_batch = batch_maker(setup.train_set, setup.collate)
    started = time.perf_counter()
    with preserved_training_state(setup.model, optimizer, setup.device), \
            explained_step_errors(True):
        setup.micro_step.precision.backward(setup.micro_step(make_batch(micro_batch)).loss_sum)
    return time.perf_counter() - started


def held_out_eval(setup: Setup, micro_batch: int, recipe: Recipe,
                  kept_in: Path | None) -> dict[str, float | None]:
    """The held-out evaluation; one that fails at the end, after model.pt and the checkpoint
    are written in `kept_in`, says they are kept and how to score them."""
    try:
        return evaluate(setup, micro_batch, recipe.train.num_workers)
    except UsageError as exc:
        if kept_in is None:
            raise
        raise UsageError(f"{exc}. The trained model is kept in {kept_in / 'model.pt'} (and a "
                         f"checkpoint in {kept_in / 'checkpoints'}); score it with: mbp eval "
                         f"{kept_in} --set data.eval_transforms=…") from exc


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


def summarize(recipe: Recipe, loop: LoopState, choice: StrategyChoice, total_steps: int,
              memory: PeakMemory,
              wall_seconds: float, device: torch.device, run_dir: Path) -> dict[str, Any]:
    """summary.json: what the run did, how fast, in how much memory, with which versions."""
    target = recipe.batch.target
    return {
        "name": recipe.name, "steps": loop.step, "total_steps": total_steps,
        "samples_seen": loop.samples_seen, "final_train_loss": loop.last_loss,
        **loop.eval_result, "target_batch": target, "micro_batch": loop.micro_batch,
        "accumulation_steps": accumulation_steps(target, loop.micro_batch),
        "oom_retries": loop.oom_retries, "skipped_steps": loop.skipped_steps,
        "overflow_skips": loop.overflow_skips, "dtype": recipe.train.dtype,
        "precision": choice.precision,
        "strategies": choice.label,
        "samples_per_second": (loop.samples_seen / loop.train_seconds
                               if loop.train_seconds else None),
        "peak_memory_bytes": memory.peak_bytes(), "peak_memory_source": memory.source,
        "wall_seconds": wall_seconds, "device": str(device),
        "versions": {"mbp": mbp_cli.__version__, "torch": torch.__version__},
        "run_dir": str(run_dir),
    }


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


def shrink_micro_batch(loop: LoopState, stream: MicroBatchStream | StreamedBatches,
                       smallest: int, target_batch: int, reports: list[RankReport],
                       world: World, emit: Sink) -> None:
    """After an out-of-memory step on any rank: each rank that ran out halves its micro-batch,
    and every rank restarts this step's target batch (all decide alike, from the reports)."""
    for rank, report in enumerate(reports):
        if not report.out_of_memory:
            continue
        where = f" on rank {rank}" if world.is_distributed else ""
        if report.micro_batch <= smallest:
            raise DoesNotFitError(f"out of memory during training{where} even with a "
                                  f"micro-batch of {report.micro_batch}")
        smaller = max(smallest, report.micro_batch // 2)
        emit(OutOfMemory(loop.step + 1, report.micro_batch, smaller,
                         accumulation_steps(target_batch, smaller),
                         rank if world.is_distributed else None))
        if rank == world.rank:
            loop.micro_batch = smaller
    loop.oom_retries += 1
    stream.restart(loop.step, loop.micro_batch)


def handle_nonfinite(recipe: Recipe, loop: LoopState, totals: StepTotals,
                     optimizer: torch.optim.Optimizer, checkpoint: Callable[[], Path | None],
                     emit: Sink) -> None:
    """A NaN or infinite loss: stop with a checkpoint of the last good state, or skip the batch."""
    optimizer.zero_grad(set_to_none=True)  # the update is dropped either way
    step = loop.step + 1
    if recipe.train.on_nonfinite == "skip":
        loop.skipped_steps += 1
        emit(RunWarning(f"the loss at step {step} is {totals.loss}: this target batch's update "
                        "is skipped (train.on_nonfinite: skip)"))
        return
    path = checkpoint()
    raise NonFiniteLossError(
        f"the loss at step {step} is {totals.loss}; stopped before updating the model. The last "
        f"good state (after step {loop.step}) is in {path}. Lower optim.args.lr, or set "
        "train.on_nonfinite: skip to drop such batches")


def stop_now(stop: StopRequest, loop: LoopState, checkpoint: Callable[[], Path | None],
             emit: Sink, command: str) -> None:
    """After a stop signal (on any rank): checkpoint the finished target batch and end with
    130 or 143, saying how to resume."""
    path = checkpoint()
    name = stop.signal.name if stop.is_set else "SIGTERM"  # another rank's signal
    emit(Stopped(loop.step, name, str(path)))
    raise StoppedError(f"by {name} after step {loop.step}; checkpoint {path}. Resume with: "
                       f"{command}", exit_code=stop.exit_code if stop.is_set else 143)
