"""Each rank's heartbeat through the rendezvous store, so that a rank that stops answering
(stopped by a signal, hung in native code) is told from a slow one and the run ends within
`train.heartbeat_timeout` seconds rather than `train.collective_timeout`.

A thread of each rank beats every few seconds and reads the others' beats. A thread runs
whatever the main thread does — a long evaluation, a checkpoint, a wait in a collective — so
only a process that no longer runs at all falls silent. The lowest rank still beating says
which rank fell silent; every rank on that rank's machine ends it (SIGKILL: a stopped process
would keep its launcher waiting for it), and the teller leaves, so the others lose contact.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

import torch.distributed as dist

from mbp_cli.distributed.world import LAUNCH_NOTES, World
from mbp_cli.errors import EXIT_RUNTIME

_STORE_SECONDS = 30  # how long one store operation may wait


@contextlib.contextmanager
def heartbeat(world: World, timeout_seconds: float) -> Iterator[None]:
    """Beat, and watch the other ranks' beats, while the body runs (after the process group
    is joined: its store is the one the launcher set up)."""
    env = os.environ
    if not world.is_distributed or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        yield
        return
    store = dist.PrefixStore(
        f"mbp-heartbeat/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/",
        dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                      timeout=datetime.timedelta(seconds=_STORE_SECONDS),
                      wait_for_workers=False))
    stop = threading.Event()
    watcher = threading.Thread(target=_beat, args=(store, world, timeout_seconds, stop),
                               name="mbp-heartbeat", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()


def _beat(store: dist.Store, world: World, timeout: float, stop: threading.Event) -> None:
    """Beat every `timeout`/10 seconds (0.2 to 5) until `stop`; end the run where another rank
    has been silent for `timeout` seconds."""
    interval = min(max(timeout / 10, 0.2), 5.0)
    peers = [rank for rank in range(world.size) if rank != world.rank]
    try:
        store.set(f"who/{world.rank}", f"{socket.gethostname()} {os.getpid()}")
        last = time.monotonic()
        heard = {rank: (-1, last) for rank in peers}  # last beat seen, and when
        while not stop.wait(interval):
            store.add(f"beat/{world.rank}", 1)
            now = time.monotonic()
            if now - last > timeout / 2:  # this process was the one not running (suspended)
                heard = {rank: (beat, now) for rank, (beat, _) in heard.items()}
            last = now
            for rank in peers:
                beat = store.add(f"beat/{rank}", 0)
                if beat != heard[rank][0]:
                    heard[rank] = (beat, now)
            silent = [rank for rank in peers if now - heard[rank][1] > timeout]
            if silent and not stop.is_set():
                _end_run(store, world, silent, timeout)
                return
    except (RuntimeError, dist.DistError):  # the store is gone: the run is ending anyway
        return


def _end_run(store: dist.Store, world: World, silent: list[int], timeout: float) -> None:
    """Tell (the lowest rank still beating) which rank fell silent, end those on this
    machine, and leave (the teller); the others then lose contact with the teller."""
    host = socket.gethostname()
    places = {rank: store.get(f"who/{rank}").decode().rsplit(" ", 1) for rank in silent}
    states = {rank: _state(int(pid)) if where == host else None
              for rank, (where, pid) in places.items()}
    if all(state == "gone" for state in states.values()):
        return  # they died: the launcher tells, and the process group breaks
    teller = world.rank == min(set(range(world.size)) - set(silent)) \
        and store.add("told", 1) == 1
    if teller:
        rank = silent[0]
        how = {"stopped": "its process is stopped, as by SIGSTOP or Ctrl-Z",
               "running": "its process runs but does not answer: hung"}.get(
                   states[rank], f"on {places[rank][0]}")
        _tell(rank, f"rank {rank} stopped answering: no heartbeat for {timeout:g} s ({how})")
    for rank, state in states.items():
        if state in ("stopped", "running"):
            with contextlib.suppress(OSError):
                os.kill(int(places[rank][1]), signal.SIGKILL)
    if teller:
        sys.stderr.flush()
        os._exit(EXIT_RUNTIME)


def _tell(rank: int, story: str) -> None:
    """To `mbp train --nproc`'s launcher, which says it with the way to continue; under
    another launcher (torchrun), on stderr."""
    notes = os.environ.get(LAUNCH_NOTES)
    if notes:
        with open(notes, "a") as file:
            file.write(json.dumps({"rank": rank, "story": story}) + "\n")
    else:
        print(f"error: {story}; the run stops (checkpoints already written are intact)",
              file=sys.stderr)


def _state(pid: int) -> str:
    """A process of this machine: "stopped", "running" or "gone" (a zombie is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            code = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "gone"
        return "running"  # no /proc: not Linux
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(code, "running")
