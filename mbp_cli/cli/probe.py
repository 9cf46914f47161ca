"""`mbp probe`: its options, and a partitioned recipe probed part by part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mbp_cli.cli.exits import user_errors
from mbp_cli.cli.options import (
    BudgetOption,
    RecipeArg,
    SetOption,
    allocator_settings,
    memory_size,
    overrides,
)

if TYPE_CHECKING:
    from mbp_cli.memory.search import ProbeOptions
    from mbp_cli.recipe.spec import Recipe


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
        allocator_settings()
        from mbp_cli.commands.output.probe import print_probe
        from mbp_cli.engine.setup import resolve_device
        from mbp_cli.errors import UsageError
        from mbp_cli.memory.search import ProbeOptions
        from mbp_cli.memory.weigh import probe_recipe
        from mbp_cli.recipe.load import load_recipe

        loaded = load_recipe(recipe, overrides(set_, device))
        if device_memory and not estimate:
            raise UsageError("--device-memory goes with --estimate")
        options = ProbeOptions(
            device=resolve_device(loaded.train.device) if not estimate else None,
            budget_bytes=memory_size(budget, "--budget"), estimate=estimate,
            device_memory_bytes=memory_size(device_memory, "--device-memory"))
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
