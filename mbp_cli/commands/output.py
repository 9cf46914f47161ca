"""What the user sees: rich progress on a terminal, plain lines otherwise, JSON for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from mbp_cli import events as ev
from mbp_cli.run.stopping import resume_command
from mbp_cli.units import format_bytes, format_percent

Data = dict[str, Any]


def _number(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def step_line(e: ev.Step) -> str:
    """One plain progress line for a step event."""
    rate = _number(e.samples_per_second, ",.0f")
    line = (f"step {e.step}/{e.total_steps}  epoch {e.epoch}  loss {e.loss:.4f}  "
            f"lr {e.lr:.4g}  {rate} samples/s  peak {format_bytes(e.peak_memory_bytes)}")
    return line + (f"  shares {shares_text(e.ranks)}" if e.ranks else "")


def shares_text(ranks: list[Data]) -> str:
    """Each rank's share and speed, e.g. `341@1,210/s 171@602/s`."""
    return " ".join(f"{r['share']}@{_number(r['samples_per_second'], ',.0f')}/s" for r in ranks)


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
            f"→ {e.run_dir}")


def eval_line(e: ev.Eval) -> str:
    """One plain line for an eval event."""
    where = "eval of the composed model" if e.part == 0 else f"eval @ step {e.step}"
    return f"{where}: loss {_number(e.eval_loss)}  accuracy {format_percent(e.eval_accuracy)}"


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
        ("final train loss", _number(s["final_train_loss"])),
        ("eval loss", _number(s.get("eval_loss"))),
        ("eval accuracy", format_percent(s.get("eval_accuracy"))),
        ("samples/s", _number(s["samples_per_second"], ",.0f")),
        ("precision", precision_text(s)),
        ("peak memory", f"{format_bytes(s['peak_memory_bytes'])} ({s['peak_memory_source']})"),
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
    return (f"eval loss {_number(part['eval_loss'])}{accuracy}, micro-batch "
            f"{part['micro_batch']} × {part['accumulation_steps']}, peak "
            f"{format_bytes(part['peak_memory_bytes'])}, {part['wall_seconds']:.1f} s")


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
            _number(m["micro_batch"] / seconds if seconds else None, ",.0f"))
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


class Reporter:
    """Shows run events on the terminal; the base class shows nothing (--quiet). An event it
    has no handler for is an error."""

    def __call__(self, event: ev.Event) -> None:
        ev.dispatch(self, event)

    def on_start(self, e: ev.Start) -> None:
        """The run begins."""

    def on_step(self, e: ev.Step) -> None:
        """A step is done."""

    def on_eval(self, e: ev.Eval) -> None:
        """An evaluation is done."""

    def on_probe(self, e: ev.Probe) -> None:
        """The probe chose."""

    def on_warning(self, e: ev.RunWarning) -> None:
        """Something to know."""

    def on_oom(self, e: ev.OutOfMemory) -> None:
        """A target batch is redone smaller."""

    def on_overflow(self, e: ev.Overflow) -> None:
        """fp16 gradients overflowed: a target batch skipped."""

    def on_rebalance(self, e: ev.Rebalance) -> None:
        """The ranks' shares moved."""

    def on_resume(self, e: ev.Resume) -> None:
        """The run continues from a checkpoint."""

    def on_part(self, e: ev.Part) -> None:
        """A partitioned run comes to one of its parts."""

    def on_stopped(self, e: ev.Stopped) -> None:
        """A signal stopped the run."""

    def on_done(self, e: ev.Done) -> None:
        """The run finished."""

    def close(self) -> None:
        """Stop any live display."""


