"""A run built from its recipe: device, data, model, loss, optimizer (real or fake), schedule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from mbp_cli import registry
from mbp_cli.datasets import build_split, hold_out
from mbp_cli.errors import UsageError
from mbp_cli.losses import LossFn
from mbp_cli.recipe import Recipe, ScheduleSpec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; any other name must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"train.device: {name!r} is not a device name ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"train.device: {name!r} asked for, but CUDA is not available here")
    return device


@dataclass
class Setup:
    """Everything a run builds from its recipe."""

    model: nn.Module
    train_set: Dataset
    eval_set: Dataset | None
    loss_fn: LossFn
    device: torch.device
    dtype: torch.dtype


def build(recipe: Recipe, device: torch.device) -> Setup:
    """Seed every generator, then build data, model and loss as the recipe names them."""
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    train_set, eval_set = build_data(recipe)
    model = build_model(recipe, device)
    loss_fn = registry.find_loss(recipe.loss.name).fn(**recipe.loss.args)
    return Setup(model, train_set, eval_set, loss_fn, device, DTYPES[recipe.train.dtype])


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model normalizes with batch statistics (then micro-batching is not exact)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def smallest_micro_batch(model: nn.Module) -> int:
    """BatchNorm needs two samples to normalize a 1×1 feature map in training; others need one."""
    return 2 if has_batch_norm(model) else 1


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's torch.optim class over the model's parameters."""
    optimizer_class = registry.find_optimizer(recipe.optim.name).fn
    try:
        return optimizer_class(model.parameters(), **recipe.optim.args)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"optim.args: {recipe.optim.name} refused them: {exc}") from exc


def build_data(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """The training split and the held-out split (the dataset's own, or a seeded fraction)."""
    data = registry.find_dataset(recipe.data.name)
    split_args = dict(resize=recipe.data.resize, is_torchvision=data.is_torchvision)
    train_set = build_split(data.fn, recipe.data.args, train=True, **split_args)
    eval_set = build_split(data.fn, recipe.data.args, train=False, **split_args)
    if eval_set is None:
        train_set, eval_set = hold_out(train_set, recipe.data.eval_fraction, recipe.seed)
    return train_set, eval_set


def build_model(recipe: Recipe, device: torch.device, *, is_fake: bool = False) -> nn.Module:
    """The recipe's model in the training dtype on the device."""
    dtype = DTYPES[recipe.train.dtype]
    builder = registry.find_model(recipe.model.name).fn
    if not is_fake:
        return builder(**recipe.model.args).to(device, dtype)
    # Fake parameters cannot be converted after the fact: build them in the training dtype.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return builder(**recipe.model.args)
    finally:
        torch.set_default_dtype(default_dtype)


def build_schedule(optimizer: torch.optim.Optimizer, spec: ScheduleSpec,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, cosine or linear decay to `final_lr_fraction`."""

    def factor(step: int) -> float:
        if spec.name == "none":
            return 1.0
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.name == "constant":
            return 1.0
        progress = min(1.0, (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.name == "cosine" else 1 - progress
        return spec.final_lr_fraction + (1 - spec.final_lr_fraction) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
