"""The start of a run: a recipe and the command line's options turned into a ready run — model,
optimizer, schedule, folder, loop state, micro-batch stream, sinks, resume point — that the
loop trains. Every kind of run enters here: one device, several ranks, each part of a
partitioned run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.catalog.loggers import LOGGERS
from mbp_cli.catalog.tracking import RunFacts
from mbp_cli.data.batching import MicroBatchStream, accumulation_steps, steps_per_epoch
from mbp_cli.data.samples import batch_maker
from mbp_cli.data.streaming import StreamedBatches, check_stream_recipe
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import explained_step_errors
from mbp_cli.engine.optim import build_optimizer, build_schedule
from mbp_cli.engine.setup import Setup, build, start_warnings
from mbp_cli.engine.splits import check_target_batch
from mbp_cli.errors import UsageError
from mbp_cli.events import Probe, RunWarning, Sink, Sinks, Start
from mbp_cli.memory.measure import preserved_training_state
from mbp_cli.memory.search import ProbeOptions, probe_setup
from mbp_cli.memory.tracker import PeakMemory, StorageTracker, training_state_tensors
from mbp_cli.memory.weigh import probe_strategies
from mbp_cli.recipe.spec import Recipe
from mbp_cli.run.checkpoint import LoopState
from mbp_cli.run.folder import RunFolder, refuse_in_use
from mbp_cli.run.resume import refuse_apart, resume_state
from mbp_cli.run.shares import keeps_split, split_state
from mbp_cli.run.stopping import resume_command
from mbp_cli.strategies.choice import StrategyChoice, candidates, fixed_choice, is_auto


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
class LoopSettings:
    """The plain values the loop reads (the recipe's, resolved at the start)."""

    name: str
    run_dir: Path
    dtype: str
    target_batch: int
    total_steps: int  # of the schedule
    stop_step: int  # where this run stops (--max-steps)
    first_step: int  # where it starts (a resume's step)
    steps_per_epoch: int  # 0 for a stream
    is_streamed: bool
    clip_grad_norm: float | None
    clip_grad_value: float | None
    skip_nonfinite: bool  # train.on_nonfinite: skip (else stop)
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    num_workers: int
    rebalance_every: int | None  # batch.balance: dynamic (steps); None: shares stay
    resume_command: str  # what a stop says to run


@dataclass
class Run:
    """A ready run: everything the loop reads and moves."""

    settings: LoopSettings
    setup: Setup
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: LoopState  # what a checkpoint keeps
    stream: MicroBatchStream | StreamedBatches  # owns the micro-batch streamed now
    ranks: Ranks
    folder: RunFolder
    emit: Sinks
    choice: StrategyChoice
    memory: PeakMemory  # its tracker, where there is one, is the simulated device
    compile_seconds: float | None
    started: float  # time.perf_counter() at the start
    earlier_wall_seconds: float  # of the parts before a resume


def start_run(recipe: Recipe, options: RunOptions, sinks: list[Sink], ranks: Ranks,
              device: torch.device, setup: Setup | None = None) -> Run:
    """Build (or take `setup`, a part's), check, resume and probe: the run, ready to train.
    Each part runs on every rank; an error on one rank stops every rank with its message."""
    started = time.perf_counter()
    world = ranks.world
    run_dir = ranks.broadcast(options.run_dir)  # torchrun's ranks may have named it apart
    with ranks.agreed():  # rank 0 builds first: a download happens once
        built = setup or (build(recipe, device) if world.is_main else None)
    with ranks.agreed():
        setup = built or build(recipe, device)
        model = setup.model
        per_epoch = checked_steps_per_epoch(recipe, setup)
        total_steps = recipe.train.steps or recipe.train.epochs * per_epoch
        optimizer = build_optimizer(recipe, model)
        scheduler = build_schedule(optimizer, recipe.schedule, total_steps)  # the real one
        if world.is_main:
            refuse_in_use(run_dir)  # before anything in it is touched
        folder = RunFolder(run_dir, recipe, options.resume, options.overwrite)
        emit = Sinks([folder.metrics, *sinks] if world.is_main else [])
        state = resume_state(run_dir, recipe, model, optimizer, scheduler, emit, world) \
            if options.resume else None
    if options.resume:  # every rank starts where rank 0 does, before anything is trained
        starts = ranks.gather_objects(state.step if state else None)
        with ranks.agreed():
            refuse_apart(starts, run_dir)
    with ranks.agreed():
        if state is not None and state.step >= total_steps:  # nothing to do: leave it be
            raise UsageError(f"{run_dir} has already trained all {total_steps} steps: nothing "
                             "to resume (to train longer: --resume with --set train.steps=N)")
        settings = loop_settings(recipe, options, run_dir, world, per_epoch, total_steps,
                                 first_step=state.step if state else 0,
                                 is_streamed=is_stream(setup.train_set))
        if options.resume and world.is_main:
            folder.open()  # it exists: log into it from the start
        if world.is_main:
            facts = run_facts(recipe, lambda message: emit(RunWarning(message)))
            folder.loggers = [LOGGERS[name](run_dir, settings.first_step, facts)
                              for name in recipe.train.log or []]
            emit.sinks += folder.loggers
        simulated = options.simulated_memory
        if simulated is not None:
            simulated.register(training_state_tensors(model, optimizer))
        memory = PeakMemory(device, simulated, None if recipe.train.compile else
                            lambda: training_state_tensors(model, optimizer))
        setup.train_mode()  # the probe measures the step as training runs it
        keeps = keeps_split(state, recipe, world)
        choice, micro_batch, folder.probe = starting_point(
            recipe, setup, optimizer, options, emit, state.micro_batch if keeps else None, world)
        state = split_state(state, keeps, recipe, world, micro_batch, emit)
        setup.use(choice, micro_batch=state.micro_batch)
    micro_batches = ranks.gather_objects(state.micro_batch)
    if folder.probe is not None and world.is_distributed:
        folder.probe["micro_batches"] = micro_batches
    setup.micro_step.precision.load_state_dict(state.loss_scale)
    with ranks.agreed():
        compile_seconds = compile_now(setup, optimizer, state.micro_batch) \
            if recipe.train.compile else None
    stream = open_stream(recipe, setup, state, settings, world)
    emit(start_event(settings, setup, choice, state, micro_batches, world,
                     [logger.where for logger in folder.loggers]))
    for warning in start_warnings(setup, choice, state.micro_batch, settings.target_batch, world):
        emit(RunWarning(warning))
    return Run(settings=settings, setup=setup, optimizer=optimizer, scheduler=scheduler,
               state=state, stream=stream, ranks=ranks, folder=folder, emit=emit,
               choice=choice, memory=memory, compile_seconds=compile_seconds, started=started,
               earlier_wall_seconds=state.wall_seconds)


def run_facts(recipe: Recipe, warn: Callable[[str], None]) -> RunFacts:
    """What the loggers are told of the run (only rank 0's log)."""
    return RunFacts(name=recipe.name, experiment=recipe.train.experiment or recipe.name,
                    config=recipe.to_dict(), log_artifacts=recipe.train.log_artifacts, warn=warn)


def checked_steps_per_epoch(recipe: Recipe, setup: Setup) -> int:
    """Target batches in an epoch of the training set (0 for a stream: it has no length),
    once the target batch is checked against it."""
    if is_stream(setup.train_set):
        check_stream_recipe(recipe)
        return 0
    check_target_batch(recipe, len(setup.train_set))
    return steps_per_epoch(len(setup.train_set), recipe.batch.target, recipe.batch.drop_last)


def loop_settings(recipe: Recipe, options: RunOptions, run_dir: Path, world: World,
                  per_epoch: int, total_steps: int, *, first_step: int,
                  is_streamed: bool) -> LoopSettings:
    """The recipe's and the options' values the loop reads."""
    train, batch = recipe.train, recipe.batch
    return LoopSettings(
        name=recipe.name, run_dir=run_dir, dtype=train.dtype, target_batch=batch.target,
        total_steps=total_steps,
        stop_step=total_steps if options.max_steps is None
        else min(total_steps, first_step + options.max_steps),
        first_step=first_step, steps_per_epoch=per_epoch, is_streamed=is_streamed,
        clip_grad_norm=recipe.optim.clip_grad_norm, clip_grad_value=recipe.optim.clip_grad_value,
        skip_nonfinite=train.on_nonfinite == "skip", checkpoint_every=train.checkpoint_every,
        keep_checkpoints=train.keep_checkpoints, eval_every=train.eval_every,
        num_workers=train.num_workers,
        rebalance_every=(batch.rebalance_every or per_epoch)
        if world.is_distributed and batch.balance == "dynamic" else None,
        resume_command=options.resume_command or resume_command(run_dir, world.size))


def open_stream(recipe: Recipe, setup: Setup, state: LoopState, settings: LoopSettings,
                world: World) -> MicroBatchStream | StreamedBatches:
    """This rank's micro-batches from the loop state's step on: a seeded sampler's, or a
    stream's from where it was left."""
    if settings.is_streamed:
        return StreamedBatches(setup.train_set, settings.target_batch, state.micro_batch,
                               recipe.batch.drop_last, setup.collate, state.shares, world.rank,
                               state.stream_position)
    return MicroBatchStream(setup.train_set, settings.target_batch, state.micro_batch,
                            recipe.seed, recipe.batch.drop_last, settings.stop_step,
                            settings.num_workers, setup.device.type == "cuda",
                            start_step=settings.first_step, collate=setup.collate,
                            shares=state.shares, rank=world.rank)


def start_event(settings: LoopSettings, setup: Setup, choice: StrategyChoice, state: LoopState,
                micro_batches: list[int], world: World, logs: list[str]) -> Start:
    """What the run says as it starts training."""
    train_set, eval_set = setup.train_set, setup.eval_set
    return Start(
        name=settings.name, device=str(setup.device), dtype=settings.dtype,
        target_batch=settings.target_batch, micro_batch=state.micro_batch,
        accumulation_steps=accumulation_steps(settings.target_batch, state.micro_batch),
        total_steps=settings.total_steps, stop_step=settings.stop_step,
        start_step=settings.first_step, steps_per_epoch=settings.steps_per_epoch,
        train_samples=0 if settings.is_streamed else len(train_set),
        eval_samples=len(eval_set) if eval_set is not None and not is_stream(eval_set) else 0,
        parameters=sum(p.numel() for p in setup.model.parameters()),
        run_dir=str(settings.run_dir),
        strategies=" on ".join(filter(None, (choice.label, setup.describe_blocks()))),
        micro_batches=micro_batches if world.is_distributed else None,
        shares=state.shares or None, logs=logs or None)


def starting_point(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                   options: RunOptions, emit: Sink, resumed_micro_batch: int | None,
                   world: World) -> tuple[StrategyChoice, int, dict | None]:
    """The strategies and the micro-batch to start with: the recipe's, or where it says `auto`
    the probe's choice (and its answer, to be saved as probe.json; a resumed run takes it from
    there). Each rank probes its own device."""
    fixed = fixed_choice(recipe, setup.device, lambda: len(setup.blocks("memory.offload")))
    micro_batch = resumed_micro_batch or recipe.batch.micro_for(world.rank, world.size)
    if micro_batch != "auto" and not is_auto(recipe):
        return fixed, micro_batch, None
    saved = options.run_dir / "probe.json"
    if options.resume and saved.exists():
        answer = json.loads(saved.read_text())
        choice = StrategyChoice(**answer["choice"]) if "choice" in answer else fixed
        per_rank = answer.get("micro_batches") or []
        micro_batch = resumed_micro_batch or int(
            per_rank[world.rank] if len(per_rank) == world.size else answer["micro_batch"])
        emit(Probe(micro_batch=micro_batch, reused=str(saved),
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
    emit(Probe(micro_batch=micro_batch,
               accumulation_steps=accumulation_steps(recipe.batch.target, micro_batch),
               budget_bytes=result.budget_bytes,
               predicted_peak_bytes=result.predicted_peak_bytes,
               verified_peak_bytes=result.verified_peak_bytes, backend=result.backend,
               strategies=choice.label if is_auto(recipe) else None))
    return choice, micro_batch, answer


def compile_now(setup: Setup, optimizer: torch.optim.Optimizer, micro_batch: int) -> float:
    """Compile the model before the clock starts (one forward and backward at the
    micro-batch, everything put back) and return how long it took."""
    make_batch = batch_maker(setup.train_set, setup.collate)
    started = time.perf_counter()
    with preserved_training_state(setup.model, optimizer, setup.device), \
            explained_step_errors(True):
        setup.micro_step.precision.backward(setup.micro_step(make_batch(micro_batch)).loss_sum)
    return time.perf_counter() - started
