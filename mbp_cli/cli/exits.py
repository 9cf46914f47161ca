"""Known errors as one line on stderr and their exit code; unknown ones re-raised as bugs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any

import typer

from mbp_cli.distributed.world import World, world_from_env  # torch-free
from mbp_cli.errors import EXIT_RUNTIME, MbpError


class Terminated(BaseException):
    """SIGTERM, as KeyboardInterrupt is SIGINT: raised where no run is there to stop gently
    (during the start), or at a second signal."""


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn known errors into one message on stderr and their exit code (with --json, also a
    last JSON line on stdout); re-raise the rest. SIGINT and SIGTERM end with one word."""
    world = world_from_env()
    rank = world.rank
    try:
        with _signals_at_the_start(world):
            yield
    except MbpError as exc:
        debugging = os.environ.get("MBP_DEBUG") == "1"
        if debugging:  # the traceback, then as always: a script that debugs sees the same
            traceback.print_exc()  # exit codes
        is_lost = world.is_launched and _is_lost_rank(exc)
        if rank and (exc.agreed or is_lost) or is_lost and world.is_mbp_launched:
            _leave(exc)  # rank 0 reports what all agreed on; the launcher, a rank lost
        if as_json:
            typer.echo(json.dumps({"event": "error", "exit_code": exc.exit_code,
                                   "message": str(exc)}))
        details = getattr(exc, "details", "")
        if details:
            typer.echo(details.rstrip(), err=True)  # the user's own code: its traceback
        failed_rank = getattr(exc, "rank", rank)
        who = f"rank {failed_rank}: " if failed_rank else ""
        typer.echo(f"{who}{exc.label}: {exc}", err=True)
        if exc.exit_code == EXIT_RUNTIME and not details and exc.hints_traceback \
                and not debugging:
            typer.echo("(set MBP_DEBUG=1 to see the traceback)", err=True)  # maybe ours
        _leave(exc)
    except (KeyboardInterrupt, Terminated) as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        if not rank:  # one word for every rank
            typer.echo("interrupted" if code == 130 else "stopped by SIGTERM", err=True)
        _leave(MbpError("", code))


@contextlib.contextmanager
def _signals_at_the_start(world: World) -> Iterator[None]:
    """Before a run's loop catches them itself (to stop after the target batch in progress):
    one process's SIGTERM raises Terminated, to be said; a rank's SIGINT and SIGTERM end it at
    once, as a handler would wait out a blocking call (the process group's rendezvous) for a
    peer that is gone — its launcher says what stopped the run."""
    def terminate(number: int, frame: FrameType | None) -> None:
        raise Terminated

    with _handled_by({signal.SIGINT: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL}
                     if world.is_launched else {signal.SIGTERM: terminate}):
        yield


@contextlib.contextmanager
def stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM change nothing in the body: what they would stop is done."""
    with _handled_by({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN}):
        yield


@contextlib.contextmanager
def _handled_by(handlers: dict[signal.Signals, Any]) -> Iterator[None]:
    """These signal handlers for the body, the earlier ones put back after it (signal handlers
    belong to the main thread: elsewhere, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _is_lost_rank(exc: MbpError) -> bool:
    from mbp_cli.distributed.failures import LostRankError  # a rank: torch is loaded

    return isinstance(exc, LostRankError)


def _leave(exc: MbpError) -> None:
    """Exit with the error's code; a rank leaves at once (see `exit_rank`)."""
    if getattr(exc, "exit_at_once", False) or world_from_env().is_distributed:
        exit_rank(exc.exit_code)
    raise typer.Exit(exc.exit_code) from None


def exit_rank(code: int) -> None:
    """End a rank's process without the interpreter's cleanup: gloo's threads can still hold
    tensors then, and tearing them down aborts the process (SIGABRT) after a good run; a
    broken process group would wait on the other ranks. Everything is written and closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
