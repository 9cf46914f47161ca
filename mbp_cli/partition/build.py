"""A partition built: the model cut into parts, the codes drawn and each part given its data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.catalog.losses import LOSSES
from mbp_cli.data.samples import batch_of
from mbp_cli.data.streaming import check_stream_recipe
from mbp_cli.engine.micro_step import MicroStep, explained_step_errors
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.setup import Setup, build
from mbp_cli.engine.splits import check_target_batch
from mbp_cli.errors import UsageError, describe
from mbp_cli.memory.search import ProbeOptions, probe_setup
from mbp_cli.partition.codes import (
    class_labels,
    first_part_data,
    later_part_data,
    make_codes,
)
from mbp_cli.partition.cuts import Cut, find_cuts, split, trace
from mbp_cli.recipe.spec import LabelSpec, Recipe, partition_spec


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
