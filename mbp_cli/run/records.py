"""What a run folder says about its run: status, steps, best eval, wall time, the curves."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mbp_cli.errors import UsageError

LOCK = ".lock"  # held (flock) while training runs; the OS drops it when the process dies
PARTS_FOLDER, CODES_FILE = "parts", "codes.pt"  # a partitioned run's parts and its codes


@contextlib.contextmanager
def held_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock while training runs in it."""
    path = run_dir / LOCK
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # a run that ends leaves no lock behind
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_running(run_dir: Path) -> bool:
    """Whether a training process holds the folder's lock now."""
    path = run_dir / LOCK
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@dataclass
class RunRecord:
    """One run folder read back: its events by kind and its summary (None until it ends)."""

    path: Path
    name: str
    status: str  # done, stopped at step k, failed at step k, running
    steps: int
    total_steps: int | None
    best_eval_accuracy: float | None
    best_eval_loss: float | None
    wall_seconds: float | None
    summary: dict[str, Any] | None = None
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        """The run folder's name; a part of a partitioned run's, RUN/part-N."""
        whole = partitioned_run_of(self.path)
        return f"{whole.name}/{self.path.name}" if whole else self.path.name

    @property
    def parts(self) -> list[RunRecord]:
        """A partitioned run's parts, each a run of its own (none for other runs)."""
        return read_parts(self.path)

    @property
    def state(self) -> str:
        """The status without its step, which `progress` shows: done, stopped, failed,
        running."""
        return self.status.split(" at step ")[0]

    @property
    def progress(self) -> str:
        """Steps done, of the schedule's: '87/150'."""
        return f"{self.steps}/{self.total_steps}" if self.total_steps else str(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The record for --json, without the events."""
        data = asdict(self)
        data.pop("events")
        data["path"] = str(self.path)
        return data


def read_run(path: Path) -> RunRecord:
    """Read a run folder (done, stopped, failed or still running)."""
    if not path.is_dir():
        raise UsageError(f"no such run folder: {path}")
    if not (path / "metrics.jsonl").is_file():
        raise UsageError(f"{path} is not a run folder: it has no metrics.jsonl")
    events: dict[str, list[dict[str, Any]]] = {}
    for record in read_records(path / "metrics.jsonl"):
        events.setdefault(record.get("event", ""), []).append(record)
    summary = read_summary(path)
    if summary is not None and not is_last_session(path, summary, events):
        summary = None  # a resume killed after it began: the summary is the earlier session's
    steps = [e["step"] for e in events.get("step", [])]
    step = max(steps, default=summary.get("steps", 0) if summary else 0)  # partitioned: parts'
    starts = events.get("start", [])
    # Runs from before start events and total_steps in the summary: the steps' own count
    totals = [e.get("total_steps") for e in (*starts[-1:], summary or {},
                                            *events.get("step", [])[-1:])]
    total = next((t for t in totals if t is not None), None)
    name = starts[-1]["name"] if starts else (summary or {}).get("name", path.name)
    accuracies = [e["eval_accuracy"] for e in events.get("eval", [])
                  if e.get("eval_accuracy") is not None]
    losses = [e["eval_loss"] for e in events.get("eval", []) if e.get("eval_loss") is not None]
    record = RunRecord(path, name, run_status(path, summary, events, step), step, total,
                       max(accuracies, default=None), min(losses, default=None),
                       (summary or {}).get("wall_seconds")
                       or sum(e.get("step_seconds", 0) for e in events.get("step", [])) or None,
                       summary, events)
    if summary is None and events.get("part") and record.status != "running":
        record = _from_parts(record)
    return record


def is_last_session(path: Path, summary: dict[str, Any], events: dict[str, list]) -> bool:
    """Whether summary.json tells of the run's last session, not one a resume went on from."""
    resumes, steps = events.get("resume", []), events.get("step", [])
    if resumes and resumes[-1]["step"] != summary.get("resumed_at_step", 0):
        return False
    if events.get("part"):  # a partitioned run: its parts log the steps
        steps = [{"step": sum(p.steps for p in read_parts(path))}]
    return max((e["step"] for e in steps), default=0) <= summary.get("steps", 0)


def read_parts(path: Path) -> list[RunRecord]:
    """A partitioned run's parts, each a run of its own (none for other runs)."""
    folders = sorted((path / PARTS_FOLDER).glob("part-*"), key=lambda p: int(p.name[5:]))
    return [read_run(p) for p in folders if (p / "metrics.jsonl").is_file()]


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run folder's summary.json (None until the run has finished)."""
    file = path / "summary.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{file} cannot be read: {exc}") from exc
    if not is_sound(summary):
        raise UsageError(f"{file} is not a run's summary (a JSON object of its figures)")
    return summary


