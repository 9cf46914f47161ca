"""What the user sees: rich progress on a terminal, plain lines otherwise, JSON for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mbp_cli.units import format_bytes

Event = dict[str, Any]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def step_line(e: Event) -> str:
    """One plain progress line for a step event."""
    rate = _number(e["samples_per_second"], ",.0f")
    return (f"step {e['step']}/{e['total_steps']}  epoch {e['epoch']}  loss {e['loss']:.4f}  "
            f"lr {e['lr']:.4g}  {rate} samples/s  peak {format_bytes(e['peak_memory_bytes'])}")


def start_line(e: Event) -> str:
    """The plain line that opens a run."""
    return (f"training {e['name']} on {e['device']} ({e['dtype']}): target batch "
            f"{e['target_batch']} = micro-batch {e['micro_batch']} × {e['accumulation_steps']} "
            f"accumulation steps, {e['total_steps']} steps, {e['train_samples']:,} training "
            f"samples, {e['parameters']:,} parameters → {e['run_dir']}")


def eval_line(e: Event) -> str:
    """One plain line for an eval event."""
    return (f"eval @ step {e['step']}: loss {_number(e['eval_loss'])}  "
            f"accuracy {_percent(e['eval_accuracy'])}")


def summary_table(s: Event) -> Table:
    """The final summary of a run as a two-column table."""
    table = Table(title=f"{s['name']}: done", show_header=False)
    rows = [
        ("steps", str(s["steps"])), ("samples seen", f"{s['samples_seen']:,}"),
        ("batch", f"{s['target_batch']} = {s['micro_batch']} × {s['accumulation_steps']}"),
        ("final train loss", _number(s["final_train_loss"])),
        ("eval loss", _number(s.get("eval_loss"))),
        ("eval accuracy", _percent(s.get("eval_accuracy"))),
        ("samples/s", _number(s["samples_per_second"], ",.0f")),
        ("peak memory", f"{format_bytes(s['peak_memory_bytes'])} ({s['peak_memory_source']})"),
        ("wall time", f"{s['wall_seconds']:.1f} s"), ("run folder", s["run_dir"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


class Reporter:
    """Receives run events; the base class shows nothing (--quiet)."""

    def __call__(self, event: Event) -> None:
        handler = getattr(self, "on_" + event["event"], None)
        if handler:
            handler(event)

    def close(self) -> None:
        """Stop any live display."""


class PlainReporter(Reporter):
    """Progress lines every `log_every` steps on stderr; the summary on stdout."""

    def __init__(self, log_every: int, out: TextIO | None = None, err: TextIO | None = None):
        self.log_every, self.out, self.err = log_every, out or sys.stdout, err or sys.stderr

    def _err(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def on_start(self, e: Event) -> None:
        self._err(start_line(e))

    def on_warning(self, e: Event) -> None:
        self._err(f"warning: {e['message']}")

    def on_step(self, e: Event) -> None:
        if e["step"] % self.log_every == 0 or e["step"] in (1, e["total_steps"]):
            self._err(step_line(e))

    def on_eval(self, e: Event) -> None:
        self._err(eval_line(e))

    def on_done(self, e: Event) -> None:
        Console(file=self.out, width=100).print(summary_table(e))


class RichReporter(PlainReporter):
    """A live progress bar on the terminal (stderr) with loss, speed, batch split and memory."""

    def __init__(self, log_every: int) -> None:
        super().__init__(log_every)
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def _err(self, line: str) -> None:
        self.console.print(line, highlight=False)

    def on_start(self, e: Event) -> None:
        super().on_start(e)
        split = f"{e['micro_batch']}×{e['accumulation_steps']}"
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}  "
                       "{task.fields[rate]} samples/s  micro {task.fields[split]}  "
                       "peak {task.fields[peak]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("train", total=e["total_steps"], epoch=1, loss="-",
                                           rate="-", split=split, peak="-")
        self.progress.start()

    def on_step(self, e: Event) -> None:
        self.progress.update(self.task, completed=e["step"], epoch=e["epoch"],
                             loss=f"{e['loss']:.4f}", rate=_number(e["samples_per_second"], ",.0f"),
                             peak=format_bytes(e["peak_memory_bytes"]))

    def on_eval(self, e: Event) -> None:
        self.progress.console.print(eval_line(e), highlight=False)

    def on_done(self, e: Event) -> None:
        self.close()
        super().on_done(e)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class JsonReporter(PlainReporter):
    """Every event as one JSON line on stdout; the plain progress lines on stderr."""

    def __call__(self, event: Event) -> None:
        print(json.dumps(event), file=self.out, flush=True)
        if event["event"] != "done":
            super().__call__(event)


def make_reporter(*, as_json: bool, quiet: bool, log_every: int) -> Reporter:
    """The reporter that fits where output lands: --json, --quiet, a terminal, or a pipe."""
    if as_json:
        return JsonReporter(log_every)
    if quiet:
        return Reporter()
    if Console(stderr=True).is_terminal:
        return RichReporter(log_every)
    return PlainReporter(log_every)
