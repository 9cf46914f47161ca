"""The run folder: created without clobbering earlier results, written atomically."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mbp_cli.errors import MbpError, UsageError
from mbp_cli.recipe import Recipe, dump_recipe

READ_FROM = "# mbp: read from "  # the saved recipe's first line: where import paths resolve
RESULT_FILES = ("recipe.yaml", "probe.json", "metrics.jsonl", "model.pt", "summary.json",
                "checkpoints")


def default_run_dir(name: str) -> Path:
    """runs/<name>-<timestamp> under the current folder."""
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(path: Path, overwrite: bool) -> list[str]:
    """The result files in the way; refuse them unless `overwrite`. Changes nothing."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    held = [name for name in RESULT_FILES if (path / name).exists()]
    if held and not overwrite:
        raise UsageError(f"run folder {path} already holds results ({', '.join(held)}); "
                         "pass --overwrite to replace them, or choose another --out")
    return held


def prepare_run_dir(path: Path, overwrite: bool) -> Path:
    """Create the run folder; with `overwrite`, remove mbp's earlier results (only those)."""
    held = check_run_dir(path, overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        for name in held:
            if (path / name).is_dir():
                shutil.rmtree(path / name)
            else:
                (path / name).unlink()
    except OSError as exc:
        raise UsageError(f"cannot prepare run folder {path}: {exc.strerror or exc}") from exc
    return path


def write_atomic(path: Path, data: bytes, what: str = "file") -> None:
    """Write a file so that a reader sees the old content or the new, never a torn one.

    A write that fails (a full disk, a folder that cannot be written) leaves the old file as it
    was and is an MbpError naming `what` and the path.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)  # the rename itself survives a power cut
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise MbpError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
        raise


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> None:
    """Atomically write indented JSON."""
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def save_state_dict(path: Path, state: dict[str, Any], what: str = "model") -> None:
    """Atomically save a state_dict with torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue(), what)


class MetricsLog:
    """metrics.jsonl, one JSON object a line, flushed so a crash keeps what came before."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.handle = open(path, "a", encoding="utf-8")  # closed by close()
        except OSError as exc:
            raise MbpError(f"cannot write metrics {path}: {exc.strerror or exc}") from exc

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        try:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        except OSError as exc:
            raise MbpError(f"cannot write metrics {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close the file."""
        self.handle.close()


class RunFolder:
    """The run folder, made only once the first target batch has succeeded (so a run that
    fails at once leaves nothing behind); events before it exists wait for it."""

    def __init__(self, path: Path, recipe: Recipe, resume: bool, overwrite: bool,
                 emit: Callable[[dict[str, Any]], None]) -> None:
        self.path, self.recipe, self.emit = path, recipe, emit
        self.resume, self.overwrite = resume, overwrite
        self.metrics: MetricsLog | None = None
        self.pending: list[dict[str, Any]] = []
        self.probe: dict | None = None

    def record(self, event: dict[str, Any]) -> None:
        """Log an event to metrics.jsonl (once the folder exists) and pass it on."""
        if self.metrics is not None:
            self.metrics.write(event)
        else:
            self.pending.append(event)
        self.emit(event)

    def open(self) -> None:
        """Make the folder (a resumed run has it), write the recipe and what waited."""
        if self.metrics is not None:
            return
        if not self.resume:
            prepare_run_dir(self.path, self.overwrite)
        text = f"{READ_FROM}{self.recipe.folder}\n" + dump_recipe(self.recipe)
        write_atomic(self.path / "recipe.yaml", text.encode(), what="recipe")
        if self.probe is not None:
            write_json(self.path / "probe.json", self.probe)
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        for event in self.pending:
            self.metrics.write(event)
        self.pending.clear()

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self.metrics is not None:
            self.metrics.close()
