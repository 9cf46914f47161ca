"""The `mbp` command line: options, output mode and exit codes; heavy imports happen per command."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperCommand

from mbp_cli import __version__
from mbp_cli.distributed.world import World, world_from_env  # torch-free
from mbp_cli.errors import EXIT_RUNTIME, MbpError

if TYPE_CHECKING:
    import click

    from mbp_cli.memory.search import ProbeOptions
    from mbp_cli.recipe.spec import Recipe

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train PyTorch models at a target batch larger than memory, exactly, as micro-batches.")

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a recipe key: KEY.PATH=VALUE (VALUE read as YAML). Repeatable.")]


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn known errors into one message on stderr and their exit code (with --json, also a
    last JSON line on stdout); re-raise the rest."""
    rank = world_from_env().rank
    try:
        yield
    except MbpError as exc:
        if os.environ.get("MBP_DEBUG") == "1":
            raise
        if rank:
            from mbp_cli.distributed.ranks import LostRankError  # a rank: torch is loaded already

            if exc.agreed or isinstance(exc, LostRankError):
                _leave(exc)  # rank 0 reports what all agreed on; the launcher, a rank lost
        if as_json:
            typer.echo(json.dumps({"event": "error", "exit_code": exc.exit_code,
                                   "message": str(exc)}))
        details = getattr(exc, "details", "")
        if details:
            typer.echo(details.rstrip(), err=True)  # the user's own code: its traceback
        failed_rank = getattr(exc, "rank", rank)
        who = f"rank {failed_rank}: " if failed_rank else ""
        typer.echo(f"{who}{exc.label}: {exc}", err=True)
        if exc.exit_code == EXIT_RUNTIME and not details:  # the input was fine: maybe ours
            typer.echo("(set MBP_DEBUG=1 to see the traceback)", err=True)
        _leave(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _leave(exc: MbpError) -> None:
    """Exit with the error's code; a rank leaves at once (see `_exit_rank`)."""
    if getattr(exc, "exit_at_once", False) or world_from_env().is_distributed:
        _exit_rank(exc.exit_code)
    raise typer.Exit(exc.exit_code) from None


def _exit_rank(code: int) -> None:
    """End a rank's process without the interpreter's cleanup: gloo's threads can still hold
    tensors then, and tearing them down aborts the process (SIGABRT) after a good run; a
    broken process group would wait on the other ranks. Everything is written and closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mbp {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """mbp: micro-batched training at a target batch, with exact loss normalization."""


TYPED = "mbp.typed_arguments"  # the key of a command's arguments, as typed, in ctx.meta


class _TypedArguments(TyperCommand):
    """A command that keeps its arguments as the user typed them, in `ctx.meta[TYPED]`: what
    `train --nproc` runs on each rank."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[TYPED] = list(args)
        return super().parse_args(ctx, args)


@app.command(cls=_TypedArguments)
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
    with user_errors(as_json=json_):
        _allocator_settings()
        from mbp_cli.commands.output.sinks import terminal_sinks
        from mbp_cli.commands.train import train as run_training
        from mbp_cli.engine.setup import resolve_device
        from mbp_cli.errors import UsageError
        from mbp_cli.memory.tracker import StorageTracker
        from mbp_cli.recipe.load import load_recipe
        from mbp_cli.run.folder import check_run_dir, default_run_dir
        from mbp_cli.run.resume import recipe_to_resume
        from mbp_cli.run.start import RunOptions

        overrides = _overrides(set_, device)
        if resume is not None:
            from mbp_cli.run.records import refuse_part

            refuse_part(resume, "resume")
            if out is not None and out.resolve() != resume.resolve():
                raise UsageError("--resume continues in its own folder; leave out --out")
            loaded, run_dir = recipe_to_resume(resume, recipe, overrides), resume
        elif recipe is not None:
            loaded = load_recipe(recipe, overrides)
            run_dir = out or default_run_dir(loaded.name)
            check_run_dir(run_dir, overwrite)  # refuse early; the run makes the folder
        else:
            raise UsageError("give a recipe to train, or --resume DIR to continue a run")
        chosen = resolve_device(loaded.train.device)  # one that is not here, before any work
        world = world_from_env()
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
            raise typer.Exit(launch(nproc, rank_arguments(ctx.meta[TYPED], shared),
                                    f"mbp train --resume {run_dir} --nproc {nproc}"))
        sinks = terminal_sinks(as_json=json_, quiet=quiet or not world.is_main,
                               log_every=loaded.train.log_every)
        capacity = _memory_size(_rank_entry(simulate_memory, world), "--simulate-memory")
        options = RunOptions(run_dir=run_dir, max_steps=max_steps,
                             budget_bytes=_memory_size(budget, "--budget"),
                             simulated_memory=StorageTracker(capacity) if capacity else None,
                             resume=resume is not None, overwrite=overwrite)
        try:
            run_training(loaded, options, sinks, chosen)
        finally:
            for sink in sinks:
                getattr(sink, "close", lambda: None)()  # a live display stops
        if world.is_distributed:
            _exit_rank(0)


def _rank_entry(value: str | None, world: World) -> str | None:
    """This rank's entry of a comma-separated list, one per rank (or one for all)."""
    if value is None or "," not in value:
        return value
    entries = value.split(",")
    if len(entries) != world.size:
        from mbp_cli.errors import UsageError

        raise UsageError(f"{value!r} gives {len(entries)} values for {world.size} ranks")
    return entries[world.rank].strip()


def _overrides(set_: list[str] | None, device: str | None) -> list[str]:
    """The --set overrides, with --device as the override of train.device."""
    return [*(set_ or []), *([f"train.device={device}"] if device else [])]


def _allocator_settings() -> None:
    """Expandable segments fragment less when micro-batch sizes change; the user's choice wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def _memory_size(value: str | None, option: str) -> int | None:
    from mbp_cli.errors import UsageError
    from mbp_cli.units import parse_bytes

    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from exc


BudgetOption = Annotated[str | None, typer.Option(
    "--budget", metavar="SIZE",
    help="Memory budget, e.g. 20GiB. Default: batch.memory_budget, else free "
         "memory × batch.memory_fraction.")]


@app.command()
def probe(
    recipe: RecipeArg,
    set_: SetOption = None,
    budget: BudgetOption = None,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, cuda:1 or auto (overrides train.device).")] = None,
    estimate: Annotated[bool, typer.Option(
        "--estimate", help="Measure on fake tensors: no memory used, any model size.")] = False,
    device_memory: Annotated[str | None, typer.Option(
        "--device-memory", help="With --estimate: the memory of the device asked about, "
                                "e.g. 24GiB (the budget is this × batch.memory_fraction).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Path | None, typer.Option(
        help="Draw memory against micro-batch with the budget line (PNG; needs matplotlib).")
    ] = None,
    strategies: Annotated[bool, typer.Option(
        "--strategies", help="Weigh every memory strategy that applies here (bf16, "
                             "checkpointing, offload): the largest micro-batch and the time "
                             "per target batch of each, and the fastest that fits.")] = False,
) -> None:
    """Measure real training steps at a few micro-batch sizes and report the largest that fits."""
    with user_errors(as_json=json_):
        _allocator_settings()
        from mbp_cli.commands.output.probe import print_probe
        from mbp_cli.engine.setup import resolve_device
        from mbp_cli.errors import UsageError
        from mbp_cli.memory.search import ProbeOptions
        from mbp_cli.memory.weigh import probe_recipe
        from mbp_cli.recipe.load import load_recipe

        loaded = load_recipe(recipe, _overrides(set_, device))
        if device_memory and not estimate:
            raise UsageError("--device-memory goes with --estimate")
        options = ProbeOptions(
            device=resolve_device(loaded.train.device) if not estimate else None,
            budget_bytes=_memory_size(budget, "--budget"), estimate=estimate,
            device_memory_bytes=_memory_size(device_memory, "--device-memory"))
        if plot is not None:
            from mbp_cli.commands.plot import plot_probe, require_pyplot

            require_pyplot()  # before the probe's work, not after
        if loaded.train.partition is not None:
            _probe_parts(loaded, options, estimate or strategies or plot is not None, json_)
            return
        result = probe_recipe(loaded, options, every_strategy=strategies).to_dict()
        if plot is not None:
            plot_probe(result, plot)
        print_probe(result, as_json=json_)


def _probe_parts(recipe: Recipe, options: ProbeOptions, has_other_options: bool,
                 as_json: bool) -> None:
    """Probe each part of a partitioned recipe; print each answer under its part's name."""
    from mbp_cli.commands.output.probe import print_probe
    from mbp_cli.errors import UsageError
    from mbp_cli.partition.build import probe_parts

    if has_other_options:
        raise UsageError("with train.partition, mbp probe measures each part on this device; "
                         "--estimate, --strategies and --plot are not supported there yet")
    answers = probe_parts(recipe, options)
    if as_json:
        typer.echo(json.dumps({"parts": answers}))
        return
    for answer in answers:
        typer.echo(f"part {answer['part']} ({answer['begins']} → {answer['ends']}):")
        print_probe(answer, as_json=False)


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe without training: its keys, builder arguments, then the model built and
    one forward + loss + backward on two samples. Exit 0 if valid, 2 if not."""
    with user_errors():
        from mbp_cli.commands.validate import trial_step
        from mbp_cli.recipe.load import load_recipe

        loaded = load_recipe(recipe, list(set_ or []))
        trial = trial_step(loaded)
        typer.echo(f"{recipe}: valid recipe {loaded.name!r}; {trial}")


RunArg = Annotated[Path, typer.Argument(help="A run folder.", show_default=False)]


@app.command("eval")
def eval_(
    run: RunArg,
    set_: SetOption = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="Evaluate this checkpoint's weights instead of model.pt.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate a run's weights on its held-out split (or another dataset: --set data.name=…)."""
    with user_errors(as_json=json_):
        from mbp_cli.commands.inference import evaluate_run, load_run

        result = evaluate_run(load_run(run, _overrides(set_, None), checkpoint))
        if json_:
            typer.echo(json.dumps(result))
            return
        accuracy = result.get("eval_accuracy")
        shown = "" if accuracy is None else f"  accuracy {100 * accuracy:.2f}%"
        count = "the" if result["samples"] is None else f"{result['samples']:,}"
        typer.echo(f"{run}: loss {result['eval_loss']:.4f}{shown}  on {count} samples of "
                   f"{result['split']} ({result['weights']})")


@app.command()
def predict(
    run: RunArg,
    inputs: Annotated[list[Path], typer.Argument(
        help="Image files, or files saved with torch.save of one sample or a batch: a "
             "tensor, or a dict of tensors given to the model by name (as dict batches are).",
        show_default=False)],
    top: Annotated[int, typer.Option(min=1, help="How many classes to show.")] = 3,
    out: Annotated[Path, typer.Option(
        help="Where outputs that are not class scores are saved (torch.save).")]
    = Path("predictions.pt"),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the --out file where it exists.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """The top classes a run's model gives each input, with their probabilities."""
    with user_errors(as_json=json_):
        import torch

        from mbp_cli.commands.inference import load_run, read_inputs
        from mbp_cli.commands.inference import predict as run_predict
        from mbp_cli.errors import UsageError

        loaded = load_run(run, [])
        answers = run_predict(loaded, read_inputs(loaded, inputs), top)
        raw = {str(path): a.pop("output") for path, a in zip(inputs, answers, strict=True)
               if "output" in a}
        if raw:
            if out.exists() and not overwrite:
                raise UsageError(f"{out} exists: give --overwrite to replace it, or --out "
                                 "another file")
            torch.save(raw, out)
        rows = [{"input": str(path), **answer}
                for path, answer in zip(inputs, answers, strict=True)]
        if json_:
            typer.echo(json.dumps(rows))
            return
        for row in rows:
            if "top" not in row:
                typer.echo(f"{row['input']}: output saved to {out}")
                continue
            for i, ranked in enumerate(row["top"]):
                label = row["input"] if len(row["top"]) == 1 else f"{row['input']}[{i}]"
                shown = ", ".join(f"{c['name'] or c['class']} ({100 * c['probability']:.1f}%)"
                                  for c in ranked)
                typer.echo(f"{label}: {shown}")


@app.command("runs")
def list_runs(
    folder: Annotated[Path, typer.Argument(help="Where the run folders are.")] = Path("runs"),
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON list.")] = False,
) -> None:
    """List the runs in a folder: status (done, stopped at step k, failed at step k, running),
    steps, best eval, wall time."""
    with user_errors(as_json=json_):
        from rich.console import Console

        from mbp_cli.commands.tables import runs_table
        from mbp_cli.run.records import find_runs

        records = find_runs(folder)
        if json_:
            typer.echo(json.dumps([r.to_dict() for r in records]))
        elif not records:
            typer.echo(f"no runs in {folder}", err=True)
        else:
            Console().print(runs_table(records))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders, overlaid in the pictures.",
                                               show_default=False)],
    out: Annotated[Path | None, typer.Option(
        help="The picture: loss, accuracy, lr, samples/s and peak memory against steps "
             "(PNG; needs matplotlib). Default: report.png in the (first) run folder.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON list of the runs, "
                                        "their summaries and curves; no picture.")] = False,
) -> None:
    """Pictures of one or more runs (done, stopped or still running) and their summaries side
    by side."""
    with user_errors(as_json=json_):
        from rich.console import Console

        from mbp_cli.commands.tables import comparison_table
        from mbp_cli.run.records import read_run

        records = []
        for path in runs:  # a partitioned run: its own summary, then each part's curves
            run = read_run(path)
            records += [run, *run.parts]
        if json_:
            typer.echo(json.dumps([{**r.to_dict(), "events": r.events} for r in records]))
            return
        from mbp_cli.commands.plot import plot_runs

        picture = out or records[0].path / "report.png"
        plot_runs(records, picture)
        Console().print(comparison_table(records))
        typer.echo(f"wrote {picture}")


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes, one line each."""
    from mbp_cli.recipe.load import bundled_recipes

    found = bundled_recipes()
    if not found:
        typer.echo("no bundled recipes found", err=True)
        raise typer.Exit(EXIT_RUNTIME)
    width = max(len(str(path)) for path, _ in found)
    for path, description in found:
        typer.echo(f"{str(path):<{width}}  {description}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mbp")


if __name__ == "__main__":
    sys.exit(main())
