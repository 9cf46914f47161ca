"""What the loggers of MLflow and Weights & Biases (catalog/loggers.py) share: a tracked run.

A tracker's run starts with the first trained step (a run that fails at once leaves none) and
gets the recipe as its config, the series TensorBoard has, and the summary at the end; it ends
FINISHED, KILLED (a stop by a signal) or FAILED. Its id, and the last step each series was sent,
are kept in RUN/<tracker>.json: a resume continues the same run from the next step, so no step is
sent twice (a step redone after the checkpoint keeps the first part's figures, the same by the
exactness of the step). A tracker that cannot start is one line before training; one that fails
mid-run is warned about once and left behind, metrics.jsonl staying the record.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbp_cli import events as ev
from mbp_cli.errors import UsageError


def _say_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunFacts:
    """What a logger knows of its run besides its folder and the step it starts from."""

    name: str  # the recipe's
    experiment: str  # train.experiment, else the recipe's name
    config: dict[str, Any] = field(default_factory=dict)  # the resolved recipe
    log_artifacts: bool = True  # train.log_artifacts
    warn: Callable[[str], None] = _say_on_stderr  # something to know; the run goes on


class Series:
    """The figures an event gives, by TensorBoard's tag (train/loss, eval/accuracy, …): the
    series every logger logs, at the optimizer step. Counts the OOM retries it sees."""

    def __init__(self) -> None:
        self.oom_retries = 0

    def __call__(self, event: ev.Event) -> dict[str, float | None]:
        if isinstance(event, ev.Step):
            return {"train/loss": event.loss, "train/lr": event.lr,
                    "train/samples_per_second": event.samples_per_second,
                    "train/peak_memory_bytes": event.peak_memory_bytes,
                    "train/micro_batch": event.micro_batch,
                    "train/accumulation_steps": event.micro_batches,
                    "train/grad_norm": event.grad_norm}
        if isinstance(event, ev.Eval):
            return {"eval/loss": event.eval_loss, "eval/accuracy": event.eval_accuracy}
        if isinstance(event, ev.OutOfMemory):
            self.oom_retries += 1
            return {"train/micro_batch": event.micro_batch,
                    "train/oom_retries": self.oom_retries}
        return {}


def flattened(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with dots (optim.args.lr); an empty mapping
    stays a value."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items()
                for k, v in flattened(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def is_figure(value: Any) -> bool:
    """A number a tracker charts (not a flag)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class Tracker:
    """What MLflow's and W&B's loggers share; each says how to check, start, send and end."""

    tool = ""  # its name in train.log, and RUN/<tool>.json
    where = ""  # where it logs, for the start line (set by check)

    def __init__(self, run_dir: Path, start_step: int, facts: RunFacts) -> None:
        self.run_dir, self.facts = run_dir, facts
        self.kept_path = run_dir / f"{self.tool}.json"
        # A new run (start step 0) starts a new tracked run; a resume goes on in the kept one
        self.kept = self._read_kept() if start_step and self.kept_path.is_file() else {}
        self.last_steps: dict[str, int] = dict(self.kept.get("last_steps", {}))
        self.series = Series()
        self.waiting: list[ev.Event] = []  # until the first trained step
        self.is_started = self.has_failed = False
        self.status = "FAILED"  # until the summary (FINISHED) or a stop (KILLED) says otherwise
        self.signal = ""
        self.check()  # a tracker that cannot start stops the run here: a UsageError

    def _read_kept(self) -> dict[str, Any]:
        try:
            kept = json.loads(self.kept_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            kept = exc
        if not isinstance(kept, dict):
            raise UsageError(f"train.log: {self.kept_path} does not say which {self.tool} run "
                             f"to continue ({kept}); remove it to start a new one")
        return kept

    def check(self) -> None:
        """Raise a UsageError naming the fix if the tracker cannot start."""

    def start(self) -> dict[str, Any]:
        """Start (or continue, with self.kept) the tracked run; what RUN/<tool>.json keeps."""
        raise NotImplementedError

    def send(self, step: int, figures: dict[str, float]) -> None:
        """Log figures at a step."""
        raise NotImplementedError

    def send_summary(self, summary: dict[str, Any]) -> None:
        """Log the run's summary (and, where asked, its files)."""
        raise NotImplementedError

    def end(self) -> None:
        """End the tracked run with self.status."""
        raise NotImplementedError

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Stopped):
            self.status, self.signal = "KILLED", event.signal
        elif isinstance(event, ev.Done):
            self.status = "FINISHED"
        if self.has_failed:
            return
        try:
            if not self.is_started:
                if not isinstance(event, ev.Step):  # the run folder is made with the first step
                    self.waiting.append(event)
                    return
                self.kept = {**self.start(), "last_steps": self.last_steps}
                self.is_started = True
                self._keep()
                for waited in self.waiting:
                    self._log(waited)
                self.waiting.clear()
            self._log(event)
        except Exception as exc:  # whatever the tracker raises, the run goes on without it
            self.has_failed = True
            self.facts.warn(f"{self.tool} logging failed ({first_line(exc)}); the run goes on "
                            "without it (metrics.jsonl has every figure)")

    def _log(self, event: ev.Event) -> None:
        if isinstance(event, ev.Done):
            self.send_summary(event.summary)
        elif isinstance(event, ev.Step | ev.Eval | ev.OutOfMemory):
            self.send_new(event.step, self.series(event))

    def send_new(self, step: int, figures: dict[str, Any]) -> None:
        """Send the figures that are there and were not sent at this step or later."""
        new = {key: float(value) for key, value in figures.items()
               if value is not None and step > self.last_steps.get(key, 0)}
        if not new:
            return
        self.send(step, new)
        self.last_steps.update(dict.fromkeys(new, step))
        self._keep()

    def _keep(self) -> None:
        temporary = self.kept_path.with_name(f".{self.kept_path.name}.tmp")
        temporary.write_text(json.dumps(self.kept, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.kept_path)

    def close(self) -> None:
        """End the tracked run (with the run's status), if it started."""
        if not self.is_started or self.has_failed:
            return
        try:
            self.end()
        except Exception as exc:  # the run itself is over and written: say so, go on
            self.facts.warn(f"{self.tool} could not end its run ({first_line(exc)})")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__

