"""A partition trained: each part started and trained as any run, then composed and evaluated.

The parts run one after another on one device, or side by side, one rank each
(`--nproc` = the number of parts); nothing crosses between them while they train (every rank
draws the codes alike from the seed), and the finished weights go to rank 0 at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mbp_cli.data.batching import steps_per_epoch
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.errors import UsageError
from mbp_cli.events import Done, Eval, Part, RunWarning, Sink, Sinks
from mbp_cli.memory.tracker import StorageTracker
from mbp_cli.partition.build import Partition, build_partition, check_part_ranks
from mbp_cli.recipe.spec import Recipe
from mbp_cli.run.evaluate import evaluate
from mbp_cli.run.folder import RunFolder, refuse_in_use, save_state_dict, write_json
from mbp_cli.run.loop import train_loop
from mbp_cli.run.records import CODES_FILE, PARTS_FOLDER
from mbp_cli.run.start import RunOptions, start_run
from mbp_cli.run.stopping import resume_command

WAIT_SECONDS = 7 * 24 * 3600  # side by side, a rank that is done waits this long for the rest


def train_partitioned(recipe: Recipe, options: RunOptions, sinks: list[Sink], ranks: Ranks,
                      device: torch.device) -> dict[str, Any]:
    """Train every part (this rank's, side by side), each started and trained as any run,
    compose them and evaluate the whole."""
    started = time.perf_counter()
    world = ranks.world
    run_dir = ranks.broadcast(options.run_dir)
    with ranks.agreed():
        check_part_ranks(recipe, world.size)
        partition = build_partition(recipe, device) if world.is_main else None
    with ranks.agreed():
        partition = partition or build_partition(recipe, device)
        if world.is_main:
            refuse_in_use(run_dir)
        mine = [world.rank] if world.is_distributed else range(len(partition.parts))
        total = part_steps(recipe, partition)
        if options.resume and all(_finished_summary(part_folder(run_dir, i), total)
                                  for i in mine):  # as any run: nothing to do, nothing touched
            raise UsageError(f"{run_dir} has already trained all {total} steps of each part: "
                             "nothing to resume (to train longer: --resume with "
                             "--set train.steps=N)")
        folder = RunFolder(run_dir, recipe, options.resume, options.overwrite)
        if world.is_main:
            folder.open()
            save_state_dict(run_dir / CODES_FILE, {f"cut_{i + 1}": code for i, code
                                                   in enumerate(partition.codes)}, "codes")
    emit = Sinks([folder.metrics, *sinks] if world.is_main else [])
    for warning in partition.warnings:
        emit(RunWarning(warning))
    try:
        with ranks.agreed():  # side by side: a part that fails stops every rank
            try:
                summaries = train_parts(recipe, options, partition, mine, run_dir, sinks, emit,
                                        sequential=not world.is_distributed)
            except BaseException:  # Ctrl-C before any part began included
                if world.is_main and not options.resume:
                    folder.close()
                    _leave_nothing_if_no_part_began(run_dir)
                raise
        summaries = [s for group in ranks.gather_objects(summaries) for s in group]
        states = ranks.gather_objects([part_state(partition.parts[i]) for i in mine])
        if world.is_distributed and world.is_main:  # every part's weights into the model
            for part, group in zip(partition.parts, states, strict=True):
                part.load_state_dict(group[0])
        summary = compose_summary(partition, summaries, run_dir,
                                  time.perf_counter() - started, world)
        if world.is_main:
            finish(recipe, partition, summary, run_dir, emit)
    finally:
        folder.close()
    emit(Done(summary))
    return summary


def train_parts(recipe: Recipe, options: RunOptions, partition: Partition,
                indices: Iterable[int], run_dir: Path, sinks: list[Sink], emit: Sink, *,
                sequential: bool) -> list[dict[str, Any]]:
    """Train these parts in turn; stop where --max-steps (counted over every part) runs out."""
    budget, summaries = options.max_steps, []
    for index in indices:
        if budget == 0:
            break  # the next part waits for a resume
        summary, steps_now = run_part(recipe, options, partition, index, run_dir, sinks, emit,
                                      budget, sequential=sequential)
        summaries.append(summary)
        budget = None if budget is None else budget - steps_now
        if summary["steps"] < summary["total_steps"]:
            break
    return summaries


def finish(recipe: Recipe, partition: Partition, summary: dict[str, Any], run_dir: Path,
           emit: Sink) -> None:
    """Once every part is trained: evaluate the composed model and save it; write the
    summary either way."""
    if summary["steps"] == summary["total_steps"]:
        whole = partition.whole
        whole.model.to(whole.device)
        micro_batch = min(p["micro_batch"] for p in summary["partition"]["parts"])
        result = evaluate(whole, micro_batch, recipe.train.num_workers)
        summary.update(result)
        emit(Eval(step=summary["steps"], eval_loss=result.get("eval_loss"),
                  eval_accuracy=result.get("eval_accuracy"), part=0))
        save_state_dict(run_dir / "model.pt", whole.model.state_dict())
    write_json(run_dir / "summary.json", summary)


def _leave_nothing_if_no_part_began(run_dir: Path) -> None:
    """A run that fails before any part has trained a target batch leaves nothing behind, as
    any run does: the files this run wrote go, and the folder if that empties it."""
    if (run_dir / PARTS_FOLDER).exists():
        return
    for name in ("recipe.yaml", "metrics.jsonl", CODES_FILE):
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other files of the user's: it stays
        run_dir.rmdir()


def part_state(part: nn.Module) -> dict[str, Tensor]:
    """A part's weights on the host, to cross to rank 0."""
    return {k: v.detach().cpu() for k, v in part.state_dict().items()}


def run_part(recipe: Recipe, options: RunOptions, partition: Partition, index: int, run_dir: Path,
             sinks: list[Sink], emit: Sink, max_steps: int | None, *,
             sequential: bool) -> tuple[dict[str, Any], int]:
    """Train one part into run_dir/parts/part-N (continuing it on a resume; a part already
    done is loaded, not trained again); return its summary and the steps it trained now."""
    part, setup = partition.parts[index], partition.setups[index]
    part_dir = part_folder(run_dir, index)
    done = _finished_summary(part_dir, part_steps(recipe, partition)) if options.resume \
        else None
    begins, ends = partition.describe(index)
    emit(Part(parts=len(partition.parts), begins=begins, ends=ends,
              parameters=sum(p.numel() for p in part.parameters()), run_dir=str(part_dir),
              already_done=done is not None, part=index + 1))
    if done is not None:
        try:
            part.load_state_dict(torch.load(part_dir / "model.pt", map_location=setup.device,
                                            weights_only=True))
        except (RuntimeError, OSError, pickle.UnpicklingError) as exc:
            raise UsageError(f"{part_dir}/model.pt does not hold this part's weights "
                             f"({' '.join(str(exc).split())[:200]})") from exc
        return done, 0
    partition.place(index)
    tracker = options.simulated_memory
    part_options = dataclasses.replace(
        options, run_dir=part_dir, max_steps=max_steps,
        resume_command=resume_command(run_dir, 1 if sequential else len(partition.parts)),
        resume=options.resume and part_dir.exists(),
        simulated_memory=StorageTracker(tracker.capacity_bytes) if tracker else None)
    run = start_run(recipe, part_options, [_in_part(s, index + 1) for s in sinks],
                    Ranks(World(), setup.device), setup.device, setup=setup)
    summary = train_loop(run)
    return summary, summary["steps"] - summary.get("resumed_at_step", 0)


def part_folder(run_dir: Path, index: int) -> Path:
    """Where part `index` (from 0) trains: RUN/parts/part-N."""
    return run_dir / PARTS_FOLDER / f"part-{index + 1}"


def part_steps(recipe: Recipe, partition: Partition) -> int:
    """How many optimizer steps each part takes: train.steps, or its epochs'."""
    per_epoch = steps_per_epoch(len(partition.whole.train_set), recipe.batch.target,
                                recipe.batch.drop_last)
    return recipe.train.steps or recipe.train.epochs * per_epoch


def _finished_summary(part_dir: Path, total_steps: int) -> dict[str, Any] | None:
    """The summary of a part that has trained `total_steps` (None otherwise: it goes on)."""
    path = part_dir / "summary.json"
    if not (path.is_file() and (part_dir / "model.pt").is_file()):
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return summary if summary["steps"] >= total_steps else None


def _in_part(sink: Sink, part: int) -> Sink:
    """A part's events for the terminal, each naming its part; not its summary (the run's
    comes at the end)."""
    return lambda event: None if isinstance(event, Done) else \
        sink(dataclasses.replace(event, part=part))


def compose_summary(partition: Partition, parts: list[dict[str, Any]],
                    run_dir: Path, wall_seconds: float, world: World) -> dict[str, Any]:
    """summary.json of the whole run: the parts' figures added up, each part's kept."""
    first = parts[0]
    samples = sum(p["samples_seen"] for p in parts)
    trained = sum(p["samples_seen"] / p["samples_per_second"] for p in parts
                  if p["samples_per_second"])
    rows = []
    for index, part in enumerate(parts):
        begins, ends = partition.describe(index)
        rows.append({"part": index + 1, "begins": begins, "ends": ends,
                     "parameters": sum(p.numel() for p in partition.parts[index].parameters()),
                     **{k: part.get(k) for k in (
                         "steps", "total_steps", "final_train_loss", "eval_loss",
                         "eval_accuracy", "micro_batch", "accumulation_steps",
                         "peak_memory_bytes", "wall_seconds", "run_dir")}})
    part_walls = [p["wall_seconds"] for p in parts]
    return {
        **{k: first[k] for k in ("name", "target_batch", "micro_batch", "accumulation_steps",
                                 "dtype", "precision", "strategies", "device", "versions",
                                 "peak_memory_source")},
        "steps": sum(p["steps"] for p in parts),
        "total_steps": sum(p["total_steps"] for p in parts) + first["total_steps"] * (
            len(partition.parts) - len(parts)),
        "samples_seen": samples, "final_train_loss": None,  # each part's is its own
        "eval_loss": None, "eval_accuracy": None,
        "samples_per_second": samples / trained if trained else None,
        "peak_memory_bytes": max(p["peak_memory_bytes"] for p in parts),
        "wall_seconds": max(wall_seconds, max(part_walls) if world.is_distributed
                            else sum(part_walls)),
        "run_dir": str(run_dir), "oom_retries": sum(p["oom_retries"] for p in parts),
        "world_size": world.size,
        "partition": {"at": [c.name for c in partition.cuts],
                      "side_by_side": world.is_distributed, "parts": rows},
    }
