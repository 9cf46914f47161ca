"""A run's summary as the table printed when it ends."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mbp_cli.commands.output.lines import number_text
from mbp_cli.units import format_bytes, format_percent

Data = dict[str, Any]


def batch_split(s: Data) -> str:
    """How a run cut its target batch: micro-batch × steps, or each rank's share (micro)."""
    if s.get("shares"):
        return f"{s['target_batch']} = " + " + ".join(
            f"{share} ({micro})" for share, micro in zip(s["shares"], s["micro_batches"],
                                                        strict=True)) + " (micro-batches)"
    return f"{s['target_batch']} = {s['micro_batch']} × {s['accumulation_steps']}"


def wall_time(s: Data) -> str:
    """The run's wall time, every part; a resumed run's last part said apart."""
    if s.get("resumed_at_step") is None:
        return f"{s['wall_seconds']:.1f} s"
    return (f"{s['wall_seconds']:.1f} s (this part, from step {s['resumed_at_step']}: "
            f"{s['resumed_wall_seconds']:.1f} s)")


def precision_text(s: Data) -> str:
    """`float32`, `float32 + checkpointing`, `float32 parameters, bf16 + checkpointing`."""
    dtype, strategies = s.get("dtype") or "float32", s.get("strategies") or "fp32"
    if strategies.startswith("fp32"):
        return dtype + strategies.removeprefix("fp32")
    return f"{dtype} parameters, {strategies}"


PEAK_SOURCES = {  # what each peak figure measures, in words
    "cuda_max_memory_allocated": "CUDA allocator's peak",
    "tracked_tensors": "tensors on the simulated device",
    "tracked_tensors_first_steps": "tensors, tracked over the first target batches",
    "process_peak_rss": "the process's peak RSS",
}


def peak_text(s: Data) -> str:
    """The run's peak, labelled; the process's own beside a tensor figure on the CPU."""
    source = s["peak_memory_source"]
    text = f"{format_bytes(s['peak_memory_bytes'])} ({PEAK_SOURCES.get(source, source)})"
    process = s.get("process_peak_rss_bytes")
    if process and source.startswith("tracked"):
        text += f"; process {format_bytes(process)} (peak RSS, torch's libraries included)"
    return text


def summary_table(s: Data) -> Table:
    """The final summary of a run as a two-column table."""
    status = "done" if s["steps"] >= s["total_steps"] else \
        f"stopped after step {s['steps']} of {s['total_steps']}"
    table = Table(title=f"{s['name']}: {status}", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # a long run folder folds, never cut
    rows = [
        ("steps", str(s["steps"])), ("samples seen", f"{s['samples_seen']:,}"),
        ("batch", batch_split(s)),
        ("final train loss", number_text(s["final_train_loss"])),
        ("eval loss", number_text(s.get("eval_loss"))),
        ("eval accuracy", format_percent(s.get("eval_accuracy"))),
        ("samples/s", number_text(s["samples_per_second"], ",.0f")),
        ("precision", precision_text(s)),
        ("peak memory", peak_text(s)),
        ("wall time", wall_time(s)), ("run folder", s["run_dir"]),
    ]
    if s.get("compile_seconds") is not None:
        rows.insert(-2, ("compile time", f"{s['compile_seconds']:.1f} s (not in samples/s)"))
    if s.get("loss_scale") is not None:  # fp16
        rows.insert(-2, ("fp16 loss scale", f"{s['loss_scale']:g}, {s.get('overflow_skips', 0)} "
                                            "target batches skipped for overflow"))
    for part in (s.get("partition") or {}).get("parts", []):
        rows.insert(-2, (f"part {part['part']} ({part['begins']} → {part['ends']})",
                         part_figures(part)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def part_figures(part: Data) -> str:
    """One part's own figures in a partitioned run's summary."""
    accuracy = "" if part["eval_accuracy"] is None else \
        f" ({format_percent(part['eval_accuracy'])} on noisy codes)"
    return (f"eval loss {number_text(part['eval_loss'])}{accuracy}, micro-batch "
            f"{part['micro_batch']} × {part['accumulation_steps']}, peak "
            f"{format_bytes(part['peak_memory_bytes'])}, {part['wall_seconds']:.1f} s")

