"""A partitioned run: the model cut into parts, each trained alone (MBP inside it, through the
same loop as any run) towards its synthetic labels, then composed and evaluated whole.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.catalog.losses import LOSSES
from mbp_cli.data.batching import steps_per_epoch
from mbp_cli.data.samples import batch_of
from mbp_cli.data.streaming import check_stream_recipe
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import MicroStep, explained_step_errors
from mbp_cli.engine.setup import Setup, build, build_optimizer, check_target_batch
from mbp_cli.errors import UsageError, describe
from mbp_cli.events import Done, Eval, Part, RunWarning, Sink, Sinks
from mbp_cli.memory.search import ProbeOptions, probe_setup
from mbp_cli.memory.tracker import StorageTracker
from mbp_cli.partition.codes import (
    class_labels,
    first_part_data,
    later_part_data,
    make_codes,
)
from mbp_cli.partition.cuts import Cut, find_cuts, split, trace
from mbp_cli.recipe.spec import LabelSpec, Recipe, partition_spec
from mbp_cli.run.evaluate import evaluate
from mbp_cli.run.folder import RunFolder, refuse_in_use, save_state_dict, write_json
from mbp_cli.run.loop import train_loop
from mbp_cli.run.records import CODES_FILE, PARTS_FOLDER
from mbp_cli.run.start import RunOptions, start_run
from mbp_cli.run.stopping import resume_command

WAIT_SECONDS = 7 * 24 * 3600  # side by side, a rank that is done waits this long for the rest


@dataclass
class Partition:
    """The whole model's setup, its parts (sharing its modules) and each part's setup."""

    whole: Setup
    cuts: list[Cut]
    parts: list[nn.Module]
    setups: list[Setup]
    codes: list[Tensor]
    warnings: list[str]  # said once the run starts

    def place(self, index: int) -> None:
        """Only part `index`'s weights on its device (the rest wait in host memory)."""
        self.whole.model.to("cpu")
        self.parts[index].to(self.setups[index].device)

    def describe(self, index: int) -> tuple[str, str]:
        """Where part `index` begins and ends: a cut's module name, input or output."""
        names = ["input", *(c.name for c in self.cuts), "output"]
        return names[index], names[index + 1]


def part_count(recipe: Recipe) -> int:
    """How many parts the recipe cuts the model into."""
    spec = partition_spec(recipe)
    return len(spec[0].at) + 1 if spec else 1


def check_part_ranks(recipe: Recipe, world_size: int) -> None:
    """Side by side takes one rank per part; one rank trains the parts in turn."""
    parts = part_count(recipe)
    if world_size not in (1, parts):
        raise UsageError(f"train.partition cuts the model into {parts} parts: train them one "
                         f"after another (no --nproc) or side by side with --nproc {parts}, "
                         f"not {world_size}")


def build_partition(recipe: Recipe, device: torch.device) -> Partition:
    """Build the whole run, cut the model, draw the codes and give each part its data."""
    # The whole model waits in host memory: the device takes one part at a time.
    whole = build(recipe, torch.device("cpu"))
    spec, labels = partition_spec(recipe)
    graph = trace(whole.model)
    cuts = find_cuts(graph, spec.at)
    parts = split(whole.model, graph, cuts)
    if is_stream(whole.train_set):
        check_stream_recipe(recipe)  # refuses the partition
    check_target_batch(recipe, len(whole.train_set))
    key = recipe.data.target
    train_labels = class_labels(whole.train_set, key)
    eval_labels = class_labels(whole.eval_set, key) if whole.eval_set is not None else None
    activations = cut_activations(whole, parts, [0, int(train_labels.argmax())])
    check_codes_fit(labels, cuts, activations)
    shapes = [value.shape[1:] for value in activations]
    whole = dataclasses.replace(whole, micro_step=whole.micro_step.on(device))  # evaluated there
    every_label = train_labels if eval_labels is None else torch.cat([train_labels, eval_labels])
    classes = int(every_label.max()) + 1
    seed = recipe.seed if labels.seed is None else labels.seed
    codes = make_codes(labels.kind, shapes, classes, seed)

    def data(index: int, labels_of: Tensor | None, source: Any, split_seed: int) -> Any:
        if labels_of is None:
            return None
        if index == 0:
            return first_part_data(source, labels_of, codes[0], key)
        following = codes[index] if index < len(cuts) else None
        return later_part_data(labels_of, codes[index - 1], labels.noise,
                               seed * 4096 + 2 * index + split_seed, following)

    setups = []
    for index, part in enumerate(parts):
        is_last = index == len(parts) - 1
        loss = whole.loss_fn if is_last else LOSSES[spec.intermediate_loss]()
        step = MicroStep(part, loss, device, whole.dtype,
                         output_key=recipe.model.output if is_last else None,
                         target_key=key if index == 0 else None)
        setups.append(Setup(step, data(index, train_labels, whole.train_set, 0),
                            data(index, eval_labels, whole.eval_set, 1),
                            whole.collate if index == 0 else None,
                            freeze_batchnorm=whole.freeze_batchnorm))
    return Partition(whole, cuts, parts, setups, codes, relu_warnings(labels, cuts, activations))