# Figures of the records and summaries mbp writes: numbers (or null) wherever they appear
FIGURES = ("step", "steps", "total_steps", "loss", "lr", "eval_loss", "eval_accuracy",
           "step_seconds", "samples_per_second", "peak_memory_bytes", "wall_seconds",
           "samples_seen", "final_train_loss", "micro_batch", "parts")


def is_sound(record: Any) -> bool:
    """Whether a record reads as mbp wrote it: a mapping whose figures are numbers."""
    return isinstance(record, dict) and all(
        record[key] is None or isinstance(record[key], int | float)
        and not isinstance(record[key], bool) for key in FIGURES if key in record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line cut short by a kill, or one damaged, is passed over."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if is_sound(record):
                records.append(record)
    return records


def _from_parts(record: RunRecord) -> RunRecord:
    """A partitioned run that did not finish (stopped, failed, killed), told by its parts."""
    parts = record.parts
    if not parts:
        return record
    steps = sum(p.steps for p in parts)
    last = parts[-1].status.rsplit(" at step", 1)[0]  # stopped / failed; done: the next failed
    record.status = f"{'stopped' if last == 'stopped' else 'failed'} at step {steps}"
    record.steps, record.name = steps, parts[0].name
    record.total_steps = (parts[0].total_steps or 0) * record.events["part"][-1]["parts"]
    record.wall_seconds = sum(p.wall_seconds or 0 for p in parts) or None
    return record


def partitioned_run_of(path: Path) -> Path | None:
    """The partitioned run whose part `path` is (None where it is no part)."""
    if path.parent.name == PARTS_FOLDER and (path.parent.parent / CODES_FILE).is_file():
        return path.parent.parent
    return None


def refuse_part(path: Path, what: str) -> None:
    """A part of a partitioned run is not a run to resume, evaluate or predict with alone."""
    whole = partitioned_run_of(path)
    if whole is not None:
        raise UsageError(f"{path} is one part of the partitioned run {whole}, whose weights "
                         f"are only that part's: {what} {whole} instead")


def run_status(path: Path, summary: dict | None, events: dict[str, list], step: int) -> str:
    """done; stopped at step k (a signal or --max-steps); running; else failed at step k."""
    if is_running(path):
        return "running"
    if summary is not None:
        if summary.get("steps", step) >= summary.get("total_steps", 0):
            return "done"
        return f"stopped at step {summary['steps']}"
    stops = events.get("stopped", [])
    if stops and stops[-1]["step"] >= step:
        return f"stopped at step {stops[-1]['step']}"
    return f"failed at step {step}"


def find_runs(folder: Path) -> list[RunRecord]:
    """The run folders directly under `folder` (or `folder` itself, a run), oldest first;
    none where the folder does not exist yet."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder of runs")
    if (folder / "metrics.jsonl").is_file():
        return [read_run(folder)]
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if (p / "metrics.jsonl").is_file()]
    return [_listed(p) for p in sorted(found, key=lambda p: p.stat().st_mtime)]


def _listed(path: Path) -> RunRecord:
    """A run as `mbp runs` lists it: one whose summary cannot be read says so in its status,
    and the others are listed still."""
    try:
        return read_run(path)
    except UsageError:
        return RunRecord(path, path.name, "summary.json unreadable", 0, None, None, None, None,
                         None, {})
