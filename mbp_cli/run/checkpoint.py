"""Checkpoints at target-batch boundaries: written atomically, pruned, found again after a crash."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mbp_cli.errors import MbpError
from mbp_cli.rng import restore_rng_states, rng_states
from mbp_cli.run.folder import save_state_dict
from mbp_cli.tensor_files import load_tensors

FORMAT = "mbp-checkpoint-1"
FOLDER = "checkpoints"


@dataclass
class LoopState:
    """What the training loop carries from step to step, besides model and optimizer."""

    micro_batch: int
    step: int = 0  # optimizer steps done; the next target batch is a function of it
    samples_seen: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # the run's wall time up to this state, every part together
    last_loss: float = float("nan")
    oom_retries: int = 0
    skipped_steps: int = 0
    overflow_skips: int = 0  # fp16 target batches skipped for overflowing gradients
    loss_scale: dict[str, Any] = field(default_factory=dict)  # fp16's GradScaler state
    world_size: int = 1  # processes training together
    shares: list[int] = field(default_factory=list)  # each rank's samples of a target batch
    speed_window: list[list[float]] = field(default_factory=list)  # per rank: samples, seconds
    batch_setting: dict[str, Any] = field(default_factory=dict)  # batch.micro and batch.shares
    eval_result: dict[str, float | None] = field(default_factory=dict)
    stream_position: dict[str, Any] = field(default_factory=dict)  # a stream's (data/streaming.py)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """run_dir/checkpoints/step-000120.pt"""
    return run_dir / FOLDER / f"step-{step:06d}.pt"


def rank_state(micro_batch: int) -> dict[str, Any]:
    """What differs between ranks and a checkpoint keeps for each: its micro-batch and RNGs."""
    return {"micro_batch": micro_batch, "rng": rng_states()}


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loop: LoopState, keep: int,
                    ranks: list[dict[str, Any]], recipe: dict[str, Any]) -> Path:
    """Write the state after `loop.step` steps atomically (with every rank's `rank_state`, in
    rank order, and the recipe that made it, as plain data); keep only the newest `keep`."""
    path = checkpoint_path(run_dir, loop.step)
    path.parent.mkdir(exist_ok=True)
    state = {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "loop": asdict(loop), "rng": ranks[0]["rng"],
             "ranks": ranks, "recipe": recipe}
    try:
        save_state_dict(path, state, what="checkpoint")
    except MbpError as exc:
        earlier = sorted(p for p in path.parent.glob("step-*.pt") if p.name < path.name)
        kept = f"the previous checkpoint, {earlier[-1].name}, is intact" if earlier else \
            "no earlier checkpoint was written"
        raise MbpError(f"{exc}; {kept}") from exc
    prune(path, keep)
    return path


def prune(newest: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `newest`, the one just written. Later ones are
    those a resume went back past, unreadable: they count for nothing and are set aside (as
    step-….pt.unreadable), so that no good checkpoint is deleted to keep them."""
    steps = sorted(newest.parent.glob("step-*.pt"))
    for unreadable in (p for p in steps if p.name > newest.name):
        unreadable.replace(unreadable.with_name(unreadable.name + ".unreadable"))
    for old in [p for p in steps if p.name <= newest.name][:-keep]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint, or raise ValueError saying why it is not usable."""
    state = load_tensors(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError("not an mbp checkpoint")
    return state


def newest_good_checkpoint(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None,
                                                    list[str]]:
    """The newest checkpoint that loads, its state, and a note for each newer one that did not."""
    notes = []
    folder = run_dir / FOLDER
    for stale in folder.glob(".*.tmp"):  # a write cut short by a crash
        stale.unlink(missing_ok=True)
    for path in sorted(folder.glob("step-*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path), notes
        except ValueError as exc:
            notes.append(f"checkpoint {path} is corrupt or truncated ({exc}); trying the one "
                         "before it (the next checkpoint sets it aside as .unreadable)")
    return None, None, notes


def unfit_tensors(saved: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """The model's tensors a checkpoint's do not fit, in words (none: it loads)."""
    current = model.state_dict()
    words = []
    for name in sorted(saved.keys() | current.keys()):
        if name not in current:
            words.append(f"{name} (only in the checkpoint)")
        elif name not in saved:
            words.append(f"{name} (not in the checkpoint)")
        elif tuple(saved[name].shape) != tuple(current[name].shape):
            words.append(f"{name} ({'×'.join(map(str, saved[name].shape)) or 'scalar'} "
                         f"saved, {'×'.join(map(str, current[name].shape)) or 'scalar'} now)")
    return words


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, rank: int = 0, world_size: int = 1) -> LoopState:
    """Load a checkpoint's state into the run and return the loop state to continue from: with
    as many ranks as saved it, each rank takes back its own micro-batch and RNGs, else rank 0's
    (the caller recomputes the shares)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loop = LoopState(**state["loop"])
    saved = state.get("ranks") or [{"micro_batch": loop.micro_batch, "rng": state["rng"]}]
    own = saved[rank] if len(saved) == world_size else saved[0]
    restore_rng_states(own["rng"])
    loop.micro_batch = own["micro_batch"]
    return loop
