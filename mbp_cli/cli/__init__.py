"""The `mbp` command line: the Typer app, `--version` and its commands, in the order of `--help`."""

from __future__ import annotations

from typing import Annotated

import typer

from mbp_cli import __version__
from mbp_cli.cli import probe, runs, train

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Train PyTorch models at a target batch larger than memory, exactly, as micro-batches.")


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


app.command(cls=train.TypedArguments)(train.train)
app.command()(probe.probe)
app.command()(runs.validate)
app.command("eval")(runs.eval_)
app.command()(runs.predict)
app.command("runs")(runs.list_runs)
app.command()(runs.report)
app.command("recipes")(runs.list_recipes)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="mbp")
