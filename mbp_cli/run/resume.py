"""Resuming a run: the saved recipe and what may change, the newest good checkpoint, metrics
trimmed to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mbp_cli.distributed.world import World
from mbp_cli.errors import UsageError
from mbp_cli.events import Resume, RunWarning, Sink
from mbp_cli.recipe.load import load_recipe
from mbp_cli.recipe.spec import Recipe
from mbp_cli.run.checkpoint import LoopState, newest_good_checkpoint, restore, unfit_tensors
from mbp_cli.run.folder import write_atomic
from mbp_cli.run.records import is_sound

SAFE_TO_CHANGE_ON_RESUME = (
    "train.steps", "train.epochs", "train.eval_every", "train.log_every", "train.device",
    "train.checkpoint_every", "train.keep_checkpoints", "train.num_workers", "train.on_nonfinite",
    "train.collective_timeout", "train.heartbeat_timeout", "train.log_artifacts", "batch.micro",
    "batch.shares",
    # the held-out split's alone (see sets_training_transforms)
    "data.eval_transforms",
    # exact either way: they change memory and speed, not the result
    "train.compile", "memory.checkpointing", "memory.checkpoint_modules", "memory.offload",
    "memory.offload_blocks",
)


def recipe_differences(old: Recipe | dict[str, Any],
                       new: Recipe | dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key path, old value, new value) for every leaf that differs between two recipes (or
    their plain data)."""

    def leaves(value: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(value, dict) and value:
            return {k: v for key, item in value.items()
                    for k, v in leaves(item, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): value}

    before, after = (leaves(r.to_dict() if isinstance(r, Recipe) else r) for r in (old, new))
    return [(key, before.get(key), after.get(key)) for key in sorted(before | after)
            if before.get(key) != after.get(key)]


def unsafe_changes(old: Recipe | dict[str, Any], new: Recipe | dict[str, Any]) -> list[str]:
    """'key: old → new' for each difference a resume may not make."""
    return [f"{key}: {before!r} → {after!r}" for key, before, after
            in recipe_differences(old, new) if key not in SAFE_TO_CHANGE_ON_RESUME]


def sets_training_transforms(old: Recipe, new: Recipe) -> bool:
    """Whether a change of data.eval_transforms changes training's too: pretrained weights'
    own transforms serve both splits only while neither data.transforms nor
    data.eval_transforms is set, so setting (or unsetting) the held-out split's replaces them."""
    is_preset = "weights" in old.model.args and old.data.transforms is None
    return is_preset and (old.data.eval_transforms is None) != (new.data.eval_transforms is None)


def recipe_to_resume(run_dir: Path, recipe: Path | None, overrides: list[str]) -> Recipe:
    """The run folder's saved recipe with the overrides; refuse changes unsafe for a resume."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise UsageError(f"nothing to resume in {run_dir}: it has no recipe.yaml")
    original = load_recipe(saved)  # its first line names the folder its imports resolve from
    wanted = load_recipe(recipe or saved, overrides)
    unsafe = unsafe_changes(original, wanted)
    if sets_training_transforms(original, wanted):
        unsafe.append(f"data.eval_transforms: {original.data.eval_transforms!r} → "
                      f"{wanted.data.eval_transforms!r} (with model.args.weights and no "
                      "data.transforms, it decides training's transforms too)")
    if unsafe:
        listed = "\n".join(f"  • {line}" for line in unsafe)
        raise UsageError(
            f"cannot resume {run_dir} with a different recipe; these keys differ:\n{listed}\n"
            f"Only {', '.join(SAFE_TO_CHANGE_ON_RESUME)} may change on resume")
    return wanted


def resume_state(run_dir: Path, recipe: Recipe, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, emit: Sink,
                 world: World) -> LoopState | None:
    """Restore the newest good checkpoint (None: start over); keep metrics up to its step
    (rank 0 writes them). A checkpoint the recipe's model does not fit changes nothing."""
    path, state, notes = newest_good_checkpoint(run_dir)
    if state is None and notes:  # starting over would replace what the run has
        raise UsageError(f"no checkpoint of {run_dir} can be read ({len(notes)} corrupt or "
                         "truncated); nothing was changed. Move them out of "
                         f"{run_dir / 'checkpoints'} to train it again from step 0, or start "
                         "afresh with --overwrite")
    kept = [name for name in ("model.pt", "summary.json") if (run_dir / name).exists()]
    if state is None and kept:  # starting over would replace them
        raise UsageError(f"no checkpoint of {run_dir} to resume from, and it holds an earlier "
                         f"run's {' and '.join(kept)}; nothing was changed. Start afresh with "
                         "--overwrite")
    for note in notes:
        emit(RunWarning(note))
    loop = None
    if state is not None:
        refuse_unfit(path, state, recipe, model)
        refuse_edited(path, state, recipe)
        loop = restore(state, model, optimizer, scheduler, world.rank, world.size)
        # The learning rate for the next step is this recipe's schedule's (train.steps may
        # have changed), not the one the checkpoint's optimizer last had.
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs,
                                          scheduler.lr_lambdas, strict=True):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        loop.wall_seconds = max(loop.wall_seconds, finished_wall_seconds(run_dir, loop.step))
    step = loop.step if loop is not None else 0
    if world.is_main:
        trim_metrics(run_dir / "metrics.jsonl", step)
    emit(Resume(step=step, checkpoint=str(path) if path else None))
    return loop


