"""`mbp train --nproc N`: N local ranks started by torch's elastic launcher (what torchrun
runs), each running `python -m mbp_cli train …` (the arguments the user typed, less --nproc)
with RANK, WORLD_SIZE and LOCAL_RANK set."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from mbp_cli.distributed.failures import RankDiedError
from mbp_cli.distributed.world import LAUNCH_NOTES, MBP_LAUNCHED
from mbp_cli.errors import EXIT_RUNTIME, UsageError

SHUTDOWN_SECONDS = 600  # after Ctrl-C, how long ranks may take to finish their target batch


def launch(nproc: int, args: list[str], run_dir: Path) -> int:
    """Run `mbp ARGS` as `nproc` ranks on this machine and return the exit code: 0, a rank's
    own code (rank 0's first), or 128 + the signal that stopped the launcher."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the agent's notes are not the user's
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # Ranks sharing the CPU's cores: one thread pool each of its part, unless the user says.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[MBP_LAUNCHED] = "1"  # the ranks leave a lost rank's story to this launcher
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mbp-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        monitor_interval=0.1, logs_specs=DefaultLogsSpecs(redirects=Std.NONE, tee=Std.NONE),
        shutdown_timeout=SHUTDOWN_SECONDS)
    with tempfile.NamedTemporaryFile("r", prefix="mbp-notes-") as notes:
        os.environ[LAUNCH_NOTES] = notes.name
        try:
            elastic_launch(config, sys.executable)("-m", "mbp_cli", *args)
        except ChildFailedError as exc:
            return failure_code(exc.failures, run_dir, nproc, notes.read())
        except SignalException as exc:
            return 128 + int(exc.sigval)
    return 0


def rank_arguments(typed: Sequence[str], shared: Sequence[str]) -> list[str]:
    """The `mbp train` arguments each rank runs: the launcher's own, as the user typed them,
    less --nproc (`--nproc 2` or `--nproc=2`: a rank is one process), then `shared`, what the
    launcher resolved once for every rank (a default run folder's name, say)."""
    kept, tokens = [], iter(typed)
    for token in tokens:
        if token == "--nproc":
            next(tokens, None)  # its value
        elif not token.startswith("--nproc="):
            kept.append(token)
    return ["train", *kept, *shared]


def check_gpus(device: torch.device, nproc: int) -> None:
    """Each rank on CUDA takes a GPU of its own: refuse more ranks than GPUs (a set index,
    cuda:1, would put every rank on one GPU: refused too)."""
    if device.type != "cuda":
        return
    if device.index is not None:
        raise UsageError(f"--nproc {nproc} gives each rank a GPU of its own; train.device "
                         f"{device} names one. Use train.device: cuda (or auto), and "
                         "CUDA_VISIBLE_DEVICES to choose the GPUs")
    count = torch.cuda.device_count()
    if nproc > count:
        raise UsageError(f"--nproc {nproc} needs a GPU per rank; this machine has {count}. "
                         f"Use --nproc {count}, or train.device: cpu")


def failure_code(failures: dict, run_dir: Path, nproc: int, notes: str = "") -> int:
    """The exit code for failed ranks. A rank that stopped answering (the ranks' `notes` say
    which) or was killed by a signal is named (the others then lost it, and the launcher
    stopped them); otherwise the ranks explained themselves, and the code that says why (2, 3,
    4, 130, 143) wins over a lost contact's 1."""
    for line in notes.splitlines()[:1]:
        raise RankDiedError(f"{json.loads(line)['story']}; the other ranks stopped. "
                            f"{_continue_hint(run_dir, nproc)}")
    stopping = (signal.SIGTERM, signal.SIGINT)  # how the launcher stops the ranks left
    ordered = sorted(failures.items())
    codes = [f.exitcode for _, f in ordered]
    died = [(rank, f) for rank, f in ordered if f.exitcode < 0 and -f.exitcode not in stopping]
    if not died and not any(code > 0 for code in codes):  # only stopped by the launcher
        died = ordered[:1]
    for rank, failure in died[:1]:
        name = signal.Signals(-failure.exitcode).name
        raise RankDiedError(f"rank {rank} died ({name}); the other ranks stopped. "
                            f"{_continue_hint(run_dir, nproc)}")
    return next((code for code in codes if code > EXIT_RUNTIME), EXIT_RUNTIME)


def _continue_hint(run_dir: Path, nproc: int) -> str:
    """How to continue a run that lost a rank: from its last checkpoint, if one was written."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    if not checkpoints:
        return "No checkpoint was written (train.checkpoint_every) to continue from"
    return f"Continue from its last checkpoint, {checkpoints[-1].name}, with: mbp train " \
        f"--resume {run_dir} --nproc {nproc}"
