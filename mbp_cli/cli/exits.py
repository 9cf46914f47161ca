"""Known errors as one line on stderr and their exit code; unknown ones re-raised as bugs."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

import typer

from mbp_cli.distributed.world import world_from_env  # torch-free
from mbp_cli.errors import EXIT_RUNTIME, MbpError


@contextlib.contextmanager
def user_errors(as_json: bool = False) -> Iterator[None]:
    """Turn known errors into one message on stderr and their exit code (with --json, also a
    last JSON line on stdout); re-raise the rest."""
    rank = world_from_env().rank
    try:
        yield
    except MbpError as exc:
        if os.environ.get("MBP_DEBUG") == "1":
            raise
        if rank:
            from mbp_cli.distributed.failures import LostRankError  # a rank: torch is loaded

            if exc.agreed or isinstance(exc, LostRankError):
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
        if exc.exit_code == EXIT_RUNTIME and not details:  # the input was fine: maybe ours
            typer.echo("(set MBP_DEBUG=1 to see the traceback)", err=True)
        _leave(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


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
