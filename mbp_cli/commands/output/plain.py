"""The terminal's plain sinks: the silent base Reporter (--quiet) and PlainReporter's lines."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

from mbp_cli import events as ev
from mbp_cli.commands.output.lines import (
    eval_line,
    oom_line,
    overflow_line,
    part_line,
    probe_line,
    rebalance_line,
    start_line,
    step_line,
)
from mbp_cli.commands.output.summary import summary_table
from mbp_cli.run.stopping import resume_command


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
