"""The recipe's model and its loss, built in the training dtype on the device."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mbp_cli.catalog.classification import ClassificationLoss
from mbp_cli.catalog.datasets import TensorPairs
from mbp_cli.catalog.losses import LossFn
from mbp_cli.catalog.model_loss import ModelLoss, is_hugging_face, takes_labels
from mbp_cli.catalog.pretrained import build_pretrained
from mbp_cli.errors import UsageError, describe, fits_in_memory, refused_arguments, users_code
from mbp_cli.recipe import registry
from mbp_cli.recipe.spec import Recipe, recipe_folders

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(recipe: Recipe, device: torch.device, *, is_fake: bool = False,
                with_weights: bool = True) -> nn.Module:
    """The recipe's model in the training dtype on the device (pretrained weights loaded and
    the head replaced where the recipe asks; without them for fake tensors or `with_weights`
    False, the same shapes from a fresh model)."""
    dtype = DTYPES[recipe.train.dtype]
    spec = recipe.model
    builder = registry.find_model(spec.name, recipe_folders(recipe))
    fits = functools.partial(fits_in_memory, f"model {spec.name} with model.args {spec.args}"
                             f" on {device}")
    if builder.is_torchvision and spec.args.get("weights") is not None and not is_fake:
        with fits():
            model = build_pretrained(spec.name, spec.args, spec.head, load=with_weights)
            return model.to(device, dtype)
    # fake tensors: torchvision's shapes without its weights (a builder of your own keeps any
    # argument named weights)
    args = {k: v for k, v in spec.args.items() if k != "weights" or not builder.is_torchvision}
    make = functools.partial(builder.fn, **args)
    guard = users_code(f"model {spec.name}") if builder.is_users else \
        refused_arguments("model.args", spec.args, spec.name)
    if not is_fake:
        with guard, fits():  # the guard passes DoesNotFitError on: it is an MbpError
            model = a_module(make(), spec.name)
            return without_cache(model.to(device, dtype))
    # Fake parameters cannot be converted after the fact: build them in the training dtype.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with guard:
            model = make()
    finally:
        torch.set_default_dtype(default_dtype)
    return without_cache(a_module(model, spec.name))


def a_module(model: Any, name: str) -> nn.Module:
    """What a model builder returned, if it is a torch.nn.Module."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model.name {name} returned {describe(model)}, not a torch.nn.Module "
                         "(a model builder returns the model)")
    return model


def without_cache(model: nn.Module) -> nn.Module:
    """A Hugging Face model set not to keep its key-value cache: training never reads it, and
    activation checkpointing's recompute would fill it a second time (a size mismatch)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
    return model


def loss_name(recipe: Recipe, model: nn.Module) -> str:
    """The loss the recipe means: `auto` is the model's own where its forward takes labels
    (Hugging Face's models) and no loss.args are given, else cross_entropy."""
    name = recipe.loss.name
    if name != "auto":
        return name
    return "model" if takes_labels(model) and not recipe.loss.args else "cross_entropy"


def build_loss(recipe: Recipe, model: nn.Module) -> LossFn:
    """The recipe's loss as (sum, count)."""
    name = loss_name(recipe, model)
    if name == "model":
        return ModelLoss(model, **recipe.loss.args)
    builder = registry.find_loss(name, recipe_folders(recipe))
    args = recipe.loss.args
    if name in ("cross_entropy", "nll") and is_hugging_face(model):
        args = {"class_dim": -1, **args}  # its logits are (N, C) or (N, L, C): classes last
    with users_code(f"loss {name}") if builder.is_users else \
            refused_arguments("loss.args", recipe.loss.args, name):
        return builder.fn(**args)


def spare_counting(loss_fn: LossFn, *datasets: Dataset | None) -> LossFn:
    """Spare a classification loss its count per micro-batch (two ops, 1–2% of a small model's
    step on the CPU) where no target of the data is its ignore_index: every target is then an
    item. Known only of targets held in memory, checked here once; others are counted."""
    if not isinstance(loss_fn, ClassificationLoss) or any(
            not isinstance(data, TensorPairs) or data.targets.is_floating_point()
            or bool((data.targets == loss_fn.ignore_index).any())
            for data in datasets if data is not None):
        return loss_fn
    return loss_fn.counting_every_target()


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model normalizes with batch statistics (then micro-batching is not exact)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def smallest_micro_batch(model: nn.Module) -> int:
    """BatchNorm needs two samples to normalize a 1×1 feature map in training; others need one."""
    return 2 if has_batch_norm(model) else 1
