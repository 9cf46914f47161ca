"""The `mbp` command line: options, output mode and exit codes; heavy imports happen per command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from mbp_cli import __version__
from mbp_cli.errors import EXIT_RUNTIME, MbpError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train PyTorch models at a target batch larger than memory, exactly, as micro-batches.")

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe key: KEY.PATH=VALUE (VALUE read as YAML). Repeatable.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn known errors into one message on stderr and their exit code; re-raise the rest."""
    try:
        yield
    except MbpError as exc:
        if os.environ.get("MBP_DEBUG") == "1":
            raise
        typer.echo(f"error: {exc}", err=True)
        typer.echo("(set MBP_DEBUG=1 to see the traceback)", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


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


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Run folder. Default: runs/<name>-<timestamp>.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the results in an existing run folder.")] = False,
    max_steps: Annotated[int | None, typer.Option(
        min=1, help="Stop after at most this many optimizer steps.")] = None,
    device: Annotated[str | None, typer.Option(
        help="cpu, cuda, cuda:1, mps or auto (overrides train.device).")] = None,
    json_: Annotated[bool, typer.Option(
        "--json", help="JSON lines on stdout (one per step and eval, then a summary).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Train a recipe: stream each target batch as micro-batches, one exact optimizer step each."""
    with user_errors():
        from mbp_cli.registry import load_checked_recipe
        from mbp_cli.report import make_reporter
        from mbp_cli.rundir import default_run_dir, prepare_run_dir
        from mbp_cli.train import RunOptions
        from mbp_cli.train import train as run_training

        overrides = list(set_ or [])
        if device:
            overrides.append(f"train.device={device}")
        loaded = load_checked_recipe(recipe, overrides)
        run_dir = prepare_run_dir(out or default_run_dir(loaded.name), overwrite)
        reporter = make_reporter(as_json=json_, quiet=quiet, log_every=loaded.train.log_every)
        try:
            run_training(loaded, RunOptions(run_dir, max_steps), reporter)
        finally:
            reporter.close()


@app.command()
def validate(recipe: RecipeArg, set_: SetOption = None) -> None:
    """Check a recipe and its builder arguments without training: exit 0 if valid, 2 if not."""
    with user_errors():
        from mbp_cli.registry import load_checked_recipe

        loaded = load_checked_recipe(recipe, list(set_ or []))
        typer.echo(f"{recipe}: valid recipe {loaded.name!r}")


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes, one line each."""
    from mbp_cli.recipe import bundled_recipes

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
