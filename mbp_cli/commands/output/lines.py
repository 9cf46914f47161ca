"""Each run event as the one plain line a person reads (on a pipe, or above the progress bar)."""

from __future__ import annotations

from typing import Any

from mbp_cli import events as ev
from mbp_cli.units import format_bytes, format_percent


def number_text(value: float | None, spec: str = ".4f") -> str:
    """A figure in `spec`'s format; `-` where there is none."""
    return "-" if value is None else format(value, spec)


def step_line(e: ev.Step) -> str:
    """One plain progress line for a step event."""
    rate = number_text(e.samples_per_second, ",.0f")
    line = (f"step {e.step}/{e.total_steps}  epoch {e.epoch}  loss {e.loss:.4f}  "
            f"lr {e.lr:.4g}  {rate} samples/s  peak {format_bytes(e.peak_memory_bytes)}")
    return line + (f"  shares {shares_text(e.ranks)}" if e.ranks else "")


def shares_text(ranks: list[dict[str, Any]]) -> str:
    """Each rank's share and speed, e.g. `341@1,210/s 171@602/s`."""
    return " ".join(f"{r['share']}@{number_text(r['samples_per_second'], ',.0f')}/s" for r in ranks)


def start_line(e: ev.Start) -> str:
    """The plain line that opens a run."""
    steps = f"{e.total_steps} step{'s' if e.total_steps != 1 else ''}"
    if e.stop_step < e.total_steps:
        steps += f" (stopping after step {e.stop_step})"
    how = e.dtype if e.strategies == "fp32" else f"{e.dtype}, {e.strategies}"
    split = f"micro-batch {e.micro_batch} × {e.accumulation_steps} accumulation steps"
    if e.shares:
        pairs = zip(e.shares, e.micro_batches or [], strict=True)
        split = f"{len(e.shares)} ranks' shares " + " + ".join(
            f"{share} (micro-batch {micro})" for share, micro in pairs)
    samples = f"{e.train_samples:,} training samples" if e.steps_per_epoch else "a stream"
    return (f"training {e.name} on {e.device} ({how}): target batch "
            f"{e.target_batch} = {split}, {steps}, {samples}, {e.parameters:,} parameters "
            f"→ {e.run_dir}" + (f"; logging to {', '.join(e.logs)}" if e.logs else ""))


def eval_line(e: ev.Eval) -> str:
    """One plain line for an eval event."""
    where = "eval of the composed model" if e.part == 0 else f"eval @ step {e.step}"
    return f"{where}: loss {number_text(e.eval_loss)}  accuracy {format_percent(e.eval_accuracy)}"


def probe_line(e: ev.Probe) -> str:
    """The plain line that announces the probe's choice before training."""
    chosen = f"{e.strategies}, " if e.strategies else ""
    if e.reused:
        return f"{chosen}micro-batch {e.micro_batch}, as probed before ({e.reused})"
    return (f"probe ({e.backend}): {chosen}micro-batch {e.micro_batch} × {e.accumulation_steps} "
            f"accumulation steps; peak {format_bytes(e.verified_peak_bytes)} measured, "
            f"{format_bytes(e.predicted_peak_bytes)} predicted, budget "
            f"{format_bytes(e.budget_bytes)}")


def part_line(e: ev.Part) -> str:
    """The plain line that opens one part of a partitioned run."""
    learns = "the class" if e.ends == "output" else f"the class code at {e.ends}"
    reads = "the inputs" if e.begins == "input" else f"the code at {e.begins} + noise"
    state = "already trained: loaded" if e.already_done else f"→ {e.run_dir}"
    return (f"part {e.part}/{e.parts} ({e.begins} → {e.ends}): learns {learns} from {reads}; "
            f"{e.parameters:,} parameters {state}")


def overflow_line(e: ev.Overflow) -> str:
    """One plain line for an fp16 overflow."""
    return (f"fp16 gradients overflowed at step {e.step}: its target batch is skipped, loss "
            f"scale now {e.loss_scale:g}")


def oom_line(e: ev.OutOfMemory) -> str:
    """The plain line for an out-of-memory retry."""
    where = f" on rank {e.rank}" if e.rank is not None else ""
    return (f"out of memory{where} at step {e.step} with micro-batch {e.micro_batch_before}: "
            f"redoing the whole target batch with micro-batch {e.micro_batch}")


def rebalance_line(e: ev.Rebalance) -> str:
    """The plain line for new shares (batch.balance: dynamic)."""
    speeds = ", ".join(f"{s:,.0f}" for s in e.samples_per_second)
    return (f"rebalanced after step {e.step}: shares {' + '.join(map(str, e.shares))} "
            f"(samples/s per rank: {speeds})")

