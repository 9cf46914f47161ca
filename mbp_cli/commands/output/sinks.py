"""The sinks that fit where output lands, each silent once the reader of its output has gone."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console

from mbp_cli import events as ev
from mbp_cli.commands.output.plain import PlainReporter, Reporter
from mbp_cli.commands.output.progress import RichReporter


def terminal_sinks(*, as_json: bool, quiet: bool, log_every: int) -> list[ev.Sink]:
    """What fits where output lands: --json (JSON lines on stdout, plain lines on stderr),
    --quiet, a terminal (rich), or a pipe (plain lines)."""
    if as_json:
        sinks = [ev.JsonLines(), Reporter() if quiet else PlainReporter(log_every,
                                                                       show_summary=False)]
    elif quiet:
        sinks = [Reporter()]
    elif Console(stderr=True).is_terminal:
        sinks = [RichReporter(log_every)]
    else:
        sinks = [PlainReporter(log_every)]
    return [WhileRead(sink) for sink in sinks]


class WhileRead:
    """A sink that falls silent once the reader of its output has gone (`mbp train … | head`):
    the run goes on to its end and writes its files, as it would with --quiet."""

    def __init__(self, sink: ev.Sink) -> None:
        self.sink, self.is_unread = sink, False

    def __call__(self, event: ev.Event) -> None:
        self._unless_unread(lambda: self.sink(event))

    def close(self) -> None:
        """Close the sink (a live display stops)."""
        self._unless_unread(getattr(self.sink, "close", lambda: None))

    def _unless_unread(self, write: Any) -> None:
        if self.is_unread:
            return
        try:
            write()
        except BrokenPipeError:
            self.is_unread = True
            _silence_closed_streams()


def _silence_closed_streams() -> None:
    """Point stdout or stderr, where its reader has gone, at /dev/null: what is still in its
    buffer would fail again (at exit, as an error)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
