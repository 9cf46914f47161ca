"""`mbp validate`, `eval`, `predict`, `runs`, `report`, `recipes`: recipes checked, runs read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mbp_cli.cli.exits import user_errors
from mbp_cli.cli.options import RecipeArg, RunArg, SetOption, overrides
from mbp_cli.errors import EXIT_RUNTIME


def validate(
    recipe: RecipeArg,
    set_: SetOption = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, metavar="N",
        help="Check the recipe for N ranks, as `mbp train --nproc N` would take it (a list "
             "per rank in batch.micro or batch.shares).")] = 1,
) -> None:
    """Check a recipe without training: its keys, builder arguments, then the model built and
    one forward + loss + backward on two samples. Exit 0 if valid, 2 if not."""
    with user_errors():
        from mbp_cli.commands.validate import trial_step
        from mbp_cli.partition.build import check_part_ranks
        from mbp_cli.recipe.load import load_recipe
        from mbp_cli.run.shares import check_rank_lists

        loaded = load_recipe(recipe, list(set_ or []))
        check_rank_lists(loaded.batch, nproc)  # as train refuses them, on one rank too
        if loaded.train.partition is not None:
            check_part_ranks(loaded, nproc)
        trial = trial_step(loaded)
        typer.echo(f"{recipe}: valid recipe {loaded.name!r}; {trial}")


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

        result = evaluate_run(load_run(run, overrides(set_, None), checkpoint))
        if json_:
            typer.echo(json.dumps(result))
            return
        accuracy = result.get("eval_accuracy")
        shown = "" if accuracy is None else f"  accuracy {100 * accuracy:.2f}%"
        count = "the" if result["samples"] is None else f"{result['samples']:,}"
        typer.echo(f"{run}: loss {result['eval_loss']:.4f}{shown}  on {count} samples of "
                   f"{result['split']} ({result['weights']})")


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
    """The top classes a run's model gives each input, with their probabilities (none where
    its scores are not finite: null in --json)."""
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
                                  for c in ranked or [])
                if ranked is None:
                    shown = "the model's output is not finite (a NaN or infinite score)"
                typer.echo(f"{label}: {shown}")


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
