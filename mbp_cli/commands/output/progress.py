"""The live progress bar on a terminal: its columns and RichReporter, which draws it."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from mbp_cli import events as ev
from mbp_cli.commands.output.lines import eval_line, number_text, oom_line, shares_text
from mbp_cli.commands.output.plain import PlainReporter
from mbp_cli.units import format_bytes


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
                             lr=f"{e.lr:.3g}", rate=number_text(e.samples_per_second, ",.0f"),
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
