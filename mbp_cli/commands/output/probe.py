"""The probe's answer printed: its measurements, the strategies it weighed, its choice in words."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from mbp_cli.commands.output.lines import number_text
from mbp_cli.units import format_bytes, format_percent

Data = dict[str, Any]


def where(result: Data) -> str:
    """How and where the probe measured: `tracked, cpu`; an estimate is of a CUDA device."""
    if result["backend"] == "estimate":
        return "estimate for a CUDA device, on fake tensors"
    return f"{result['backend']}, {result['device']}"


def probe_table(result: Data) -> Table:
    """The probe's measurements: micro-batch, peak, share of budget (`over` past the usable
    part, the budget less its margin), step time, samples/s."""
    table = Table(title=f"memory of one training step ({where(result)})")
    for column in ("micro-batch", "peak memory", "of budget", "step time", "samples/s"):
        table.add_column(column, justify="right")
    for m in result["measurements"]:
        peak, seconds = m["peak_bytes"], m["step_seconds"]
        table.add_row(
            str(m["micro_batch"]), format_bytes(peak) if peak is not None else "out of memory",
            "-" if peak is None else format_percent(peak / result["budget_bytes"])
            + (" over" if peak > result["usable_bytes"] else ""),
            f"{seconds * 1e3:.1f} ms" if seconds is not None else "-",
            number_text(m["micro_batch"] / seconds if seconds else None, ",.0f"))
    return table


def strategies_table(result: Data) -> Table:
    """The strategies weighed: largest micro-batch, split, peak and time per target batch."""
    table = Table(title=f"strategies for a target batch of {result['target_batch']} "
                        f"({where(result)})")
    table.add_column("strategies", no_wrap=True)
    for column in ("largest", "split", "peak", "per target batch"):
        table.add_column(column, justify="right")
    for row in result["strategies"]:
        chosen = " ← chosen" if row["label"] == result["choice_label"] else ""
        if row["fits"] is not True:
            shown = f"{row['slower']:.0f}× slower/sample" if row.get("slower") else row["note"]
            table.add_row(row["label"], shown, "-", "-", "-")
            continue
        seconds = row.get("seconds_at_micro_batch", row["seconds_per_target_batch"])
        table.add_row(row["label"] + chosen, str(row["largest_micro_batch"]),
                      f"{row['micro_batch']} × {row['accumulation_steps']}",
                      format_bytes(row["verified_peak_bytes"]),
                      f"{seconds:.3f} s" if seconds is not None else "-")
    return table


def probe_choice_lines(result: Data) -> list[str]:
    """What the probe chose and why, in words."""
    fit = result["fit"]
    per_target = result["seconds_per_target_batch"]
    lines = [
        f"budget {format_bytes(result['budget_bytes'])} "
        f"({format_bytes(result['usable_bytes'])} usable after the margin)",
        f"fit: {format_bytes(fit['fixed_bytes'])} + {format_bytes(fit['per_sample_bytes'])} "
        f"per sample (optimizer step floor {format_bytes(fit['optimizer_floor_bytes'])})",
        f"largest micro-batch that fits: {result['largest_micro_batch']}",
        f"choice: micro-batch {result['micro_batch']} × {result['accumulation_steps']} "
        f"accumulation steps for a target batch of {result['target_batch']}",
        f"peak at the choice: {format_bytes(result['verified_peak_bytes'])} "
        f"{'estimated' if result['backend'] == 'estimate' else 'measured'}, "
        f"{format_bytes(result['predicted_peak_bytes'])} predicted by the fit",
    ]
    if per_target is not None:
        lines.append(f"estimated time per target batch: {per_target:.3f} s")
    if result.get("attention"):
        lines.append(f"attention: {result['attention']} assumed")  # the device's own choice
    return lines


def print_probe(result: Data, *, as_json: bool, out: TextIO | None = None) -> None:
    """The probe's answer on stdout: one JSON object, or the table and the choice."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(result), file=out, flush=True)
        return
    console = Console(file=out)
    console.print(probe_table(result))
    if "strategies" in result:
        console.print(strategies_table(result))
        why = ("fewest micro-batches per target batch, then the least added work: an estimate "
               "has no timings") if result["backend"] == "estimate" else \
            "the fastest per target batch that fits"
        console.print(f"strategies chosen: {result['choice_label']} ({why}); to train with "
                      f"them: --set {result['choice_keys'].replace(' ', ' --set ')}",
                      highlight=False)
    for line in probe_choice_lines(result):
        console.print(line, highlight=False)

