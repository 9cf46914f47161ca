"""The recipe's optimizer over a model's parameters and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mbp_cli.errors import refused_arguments
from mbp_cli.recipe import registry
from mbp_cli.recipe.spec import Recipe, ScheduleSpec


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's torch.optim class over the model's parameters."""
    optimizer_class = registry.find_optimizer(recipe.optim.name).fn
    args = recipe.optim.args

    def without(key: str) -> torch.optim.Optimizer:  # which argument torch refused
        return optimizer_class(model.parameters(), **{k: v for k, v in args.items() if k != key})

    with refused_arguments("optim.args", args, recipe.optim.name, without):
        return optimizer_class(model.parameters(), **args)


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
