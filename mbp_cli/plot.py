"""`mbp probe --plot`: memory against micro-batch, with the fit and the budget (matplotlib)."""

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
        raise UsageError("--plot needs matplotlib: pip install matplotlib "
                         "(make install includes it)") from exc
    return plt


def plot_probe(result: dict[str, Any], path: Path) -> None:
    """Draw the probe's measurements, its fitted line and the budget into a PNG file."""
    plt = require_pyplot()
    unit, scale = ("GiB", 2**30) if result["budget_bytes"] >= 2**30 else ("MiB", 2**20)
    ran = [m for m in result["measurements"] if m["peak_bytes"] is not None]
    sizes = [m["micro_batch"] for m in ran]
    fit = result["fit"]
    largest = max([*sizes, result["micro_batch"]])
    line_x = [1 + (largest - 1) * i / 100 for i in range(101)]
    line_y = [max(fit["fixed_bytes"] + fit["per_sample_bytes"] * x,
                  fit["optimizer_floor_bytes"]) / scale for x in line_x]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot(sizes, [m["peak_bytes"] / scale for m in ran], "o", label="measured peak")
    axes.plot(line_x, line_y, "-", alpha=0.6, label="fit")
    axes.axhline(result["budget_bytes"] / scale, color="red", linestyle="--", label="budget")
    axes.axhline(result["usable_bytes"] / scale, color="red", linestyle=":", alpha=0.5,
                 label="budget less margin")
    axes.axvline(result["micro_batch"], color="green", linestyle=":",
                 label=f"choice: {result['micro_batch']}")
    axes.set_xlabel("micro-batch")
    axes.set_ylabel(f"peak memory ({unit})")
    axes.set_title(f"memory of one training step ({result['backend']})")
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise UsageError(f"--plot: cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(figure)
