"""What a run reports, as typed events, and the sinks that take them: the metrics file and JSON
lines here, the terminal in commands/output. A new logger is one more sink in the list."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TextIO

from mbp_cli.errors import MbpError


@dataclass(frozen=True)
class Event:
    """One thing a run reports; `kind` names it in metrics.jsonl and --json (`"event": kind`)."""

    kind: ClassVar[str] = ""
    # A partitioned run's events name their part (0: the composed model); others, none.
    part: int | None = field(default=None, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The event as one JSON object."""
        data = {"event": self.kind, **dataclasses.asdict(self)}
        if data["part"] is None:
            del data["part"]
        return data


@dataclass(frozen=True)
class Start(Event):
    """The run is built and about to train."""

    kind: ClassVar[str] = "start"
    name: str
    device: str
    dtype: str
    target_batch: int
    micro_batch: int
    accumulation_steps: int
    total_steps: int  # of the schedule
    stop_step: int  # where this run stops (--max-steps)
    start_step: int
    steps_per_epoch: int
    train_samples: int
    eval_samples: int
    parameters: int
    run_dir: str
    strategies: str = "fp32"  # precision and memory strategies, e.g. "bf16 + checkpointing"
    micro_batches: list[int] | None = None  # several ranks: each one's micro-batch
    shares: list[int] | None = None  # several ranks: each one's samples of a target batch
    logs: list[str] | None = None  # where train.log's loggers write, e.g. "mlflow at sqlite:…"


@dataclass(frozen=True)
class Step(Event):
    """One optimizer step: a whole target batch."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    samples: int
    items: float
    micro_batches: int
    step_seconds: float
    samples_per_second: float
    peak_memory_bytes: int
    grad_norm: float | None = None  # before clipping, with optim.clip_grad_norm or _value
    ranks: list[dict[str, Any]] | None = None  # several ranks: share, micro-batch, speed, peak
    micro_batch: int | None = None  # the micro-batch size (rank 0's)


@dataclass(frozen=True)
class Eval(Event):
    """Held-out loss and accuracy after a step."""

    kind: ClassVar[str] = "eval"
    step: int
    eval_loss: float | None
    eval_accuracy: float | None


@dataclass(frozen=True)
class Probe(Event):
    """The probe's choice for `micro: auto` (or the one reused from probe.json)."""

    kind: ClassVar[str] = "probe"
    micro_batch: int
    accumulation_steps: int | None = None
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    verified_peak_bytes: int | None = None
    backend: str | None = None
    reused: str | None = None  # the probe.json it came from
    strategies: str | None = None  # the strategies it chose, where the recipe says auto


@dataclass(frozen=True)
class RunWarning(Event):
    """Something the user should know that does not stop the run."""

    kind: ClassVar[str] = "warning"
    message: str


@dataclass(frozen=True)
class OutOfMemory(Event):
    """A target batch ran out of memory and is redone with a smaller micro-batch."""

    kind: ClassVar[str] = "oom"
    step: int
    micro_batch_before: int
    micro_batch: int
    accumulation_steps: int
    rank: int | None = None  # several ranks: the one that ran out


@dataclass(frozen=True)
class Rebalance(Event):
    """batch.balance: dynamic moved the shares towards the faster ranks."""

    kind: ClassVar[str] = "rebalance"
    step: int
    shares: list[int]
    samples_per_second: list[float]


@dataclass(frozen=True)
class Overflow(Event):
    """fp16 gradients overflowed: the whole target batch is skipped and the loss scale drops."""

    kind: ClassVar[str] = "overflow"
    step: int
    loss_scale: float


@dataclass(frozen=True)
class Resume(Event):
    """A run continues from a checkpoint (none: from step 0)."""

    kind: ClassVar[str] = "resume"
    step: int
    checkpoint: str | None


@dataclass(frozen=True)
class Stopped(Event):
    """Stopped by a signal after a checkpoint."""

    kind: ClassVar[str] = "stopped"
    step: int
    signal: str
    checkpoint: str


@dataclass(frozen=True)
class Part(Event):
    """A partitioned run (train.partition) comes to one of its parts."""

    kind: ClassVar[str] = "part"
    parts: int
    begins: str  # the module the part begins at (input: the model's first)
    ends: str  # the module the next part begins at (output: the part is the last)
    parameters: int
    run_dir: str  # the part's own run folder
    already_done: bool = False  # a resume finds it trained: its weights are loaded


@dataclass(frozen=True)
class Done(Event):
    """The run finished; the summary, as summary.json has it."""

    kind: ClassVar[str] = "done"
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The summary, flat, as one JSON object."""
        return {"event": self.kind, **self.summary}


def to_json(value: Any, **options: Any) -> str:
    """JSON that every reader parses: a NaN or infinite number (a skipped step's loss, the
    gradient norm of an fp16 overflow) is written as null, not as NaN or Infinity."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


Sink = Callable[[Event], None]
KINDS = {cls.kind: cls for cls in (Start, Step, Eval, Probe, RunWarning, OutOfMemory, Overflow,
                                   Rebalance, Resume, Stopped, Part, Done)}


def dispatch(receiver: object, event: Event) -> None:
    """Call `receiver.on_<kind>(event)`; an event it has no handler for is an error."""
    handler = getattr(receiver, f"on_{event.kind}", None) if event.kind in KINDS else None
    if handler is None:
        raise TypeError(f"{type(receiver).__name__} has no handler for event {event!r}")
    handler(event)


class Sinks:
    """Every sink of a run, fed in order."""

    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)

    def __call__(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)


class MetricsFile:
    """metrics.jsonl: every event but the summary (summary.json has it), one JSON object a line,
    flushed so a crash keeps what came before. Events before the file is opened wait for it."""

    def __init__(self) -> None:
        self.handle: TextIO | None = None
        self.path: Path | None = None
        self.pending: list[Event] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, Done):
            return
        if self.handle is None:
            self.pending.append(event)
        else:
            self._write(event)

    def open(self, path: Path) -> None:
        """Start writing to `path` (appending), the waiting events first."""
        try:
            self.handle = open(path, "a", encoding="utf-8")  # closed by close()
        except OSError as exc:
            raise MbpError(f"cannot write metrics {path}: {exc.strerror or exc}") from exc
        self.path = path
        for event in self.pending:
            self._write(event)
        self.pending.clear()

    def _write(self, event: Event) -> None:
        try:
            self.handle.write(to_json(event.to_dict()) + "\n")
            self.handle.flush()
        except OSError as exc:
            raise MbpError(f"cannot write metrics {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the file."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class JsonLines:
    """--json: every event as one JSON line on stdout."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def __call__(self, event: Event) -> None:
        print(to_json(event.to_dict()), file=self.out, flush=True)
