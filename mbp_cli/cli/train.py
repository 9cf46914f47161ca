"""`mbp train`: its options, and the launcher's start of the ranks with `--nproc`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperCommand

from mbp_cli.cli.exits import exit_rank, stop_signals_ignored, user_errors
from mbp_cli.cli.options import (
    BudgetOption,
    SetOption,
    allocator_settings,
    memory_size,
    overrides,
)
from mbp_cli.distributed.world import World, world_from_env  # torch-free

if TYPE_CHECKING:
    import click

TYPED = "mbp.typed_arguments"  # the key of a command's arguments, as typed, in ctx.meta


class TypedArguments(TyperCommand):
    """A command that keeps its arguments as the user typed them, in `ctx.meta[TYPED]`: what
    `train --nproc` runs on each rank."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[TYPED] = list(args)
        return super().parse_args(ctx, args)


def train(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Argument(
        help="A recipe YAML file (with --resume: optional, checked against the saved one).",
        show_default=False)] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Continue the run in this folder from its newest good checkpoint.")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        metavar="DIR", help="Run folder. Default: runs/<name>-<timestamp>.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the results in an existing run folder.")] = False,
    max_steps: Annotated[int | None, typer.Option(
        min=1, metavar="N", help="Stop after N more optimizer steps, with a checkpoint; the "
                                 "learning-rate schedule stays the recipe's, so --resume "
                                 "continues it.")] = None,
    device: Annotated[str | None, typer.Option(
        metavar="DEVICE", help="cpu, cuda, cuda:1, mps or auto (overrides train.device).")
    ] = None,
    json_: Annotated[bool, typer.Option(
        "--json", help="JSON lines on stdout (one per step and eval, then a summary).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    budget: BudgetOption = None,
    simulate_memory: Annotated[str | None, typer.Option(
        "--simulate-memory", metavar="SIZE",
        help="Train as if the device had only this much memory, e.g. "
             "64MiB: tensors are tracked and allocations past it fail "
             "with out-of-memory (to try sizing and recovery on a CPU). "
             "With several ranks, one size or one per rank: 64MiB,16MiB.")
    ] = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, metavar="N",
        help="Train as N processes on this machine with torch.distributed "
             "(a GPU each on CUDA, gloo on CPU); for several machines, "
             "start `python -m mbp_cli train` with torchrun.")] = 1,
) -> None:
    """Train a recipe: stream each target batch as micro-batches, one exact optimizer step each."""
    with user_errors(as_json=json_), contextlib.ExitStack() as claimed:
        allocator_settings()
        from mbp_cli.commands.output.sinks import terminal_sinks
        from mbp_cli.commands.train import train as run_training
        from mbp_cli.engine.setup import resolve_device
        from mbp_cli.errors import UsageError
        from mbp_cli.memory.tracker import StorageTracker
        from mbp_cli.recipe.load import load_recipe
        from mbp_cli.run.folder import check_run_dir, claimed_run_dir, default_run_dir
        from mbp_cli.run.resume import recipe_to_resume
        from mbp_cli.run.start import RunOptions

        changes = overrides(set_, device)
        world = world_from_env()
        if resume is not None:
            from mbp_cli.run.records import refuse_part

            refuse_part(resume, "resume")
            if out is not None and out.resolve() != resume.resolve():
                raise UsageError("--resume continues in its own folder; leave out --out")
            if overwrite:
                raise UsageError(f"--overwrite does not go with --resume, which continues the "
                                 f"run in {resume}; to start afresh there instead: mbp train "
                                 f"RECIPE --out {resume} --overwrite")
            loaded, run_dir = recipe_to_resume(resume, recipe, changes), resume
        elif recipe is not None:
            loaded = load_recipe(recipe, changes)
            if out is not None:
                run_dir = out
            elif world.is_main:  # made now: a run started in the same second takes another
                run_dir = claimed.enter_context(claimed_run_dir(loaded.name))
            else:  # torchrun's other ranks: rank 0's is taken
                run_dir = default_run_dir(loaded.name)
            check_run_dir(run_dir, overwrite)  # refuse early; the run makes the folder
        else:
            raise UsageError("give a recipe to train, or --resume DIR to continue a run")
        chosen = resolve_device(loaded.train.device)  # one that is not here, before any work
        if nproc > 1 and not world.is_launched:  # the launcher: start the ranks
            from mbp_cli.distributed.launch import check_gpus, launch, rank_arguments
            from mbp_cli.partition.build import check_part_ranks
            from mbp_cli.run.shares import check_rank_lists

            check_rank_lists(loaded.batch, nproc)
            if loaded.train.partition is not None:
                check_part_ranks(loaded, nproc)
            check_gpus(chosen, nproc)
            # Every rank runs what the user typed; a default run folder (named by the time) is
            # chosen once, here, so that all write the same one.
            shared = ["--out", str(run_dir)] if resume is None and out is None else []
            said = _stops_said(run_dir)
            code = launch(nproc, rank_arguments(ctx.meta[TYPED], shared), run_dir)
            if code in (130, 143) and _stops_said(run_dir) == said:  # before any step: the
                typer.echo("interrupted" if code == 130 else "stopped by SIGTERM", err=True)
            raise typer.Exit(code)  # ranks had nothing to say; after one, rank 0 said it
        sinks = terminal_sinks(as_json=json_, quiet=quiet or not world.is_main,
                               log_every=loaded.train.log_every)
        capacity = memory_size(_rank_entry(simulate_memory, world), "--simulate-memory")
        options = RunOptions(run_dir=run_dir, max_steps=max_steps,
                             budget_bytes=memory_size(budget, "--budget"),
                             simulated_memory=StorageTracker(capacity) if capacity else None,
                             resume=resume is not None, overwrite=overwrite)
        with contextlib.ExitStack() as done:
            try:
                run_training(loaded, options, sinks, chosen)
                done.enter_context(stop_signals_ignored())  # all is written: a late Ctrl-C
            finally:  # changes nothing
                for sink in sinks:
                    getattr(sink, "close", lambda: None)()  # a live display stops
            if world.is_distributed:
                exit_rank(0)


def _stops_said(run_dir: Path) -> int:
    """How many stops by a signal the run folder's metrics record."""
    from mbp_cli.run.records import read_records

    metrics = run_dir / "metrics.jsonl"
    return sum(r.get("event") == "stopped" for r in read_records(metrics)) \
        if metrics.is_file() else 0


def _rank_entry(value: str | None, world: World) -> str | None:
    """This rank's entry of a comma-separated list, one per rank (or one for all)."""
    if value is None or "," not in value:
        return value
    entries = value.split(",")
    if len(entries) != world.size:
        from mbp_cli.errors import UsageError

        raise UsageError(f"{value!r} gives {len(entries)} values for {world.size} ranks")
    return entries[world.rank].strip()
