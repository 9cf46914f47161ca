"""mbp validate's trial: the model built and one forward + loss + backward on two samples (real
ones where the dataset is here; nothing downloaded), a forward on the meta device where the model
is large."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import torch
from torch.utils.data import Dataset

from mbp_cli.batching import stack_held_out
from mbp_cli.build import (
    DTYPES,
    build_collate,
    build_data,
    build_loss,
    build_micro_step,
    build_model,
    build_optimizer,
    check_not_empty,
    check_target_batch,
    resolve_device,
    split_transforms,
)
from mbp_cli.datasets import is_stream
from mbp_cli.errors import UsageError, UserCodeError
from mbp_cli.evaluate import HELD_OUT_KEYS
from mbp_cli.memory.step import batch_maker
from mbp_cli.recipe import Recipe
from mbp_cli.step import explained_step_errors
from mbp_cli.strategies.blocks import Blocks, BlockStrategies, check_blocks
from mbp_cli.strategies.choice import refuse_offload_here
from mbp_cli.streaming import check_stream_recipe

LARGE_MODEL_PARAMETERS = 50_000_000  # above this the trial runs on the meta device


def trial_step(recipe: Recipe) -> str:
    """Build the model and run one forward + loss + backward on two samples, as training would;
    raise the training's own one-line errors. Returns what it saw, in words."""
    resolve_device(recipe.train.device)  # one that is not here is refused, as training would
    torch.manual_seed(recipe.seed)
    batch, train_set = sample_batch(recipe, 2)
    if train_set is not None and is_stream(train_set):
        check_stream_recipe(recipe)
    elif train_set is not None:
        check_target_batch(recipe, len(train_set))
    cpu, meta = torch.device("cpu"), torch.device("meta")
    with meta:
        parameters = sum(p.numel() for p in build_model(recipe, cpu, is_fake=True).parameters())
    is_meta = parameters > LARGE_MODEL_PARAMETERS  # shapes only: nothing allocated
    device = meta if is_meta else cpu
    with device if is_meta else contextlib.nullcontext():
        model = build_model(recipe, device, is_fake=is_meta, with_weights=False)  # no download
    blocks = check_strategies(recipe, model)
    build_optimizer(recipe, model)  # arguments torch refuses, as training would find them
    step = build_micro_step(recipe, model, build_loss(recipe, model), device,
                            DTYPES[recipe.train.dtype])
    # One backward too, checkpointing's recompute included where asked: errors of the
    # backward (a model's cache refilled on the recompute, say) show before training
    checkpointed = BlockStrategies(blocks, checkpointing=True).apply() \
        if recipe.memory.checkpointing == "on" and not is_meta else None
    with explained_step_errors(True), torch.no_grad() if is_meta else contextlib.nullcontext():
        result = step(batch)
        if not is_meta:
            result.loss_sum.backward()
    if checkpointed is not None:
        checkpointed.remove()
    cut = check_cuts(recipe, model, batch, step)
    what = "one forward + loss" if is_meta else "one forward + loss + backward"
    where = "the meta device" if is_meta else f"{result.samples} samples"
    loss = "" if is_meta else \
        f", loss {float(result.loss_sum.detach()) / max(float(result.items), 1):.4g}"
    items = getattr(step.loss_fn, "items", None)  # loss: model's
    whose = f" (the model's own, a mean over {items})" if loss and items else ""
    return (f"{what} on {where}: output {tuple(result.output.shape)}{loss}{whose}; "
            f"{parameters:,} parameters{cut}")


