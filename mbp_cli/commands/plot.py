"""Pictures (matplotlib): `mbp probe --plot` (memory against micro-batch, the fit, the budget)
and `mbp report` (a run's curves against steps, several runs overlaid)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mbp_cli.errors import UsageError


def require_pyplot() -> Any:
    """matplotlib's pyplot (headless), or a clear error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("pictures need matplotlib: pip install 'mbp-cli[plot]' "
                         "(make install includes it)") from exc
    return plt


def save(figure: Any, path: Path, plt: Any, dpi: int) -> None:
    """Write the figure as a PNG (a clear error where it cannot be written) and free it."""
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=dpi)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)


def plot_probe(result: dict[str, Any], path: Path) -> dict[str, list[int]]:
    """Draw the probe's measurements (those over the usable budget, or out of memory, marked),
    the fit the choice was made with and the budget into a PNG file; return the micro-batch
    sizes drawn as each kind."""
    plt = require_pyplot()
    unit, scale = ("GiB", 2**30) if result["budget_bytes"] >= 2**30 else ("MiB", 2**20)
    usable = result["usable_bytes"]
    ran = [m for m in result["measurements"] if m["peak_bytes"] is not None]
    fitted = [m for m in ran if m["peak_bytes"] <= usable]
    over = [m for m in ran if m["peak_bytes"] > usable]
    failed = [m["micro_batch"] for m in result["measurements"] if m["peak_bytes"] is None]
    sizes = [m["micro_batch"] for m in result["measurements"]]
    fit = result["fit"]
    largest = max([*sizes, result["micro_batch"]])
    line_x = [1 + (largest - 1) * i / 100 for i in range(101)]
    line_y = [max(fit["fixed_bytes"] + fit["per_sample_bytes"] * x,
                  fit["optimizer_floor_bytes"]) / scale for x in line_x]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot([m["micro_batch"] for m in fitted], [m["peak_bytes"] / scale for m in fitted],
              "o", label="measured peak: fits")
    if over:
        axes.plot([m["micro_batch"] for m in over], [m["peak_bytes"] / scale for m in over],
                  "x", color="red", markersize=9, label="measured peak: over the usable budget")
    if failed:
        axes.plot(failed, [result["budget_bytes"] / scale] * len(failed), "X", color="darkred",
                  markersize=10, label="out of memory")
    axes.plot(line_x, line_y, "-", alpha=0.6, label="the fit the choice was made with")
    axes.axhline(result["budget_bytes"] / scale, color="red", linestyle="--", label="budget")
    axes.axhline(result["usable_bytes"] / scale, color="red", linestyle=":", alpha=0.5,
                 label="budget less margin")
    axes.axvline(result["micro_batch"], color="green", linestyle=":",
                 label=f"choice: {result['micro_batch']}")
    axes.set_xlabel("micro-batch")
    axes.set_ylabel(f"peak memory ({unit})")
    axes.set_title(f"memory of one training step ({result['backend']})")
    axes.legend()
    save(figure, path, plt, dpi=120)
    return {"fits": [m["micro_batch"] for m in fitted], "over": [m["micro_batch"] for m in over],
            "out_of_memory": failed}


RUN_PANELS = [  # (title, event kind, field, y scale)
    ("train loss", "step", "loss", "log"), ("eval loss", "eval", "eval_loss", "log"),
    ("eval accuracy", "eval", "eval_accuracy", "linear"), ("learning rate", "step", "lr", "linear"),
    ("samples/s", "step", "samples_per_second", "linear"),
    ("peak memory (MiB)", "step", "peak_memory_bytes", "linear"),
]


def plot_runs(records: list[Any], path: Path) -> dict[str, list[list[float]]]:
    """Each run's curves against optimizer steps, the runs overlaid, into a PNG file; return
    the steps each panel drew, a list per run."""
    plt = require_pyplot()
    figure, grid = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    drawn: dict[str, list[list[float]]] = {}
    # One colour per run in every panel (a partitioned run's own record has no steps: its
    # parts have them)
    colours = {id(r): f"C{i}" for i, r in enumerate(r for r in records if r.events.get("step"))}
    for axes, (title, kind, key, scale) in zip(grid.flat, RUN_PANELS, strict=True):
        for record in (r for r in records if id(r) in colours):
            points = [(e["step"], e[key]) for e in record.events.get(kind, [])
                      if e.get(key) is not None]
            if key == "peak_memory_bytes":
                points = [(x, y / 2**20) for x, y in points]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, "-" if kind == "step" else "o-", label=record.label,
                          markersize=3, color=colours[id(record)])
        axes.set_title(title)
        drawn[title] = [list(line.get_xdata()) for line in axes.lines]
        values = [y for line in axes.lines for y in line.get_ydata()]
        if scale == "log" and values and min(values) > 0 and max(values) > 20 * min(values):
            axes.set_yscale("log")  # losses falling by orders of magnitude
        axes.grid(alpha=0.3)
    for axes in grid[1]:
        axes.set_xlabel("optimizer step")
    grid.flat[0].legend(fontsize="small")
    save(figure, path, plt, dpi=110)
    return drawn