def probe_parts(recipe: Recipe, options: ProbeOptions) -> list[dict[str, Any]]:
    """`mbp probe` of a partitioned recipe: each part probed alone, as training probes it
    for `micro: auto` (only its weights on the device)."""
    partition = build_partition(recipe, options.device)
    answers = []
    for index, setup in enumerate(partition.setups):
        partition.place(index)
        setup.train_mode()
        result = probe_setup(recipe, setup, build_optimizer(recipe, setup.model), options)
        begins, ends = partition.describe(index)
        answers.append({"part": index + 1, "begins": begins, "ends": ends, **result.to_dict()})
    return answers


def cut_activations(whole: Setup, parts: list[nn.Module],
                    indices: list[int]) -> list[Tensor]:
    """The activations at each cut for real samples (the whole model's forward and loss tried
    on them first, the highest class among them: a model that does not fit its data fails
    before any part trains)."""
    batch = batch_of(whole.train_set, indices, whole.collate)
    whole.model.eval()  # no BatchNorm statistics moved
    try:
        with torch.no_grad(), explained_step_errors(True):
            whole.micro_step(batch)
            return run_parts(parts, batch, whole.micro_step)
    finally:
        whole.train_mode()


def run_parts(parts: list[nn.Module], batch: Any, step: MicroStep) -> list[Tensor]:
    """Each cut's activation for a batch, the parts run in turn."""
    args, kwargs, _ = step.on_device(batch)
    value = parts[0](*args, **kwargs)
    activations = []
    for part in parts[1:]:
        if not isinstance(value, Tensor):
            raise UsageError("train.partition: a part would pass on "
                             f"{describe(value)}, not a tensor; cut elsewhere")
        activations.append(value)
        value = part(value)
    return activations


def check_codes_fit(labels: LabelSpec, cuts: list[Cut], activations: list[Tensor]) -> None:
    """The codes take each cut's shape: an explicit `dim` must be its width."""
    for cut, value in zip(cuts, activations, strict=True):
        width, shape = value[0].numel(), "×".join(map(str, value.shape[1:]))
        if labels.dim != "auto" and labels.dim != width:
            shown = f" ({shape})" if value.dim() > 2 else ""
            raise UsageError(
                f"train.partition.labels.dim: {labels.dim}, but the activation at {cut.name} "
                f"has {width} values{shown}; the composed model is the recipe's own, so its "
                "codes have the cut's width: use dim: auto")


def relu_warnings(labels: LabelSpec, cuts: list[Cut], activations: list[Tensor]) -> list[str]:
    """Gaussian codes at a cut whose activation is never negative (after a ReLU): half of
    each code is out of the first part's reach."""
    return [f"the activation at {cut.name} is never negative on the samples tried (after a "
            "ReLU?): half of each gaussian code is out of reach there; use "
            "train.partition.labels.kind: uniform, or cut before the ReLU"
            for cut, value in zip(cuts, activations, strict=True)
            if labels.kind == "gaussian" and value.min() >= 0]


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
        emit(Eval(summary["steps"], result.get("eval_loss"), result.get("eval_accuracy"),
                  part=0))
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
    emit(Part(len(partition.parts), begins, ends, sum(p.numel() for p in part.parameters()),
              str(part_dir), done is not None, part=index + 1))
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
