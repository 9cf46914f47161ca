"""The run folder: created without clobbering earlier results, written atomically."""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mbp_cli.errors import MbpError, UsageError
from mbp_cli.events import MetricsFile, to_json
from mbp_cli.recipe.spec import READ_FROM, Recipe, dump_recipe
from mbp_cli.run.records import CODES_FILE, PARTS_FOLDER, held_lock, is_running

RESULT_FILES = ("recipe.yaml", "probe.json", "metrics.jsonl", "model.pt", "summary.json",
                "checkpoints", "tensorboard", "mlflow.json", "wandb.json", "wandb", PARTS_FOLDER,
                CODES_FILE)


def default_run_dir(name: str) -> Path:
    """runs/<name>-<timestamp> under the current folder (the name as one plain folder name:
    a name with slashes or dots stays inside runs/); -2, -3… after it where that is taken."""
    plain = re.sub(r"[^\w.+-]+", "_", name).strip("._") or "run"
    stamp = Path("runs") / f"{plain}-{time.strftime('%Y%m%d-%H%M%S')}"
    taken = itertools.count(2)
    path = stamp
    while path.exists():  # a run started in the same second has it
        path = stamp.with_name(f"{stamp.name}-{next(taken)}")
    return path


@contextlib.contextmanager
def claimed_run_dir(name: str) -> Iterator[Path]:
    """A default run folder made at once, so that a run started in the same second takes
    another; made and left empty (the run failed at once), it goes again."""
    runs = Path("runs")
    made = not runs.exists()
    make_run_dir(runs)
    while True:
        path = default_run_dir(name)
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue  # another run made it between the look and the mkdir
        except OSError as exc:
            raise UsageError(f"cannot prepare run folder {path}: {exc.strerror or exc}") from exc
    try:
        yield path
    finally:
        _remove_if_empty(path)
        if made:
            _remove_if_empty(runs)


def check_run_dir(path: Path, overwrite: bool) -> list[str]:
    """The result files in the way; refuse them unless `overwrite`. Changes nothing."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a folder")
    held = [name for name in RESULT_FILES if (path / name).exists()]
    if held and not overwrite:
        raise UsageError(f"run folder {path} already holds results ({', '.join(held)}); "
                         "pass --overwrite to replace them, or choose another --out")
    return held


def make_run_dir(path: Path) -> None:
    """Create the run folder (and those above it)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot prepare run folder {path}: {exc.strerror or exc}") from exc


# What mbp writes inside the folders among its results; anything else there is the user's
OURS_INSIDE = {"checkpoints": ("step-*.pt", "step-*.pt.unreadable", ".step-*.tmp"),
               "tensorboard": ("events.out.tfevents.*",),
               # the link first: once what it points at is gone, glob no longer finds it
               "wandb": ("latest-run", "offline-run-*", "run-*", "debug*.log")}


def remove_results(path: Path, held: list[str]) -> None:
    """Remove mbp's earlier results named in `held` (only those, and inside its folders only
    its own files: a folder left with the user's files stays), for --overwrite."""
    try:
        for name in held:
            target = path / name
            if not target.is_dir():
                target.unlink(missing_ok=True)
            elif name == PARTS_FOLDER:  # each part is a run folder of its own
                for part in target.glob("part-*"):
                    remove_results(part, check_run_dir(part, overwrite=True))
                    _remove_if_empty(part)
                _remove_if_empty(target)
            else:
                for pattern in OURS_INSIDE.get(name, ("*",)):
                    for found in target.glob(pattern):
                        if found.is_dir() and not found.is_symlink():
                            shutil.rmtree(found)
                        else:
                            found.unlink()
                _remove_if_empty(target)
    except OSError as exc:
        raise UsageError(f"cannot prepare run folder {path}: {exc.strerror or exc}") from exc


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # the user's files are in it: it stays
        folder.rmdir()


NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a folder that cannot be written


def write_atomic(path: Path, data: bytes, what: str = "file") -> None:
    """Write a file so that a reader sees the old content or the new, never a torn one.

    A write that fails (a full disk, a folder that cannot be written) leaves the old file as it
    was and is an MbpError naming `what` and the path.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # as open() would make it, not mkstemp's 0600
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
            kind = UsageError if exc.errno in NOT_WRITABLE else MbpError  # the user's to fix
            raise kind(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, value: Any) -> None:
    """Atomically write indented JSON."""
    write_atomic(path, (to_json(value, indent=2) + "\n").encode())


def save_state_dict(path: Path, state: dict[str, Any], what: str = "model") -> None:
    """Atomically save a state_dict with torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue(), what)


def refuse_in_use(run_dir: Path) -> None:
    """Refuse a run folder another mbp train holds."""
    if is_running(run_dir):
        raise in_use(run_dir)


def in_use(run_dir: Path) -> UsageError:
    """The error for a run folder another mbp train holds."""
    return UsageError(f"{run_dir} is in use by another mbp train")


class RunFolder:
    """The run folder, made only once the first target batch has succeeded (so a run that
    fails at once leaves nothing behind); metrics.jsonl, a sink, waits for it."""

    def __init__(self, path: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
        self.path, self.recipe = path, recipe
        self.resume, self.overwrite = resume, overwrite
        self.metrics = MetricsFile()
        self.probe: dict[str, Any] | None = None  # probe.json, for `micro: auto`
        self.loggers: list[Any] = []  # train.log's, closed after the summary
        self.is_open = False
        self._lock = contextlib.ExitStack()

    def open(self) -> None:
        """Make the folder (a resumed run has it), write the recipe and start the metrics."""
        if self.is_open:
            return
        held = [] if self.resume else check_run_dir(self.path, self.overwrite)
        make_run_dir(self.path)
        try:  # before anything in it changes: a run racing for it finds it held
            self._lock.enter_context(held_lock(self.path))
        except BlockingIOError:
            raise in_use(self.path) from None
        except OSError as exc:  # a read-only folder, say
            raise UsageError(f"cannot write in run folder {self.path}: "
                             f"{exc.strerror or exc}") from exc
        remove_results(self.path, held)
        text = f"{READ_FROM}{self.recipe.folder}\n" + dump_recipe(self.recipe)
        write_atomic(self.path / "recipe.yaml", text.encode(), what="recipe")
        if self.probe is not None:
            write_json(self.path / "probe.json", self.probe)
        self.metrics.open(self.path / "metrics.jsonl")
        self.is_open = True

    def close(self) -> None:
        """Close metrics.jsonl."""
        self.metrics.close()
        self._lock.close()

    def close_loggers(self) -> None:
        """End the loggers (after the summary, which they log too)."""
        for logger in self.loggers:
            logger.close()
