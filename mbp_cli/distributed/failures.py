"""The errors a run on several ranks stops with: one rank's failure, shared, and a rank lost."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from mbp_cli.errors import MbpError


class RankFailure(MbpError):
    """A rank failed (its own code, its data, an error of its own): every rank stops with
    that rank's message and exit code, which rank 0 prints."""

    agreed = True

    def __init__(self, rank: int, message: str, exit_code: int, label: str,
                 details: str) -> None:
        super().__init__(message, exit_code)
        self.rank, self.label, self.details = rank, label, details


def failure_info(exc: BaseException) -> dict[str, Any]:
    """What the other ranks need to report a rank's failure (it crosses processes)."""
    if isinstance(exc, MbpError):
        return {"message": str(exc), "exit_code": exc.exit_code, "label": exc.label,
                "details": getattr(exc, "details", "")}
    return {"message": f"{type(exc).__name__}: {exc}", "exit_code": 1, "label": "error",
            "details": "".join(traceback.format_exception(exc))}


class LostRankError(MbpError):
    """Another rank stopped answering: it died, or it waited past train.collective_timeout."""

    exit_at_once = True  # the process group is broken: nothing left to clean up
    hints_traceback = False  # what happened is another process's


class RankDiedError(MbpError):
    """A rank was killed (by a signal): the launcher names it; the others stopped."""

    hints_traceback = False


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a collective; where another rank is gone, raise LostRankError saying what
    was being done."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        reason = str(exc).split(". ")[0].split("] ")[-1]
        raise LostRankError(f"lost contact with another rank while {what} ({reason}); "
                            "the run stops (checkpoints already written are intact)") from exc