def check_cuts(recipe: Recipe, model: torch.nn.Module, batch: Any, step: Any) -> str:
    """train.partition: the cut points, the codes' width and the targets checked as training
    checks them, on the trial batch; in words ('' without a partition)."""
    from mbp_cli.partition.codes import check_class_indices
    from mbp_cli.partition.cuts import find_cuts, split, trace
    from mbp_cli.partition.run import check_codes_fit, run_parts
    from mbp_cli.recipe import partition_spec

    spec = partition_spec(recipe)
    if spec is None:
        return ""
    graph = trace(model)
    cuts = find_cuts(graph, spec[0].at)
    check_class_indices(step.on_device(batch)[2])
    if next(model.parameters()).device.type != "meta":  # values, not only shapes
        with torch.no_grad():
            check_codes_fit(spec[1], cuts, run_parts(split(model, graph, cuts), batch, step))
    return f"; cut into {len(cuts) + 1} parts at {', '.join(c.name for c in cuts)}"


def check_strategies(recipe: Recipe, model: torch.nn.Module) -> Blocks:
    """Refuse, as training would, memory strategies that cannot apply: offload on a device
    without a GPU, named block classes the model does not have. Returns the blocks they would
    wrap (none where no strategy is asked)."""
    memory = recipe.memory
    if memory.offload == "on":
        refuse_offload_here(resolve_device(recipe.train.device))
    if memory.checkpoint_modules or "on" in (memory.checkpointing, memory.offload):
        return check_blocks(model, memory.checkpoint_modules, "memory.checkpointing")
    return []


# One sample's shape, for --estimate where the dataset is not on this machine.
KNOWN_INPUT_SHAPES = {
    "CIFAR10": (3, 32, 32), "CIFAR100": (3, 32, 32), "SVHN": (3, 32, 32), "STL10": (3, 96, 96),
    "MNIST": (1, 28, 28), "FashionMNIST": (1, 28, 28), "KMNIST": (1, 28, 28),
    "EMNIST": (1, 28, 28), "QMNIST": (1, 28, 28), "Imagenette": (3, 320, 320),
    "ImageNet": (3, 256, 256), "Food101": (3, 512, 512), "Flowers102": (3, 500, 500),
}


def check_held_out_batch(eval_set: Dataset | None, collate: Any) -> None:
    """A batch of the held-out split's first samples, as evaluation makes them: samples that
    cannot be stacked (images of mixed sizes, no eval resize) show before training."""
    if eval_set is None:
        return
    count = 8 if is_stream(eval_set) else min(8, len(eval_set))
    if count:
        batch_maker(eval_set, collate or functools.partial(stack_held_out, keys=HELD_OUT_KEYS))(
            count)


def sample_batch(recipe: Recipe, size: int) -> tuple[Any, Dataset | None]:
    """A batch of `size` samples and the training split: from the dataset where it is on this
    machine, else (split None) of the shape `data.input_shape` (or the torchvision
    dataset's known one) after the recipe's transforms, with a class-index target. Nothing is
    downloaded for it."""
    if recipe.data.args.get("download"):
        args = {**recipe.data.args, "download": False}
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, args=args))
    try:
        train_set, eval_set = build_data(recipe)
    except UserCodeError:
        raise  # the user's dataset raised: not a dataset missing from this machine
    except UsageError as exc:
        shape = recipe.data.input_shape or KNOWN_INPUT_SHAPES.get(recipe.data.name)
        if shape is None:
            raise UsageError(f"{exc}; without the dataset, validate and --estimate need the "
                             "shape of one input sample as data.input_shape, e.g. [3, 224, 224]"
                             ) from exc
    else:
        if not is_stream(train_set):  # a stream's first samples are read; none is refused there
            check_not_empty(recipe, len(train_set))
            size = min(size, len(train_set))
        check_held_out_batch(eval_set, build_collate(recipe))
        return batch_maker(train_set, build_collate(recipe))(size), train_set
    is_torchvision = recipe.data.name in KNOWN_INPUT_SHAPES
    transform, _ = split_transforms(recipe, is_torchvision)
    image = torch.zeros(tuple(shape), dtype=torch.uint8 if transform else torch.float32)
    inputs = transform(image) if transform is not None else image
    inputs = inputs.float().expand(size, *inputs.shape).clone()
    return (inputs, torch.zeros(size, dtype=torch.long)), None