class PlainReporter(Reporter):
    """Progress lines every `log_every` steps on stderr; the summary on stdout (not with --json,
    whose last line is the summary)."""

    def __init__(self, log_every: int, out: TextIO | None = None, err: TextIO | None = None,
                 show_summary: bool = True) -> None:
        self.log_every, self.out, self.err = log_every, out or sys.stdout, err or sys.stderr
        self.show_summary = show_summary

    def _err(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def on_start(self, e: ev.Start) -> None:
        self._err(start_line(e))

    def on_warning(self, e: ev.RunWarning) -> None:
        self._err(f"warning: {e.message}")

    def on_step(self, e: ev.Step) -> None:
        if e.step % self.log_every == 0 or e.step in (1, e.total_steps):
            self._err(step_line(e))

    def on_eval(self, e: ev.Eval) -> None:
        self._err(eval_line(e))

    def on_probe(self, e: ev.Probe) -> None:
        self._err(probe_line(e))

    def on_resume(self, e: ev.Resume) -> None:
        self._err(f"resuming at step {e.step} from {e.checkpoint}" if e.checkpoint
                  else "no good checkpoint to resume from: starting from step 0")

    def on_oom(self, e: ev.OutOfMemory) -> None:
        self._err(oom_line(e))

    def on_part(self, e: ev.Part) -> None:
        self._err(part_line(e))

    def on_overflow(self, e: ev.Overflow) -> None:
        self._err(overflow_line(e))

    def on_rebalance(self, e: ev.Rebalance) -> None:
        self._err(rebalance_line(e))

    def on_done(self, e: ev.Done) -> None:
        if self.show_summary:
            Console(file=self.out).print(summary_table(e.summary))
        summary = e.summary
        if summary["steps"] < summary["total_steps"]:  # --max-steps
            self._err(f"stopped after step {summary['steps']} of {summary['total_steps']}; "
                      "continue with: "
                      + resume_command(summary["run_dir"], summary.get("world_size", 1)))


class StatsColumn(ProgressColumn):
    """The step's figures, as many as fit the terminal beside the step, the bar and the times:
    peak memory goes first, then samples/s, the micro-batch split and the epoch, and below
    80 columns lr and loss. Parts are dropped whole, never cut."""

    DROP_ORDER = ("peak", "rate", "split", "epoch", "lr", "loss")

    def __init__(self, console: Console, others_width: int) -> None:
        super().__init__()
        self.console, self.others_width = console, others_width

    def render(self, task: Task) -> Text:
        f = task.fields
        parts = {"epoch": f"epoch {f['epoch']}", "loss": f"loss {f['loss']}",
                 "lr": f"lr {f['lr']}", "rate": f"{f['rate']} samples/s",
                 "split": f"micro {f['split']}", "peak": f"peak {f['peak']}"}
        room = self.console.width - self.others_width
        for name in self.DROP_ORDER:
            if len("  ".join(parts.values())) <= room:
                break
            del parts[name]
        return Text("  ".join(parts.values()), no_wrap=True, overflow="ignore")


class TimesColumn(ProgressColumn):
    """Elapsed and remaining time, labelled."""

    width = len("elapsed 0:00:00  left 0:00:00")

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        return Text(f"elapsed {_clock(elapsed)}  left {_clock(task.time_remaining)}",
                    style="progress.elapsed", no_wrap=True)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    minutes, second = divmod(int(seconds), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}:{minute:02d}:{second:02d}"


class RichReporter(PlainReporter):
    """A live progress bar on the terminal (stderr) with loss, speed, batch split and memory."""

    def __init__(self, log_every: int) -> None:
        super().__init__(log_every)
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def _err(self, line: str) -> None:
        self.console.print(line, highlight=False)

    def on_start(self, e: ev.Start) -> None:
        super().on_start(e)
        step_width = len(f"step {e.stop_step}/{e.stop_step}")
        bar_width = 10 if self.console.width < 120 else 30
        stats = StatsColumn(self.console, step_width + bar_width + TimesColumn.width + 3)
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(bar_width=bar_width), stats, TimesColumn(), console=self.console)
        self.task = self.progress.add_task(
            "train", total=e.stop_step, completed=e.start_step, epoch=1, loss="-", lr="-",
            rate="-", split=f"{e.micro_batch}×{e.accumulation_steps}", peak="-")
        self.progress.start()

    def on_step(self, e: ev.Step) -> None:
        shares = {"split": shares_text(e.ranks)} if e.ranks else {}
        self.progress.update(self.task, completed=e.step, epoch=e.epoch, loss=f"{e.loss:.4f}",
                             lr=f"{e.lr:.3g}", rate=_number(e.samples_per_second, ",.0f"),
                             peak=format_bytes(e.peak_memory_bytes), **shares)

    def on_eval(self, e: ev.Eval) -> None:
        self.progress.console.print(eval_line(e), highlight=False)

    def on_oom(self, e: ev.OutOfMemory) -> None:
        self.progress.console.print(oom_line(e), highlight=False)
        self.progress.update(self.task, split=f"{e.micro_batch}×{e.accumulation_steps}")

    def on_done(self, e: ev.Done) -> None:
        self.close()
        super().on_done(e)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def terminal_sinks(*, as_json: bool, quiet: bool, log_every: int) -> list[ev.Sink]:
    """What fits where output lands: --json (JSON lines on stdout, plain lines on stderr),
    --quiet, a terminal (rich), or a pipe (plain lines)."""
    if as_json:
        sinks = [ev.JsonLines(), Reporter() if quiet else PlainReporter(log_every,
                                                                       show_summary=False)]
    elif quiet:
        sinks = [Reporter()]
    elif Console(stderr=True).is_terminal:
        sinks = [RichReporter(log_every)]
    else:
        sinks = [PlainReporter(log_every)]
    return [WhileRead(sink) for sink in sinks]


class WhileRead:
    """A sink that falls silent once the reader of its output has gone (`mbp train … | head`):
    the run goes on to its end and writes its files, as it would with --quiet."""

    def __init__(self, sink: ev.Sink) -> None:
        self.sink, self.is_unread = sink, False

    def __call__(self, event: ev.Event) -> None:
        self._unless_unread(lambda: self.sink(event))

    def close(self) -> None:
        """Close the sink (a live display stops)."""
        self._unless_unread(getattr(self.sink, "close", lambda: None))

    def _unless_unread(self, write: Any) -> None:
        if self.is_unread:
            return
        try:
            write()
        except BrokenPipeError:
            self.is_unread = True
            _silence_closed_streams()


def _silence_closed_streams() -> None:
    """Point stdout or stderr, where its reader has gone, at /dev/null: what is still in its
    buffer would fail again (at exit, as an error)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
