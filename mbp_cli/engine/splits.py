"""The recipe's data: training and held-out splits, their transforms, collate and size checks."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from mbp_cli.catalog.datasets import build_split, hold_out, image_transform, is_stream
from mbp_cli.catalog.pretrained import weights_transforms
from mbp_cli.errors import UsageError, users_code
from mbp_cli.recipe import registry
from mbp_cli.recipe.spec import Recipe, eval_data, recipe_folders


def build_data(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """The training split and the held-out split (data.eval's dataset, else the dataset's own
    test split, else a seeded fraction), each with its transforms."""
    spec = recipe.data
    data = registry.find_dataset(spec.name, recipe_folders(recipe))
    train_tf, eval_tf = split_transforms(recipe, data.is_torchvision)

    def split(train: bool, transform: Any) -> Dataset | None:
        return build_split(data.fn, spec.args, train=train, transform=transform,
                           is_users=data.is_users)

    train_set = split(True, train_tf)
    held_out = eval_data(recipe)
    if held_out is not None:  # data.eval: a dataset of its own, its test split or all of it
        source = registry.find_dataset(held_out[0], recipe_folders(recipe))

        def eval_split(train: bool) -> Dataset | None:
            return build_split(source.fn, held_out[1], train=train, transform=eval_tf,
                               is_users=source.is_users)

        eval_set = eval_split(False)
        return train_set, eval_split(True) if eval_set is None else eval_set
    eval_set = split(False, eval_tf)
    if eval_set is None and not is_stream(train_set):  # a stream's held-out: its own split
        eval_source = split(True, eval_tf) if eval_tf is not train_tf else None
        train_set, eval_set = hold_out(train_set, spec.eval_fraction, recipe.seed, eval_source)
    return train_set, eval_set


def held_out_words(recipe: Recipe) -> str:
    """Which samples the held-out split is, in words (what `mbp eval` scored)."""
    held_out = eval_data(recipe)
    if held_out is not None:
        args = ", ".join(f"{key}={value}" for key, value in held_out[1].items())
        return f"{held_out[0]}({args}), data.eval's"
    builder = registry.find_dataset(recipe.data.name, recipe_folders(recipe))
    if {"train", "split"} & set(inspect.signature(builder.fn).parameters):
        return f"the test split of {recipe.data.name}"
    return f"{recipe.data.eval_fraction:.0%} of {recipe.data.name}, held out by seed"


def split_transforms(recipe: Recipe, is_torchvision: bool) -> tuple[Any, Any]:
    """(training, held-out) image transforms: the recipe's, else the pretrained weights' own,
    else resize and normalize; None for datasets that are not images."""
    spec = recipe.data
    asked = spec.transforms is not None or spec.eval_transforms is not None
    if not (is_torchvision or asked or spec.resize or spec.normalize):
        return None, None
    preset = None
    if "weights" in recipe.model.args and recipe.model.name in _torchvision_models():
        preset = weights_transforms(recipe.model.name, recipe.model.args)
    if preset is not None and not asked:
        return preset, preset
    train_tf = image_transform(spec.transforms, resize=spec.resize, normalize=spec.normalize)
    if spec.eval_transforms is None and not spec.transforms:
        return train_tf, train_tf
    return train_tf, image_transform(spec.eval_transforms, resize=spec.resize,
                                     normalize=spec.normalize)


def _torchvision_models() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models()


def build_collate(recipe: Recipe) -> Callable[[list[Any]], Any] | None:
    """data.collate, its errors shown as the user's own; None for torch's default."""
    if recipe.data.collate is None:
        return None
    collate = registry.import_path(recipe.data.collate, recipe_folders(recipe))
    return functools.partial(_users_collate, collate, recipe.data.collate)


def _users_collate(collate: Callable[[list[Any]], Any], name: str, samples: list[Any]) -> Any:
    with users_code(f"data.collate {name}"):
        return collate(samples)


def check_not_empty(recipe: Recipe, train_samples: int) -> None:
    """Refuse a training split without samples."""
    if train_samples == 0:
        raise UsageError(f"data: the training split of {recipe.data.name} is empty")


def check_target_batch(recipe: Recipe, train_samples: int) -> None:
    """Refuse a target batch larger than the training split: each step would be an epoch."""
    check_not_empty(recipe, train_samples)
    target = recipe.batch.target
    if train_samples < target:
        raise UsageError(f"batch.target: {target} is larger than the training split of "
                         f"{train_samples} samples, so every step would be one whole epoch; "
                         f"for full-batch training set batch.target: {train_samples}")