def refuse_apart(starts: list[int | None], run_dir: Path) -> None:
    """Refuse ranks that would resume from different points (each reads the run folder: on
    machines without a shared filesystem, each finds its own)."""
    if len(set(starts)) <= 1:
        return
    found = ", ".join(f"rank {rank} at step {step}" if step is not None else
                      f"rank {rank} finds no checkpoint" for rank, step in enumerate(starts))
    raise UsageError(f"the ranks would not resume from the same point in {run_dir}: {found}. "
                     "Every rank reads the run folder: give all ranks the same one (a shared "
                     "filesystem, or a copy of rank 0's on every machine); nothing was trained")


def refuse_edited(path: Path, state: dict[str, Any], recipe: Recipe) -> None:
    """Refuse a resume whose recipe differs from the one the checkpoint was made with in keys
    that may not change (recipe.yaml edited in the run folder: --set is checked on its own)."""
    saved = state.get("recipe")
    unsafe = unsafe_changes(saved, recipe) if saved else []
    if unsafe:
        raise UsageError(f"checkpoint {path} was made with another recipe than the run "
                         f"folder's recipe.yaml now holds: {'; '.join(unsafe)}. Nothing was "
                         "changed: put recipe.yaml back as it was, or start afresh with "
                         "--overwrite")


def refuse_unfit(path: Path, state: dict[str, Any], recipe: Recipe,
                 model: torch.nn.Module) -> None:
    """Refuse, in one line, a checkpoint whose tensors the model does not fit (its recipe
    edited since), naming the tensors and the recipe keys that changed."""
    unfit = unfit_tensors(state["model"], model)
    if not unfit:
        return
    shown = ", ".join(unfit[:4]) + (f" and {len(unfit) - 4} more" if len(unfit) > 4 else "")
    saved = state.get("recipe")
    changed = [f"{key}: {old!r} → {new!r}"
               for key, old, new in recipe_differences(saved, recipe)] if saved else []
    why = f"; the recipe changed since it was written: {'; '.join(changed)}" if changed else ""
    raise UsageError(f"checkpoint {path} does not fit the model the recipe builds now: "
                     f"{shown}{why}. Nothing was changed: put the recipe back as it was, or "
                     "start afresh with --overwrite")


def finished_wall_seconds(run_dir: Path, step: int) -> float:
    """The wall time of a part that ended at `step` with its summary: a part's last checkpoint
    is written before its final evaluation, which the summary's time includes (0: none)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return 0.0
    is_this_step = is_sound(summary) and summary.get("steps") == step
    return float(summary.get("wall_seconds") or 0.0) if is_this_step else 0.0


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step`: later ones will be logged again, and a line cut short
    by a kill is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if is_sound(record) and (record.get("step") or 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode())
