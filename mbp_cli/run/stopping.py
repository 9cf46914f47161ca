"""SIGINT and SIGTERM: the first asks for a stop after the target batch in progress; a second
stops at once (the last good checkpoint is intact, its writes being atomic)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from mbp_cli.distributed.world import world_from_env

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


class StopRequest:
    """Set by the first stop signal; the loop reads it between target batches."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @property
    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM."""
        return EXIT_CODES[self.signal]


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Catch the first SIGINT or SIGTERM as a StopRequest; the second acts as usual."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers belong to the main thread; nothing to install
        return
    previous = {sig: signal.getsignal(sig) for sig in EXIT_CODES}

    def on_signal(number: int, frame: FrameType | None) -> None:
        request.signal = signal.Signals(number)
        for sig, handler in previous.items():  # a second signal stops at once
            signal.signal(sig, handler)

    for sig in EXIT_CODES:
        signal.signal(sig, on_signal)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_command(run_dir: Path, world_size: int) -> str:
    """The command that continues a run (under torchrun, torchrun's own)."""
    world = world_from_env()
    if world.is_launched and not world.is_mbp_launched:
        return f"the same torchrun command with `train --resume {run_dir}` for the recipe"
    return f"mbp train --resume {run_dir}" + (f" --nproc {world_size}" if world_size > 1 else "")
