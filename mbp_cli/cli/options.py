"""The options several commands share, and the reading of their values (sizes, overrides)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="A recipe YAML file.", show_default=False)]
RunArg = Annotated[Path, typer.Argument(help="A run folder.", show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a recipe key: KEY.PATH=VALUE (VALUE read as YAML). Repeatable.")]
BudgetOption = Annotated[str | None, typer.Option(
    "--budget", metavar="SIZE",
    help="Memory budget, e.g. 20GiB. Default: batch.memory_budget, else free "
         "memory × batch.memory_fraction.")]


def overrides(set_: list[str] | None, device: str | None) -> list[str]:
    """The --set overrides, with --device as the override of train.device."""
    return [*(set_ or []), *([f"train.device={device}"] if device else [])]


def allocator_settings() -> None:
    """Expandable segments fragment less when micro-batch sizes change; the user's choice wins."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def memory_size(value: str | None, option: str) -> int | None:
    """The bytes of a size option (`20GiB`), None where it is not given."""
    from mbp_cli.errors import UsageError
    from mbp_cli.units import parse_bytes

    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from exc
