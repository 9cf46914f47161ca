"""A batch of samples before any training: the dataset's first ones where it is on this machine,
else one of the recipe's input shape; nothing downloaded. Validate, --estimate and the probe
take it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import Dataset

from mbp_cli.catalog.datasets import is_stream
from mbp_cli.data.batching import stack_held_out
from mbp_cli.data.samples import batch_maker
from mbp_cli.engine.splits import build_collate, build_data, check_not_empty, split_transforms
from mbp_cli.errors import UsageError, UserCodeError
from mbp_cli.recipe.spec import Recipe

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
        batch_maker(eval_set, collate or stack_held_out)(count)


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
