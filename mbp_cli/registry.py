"""Names to builders (models, datasets, optimizers, losses, schedules) and their argument checks."""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbp_cli.datasets import BUILTIN_DATASETS, INJECTED_DATASET_ARGS
from mbp_cli.errors import RecipeError
from mbp_cli.losses import LOSSES
from mbp_cli.models import MODELS
from mbp_cli.recipe import Recipe, ScheduleSpec, read_recipe, suggest


@dataclass(frozen=True)
class Builder:
    """A callable found by name, with the argument names mbp supplies itself."""

    fn: Callable[..., Any]
    label: str  # how messages name it, e.g. "small_cnn()"
    injected: tuple[str, ...] = ()
    is_torchvision: bool = False


class LookupFailed(Exception):
    """A name that resolves to nothing; the message says why, with the nearest names."""


def find_model(name: str) -> Builder:
    """A built-in model, a torchvision model name, or `package.module:callable`."""
    if name in MODELS:
        return Builder(MODELS[name], f"{name}()")
    if ":" in name:
        return Builder(_import_path(name), f"{name}()")
    import torchvision.models

    known = torchvision.models.list_models()
    if name in known:
        fn = functools.partial(torchvision.models.get_model, name)
        return Builder(fn, f"torchvision model {name}", is_torchvision=True)
    raise LookupFailed(f"unknown model {name!r}" + suggest(name, [*MODELS, *known]))


def find_dataset(name: str) -> Builder:
    """A built-in dataset, a torchvision dataset class, or `package.module:callable`."""
    if name in BUILTIN_DATASETS:
        return Builder(BUILTIN_DATASETS[name], f"{name}()", INJECTED_DATASET_ARGS)
    if ":" in name:
        return Builder(_import_path(name), f"{name}()", INJECTED_DATASET_ARGS)
    import torchvision.datasets

    known = [n for n in torchvision.datasets.__all__ if n[0].isupper()]
    if name in known:
        return Builder(getattr(torchvision.datasets, name), f"torchvision dataset {name}",
                       INJECTED_DATASET_ARGS, is_torchvision=True)
    raise LookupFailed(f"unknown dataset {name!r}" + suggest(name, [*BUILTIN_DATASETS, *known]))


def find_optimizer(name: str) -> Builder:
    """A `torch.optim` optimizer class by name."""
    known = [n for n, obj in vars(torch.optim).items()
             if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)
             and obj is not torch.optim.Optimizer]
    if name not in known:
        raise LookupFailed(f"unknown optimizer {name!r}" + suggest(name, known))
    return Builder(getattr(torch.optim, name), f"torch.optim.{name}", ("params",))


def find_loss(name: str) -> Builder:
    """A built-in loss by name."""
    if name not in LOSSES:
        raise LookupFailed(f"unknown loss {name!r}" + suggest(name, LOSSES))
    return Builder(LOSSES[name], f"loss {name}")


def _import_path(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the current folder is importable, as documented
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise LookupFailed(f"cannot import {module_name!r}: {exc}") from exc
    except AttributeError as exc:
        raise LookupFailed(f"module {module_name!r} has no attribute {attr!r}") from exc
    if not callable(target):
        raise LookupFailed(f"{name} is not callable")
    return target


def argument_problems(builder: Builder, args: dict[str, Any], path: str) -> list[str]:
    """Arguments the builder's signature does not take, or required ones the recipe leaves out."""
    try:
        params = inspect.signature(builder.fn).parameters
    except (TypeError, ValueError):
        return []  # a builtin without a signature: torch will judge the arguments
    problems = []
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for key in args:
        if key in builder.injected:
            problems.append(f"{path}.{key}: mbp sets this argument itself; leave it out")
        elif key not in params and not takes_any:
            problems.append(f"{path}.{key}: {builder.label} has no argument {key!r}"
                            + suggest(key, named))
    for name, p in params.items():
        is_required = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if is_required and name not in args and name not in builder.injected:
            problems.append(f"{path}: {builder.label} needs the argument {name!r}")
    if builder.is_torchvision and takes_any and not problems and "weights" not in args:
        problems += _trial_build_problems(builder, args, path)
    return problems


def _trial_build_problems(builder: Builder, args: dict[str, Any], path: str) -> list[str]:
    """Build a torchvision model on the meta device: checks its **kwargs, allocates nothing."""
    if inspect.isclass(builder.fn):
        return []  # a dataset class: building one reads files, so only its signature is checked
    try:
        with torch.device("meta"):
            builder.fn(**args)
    except TypeError as exc:
        unknown = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'",
                            str(exc))
        model_class = unknown and getattr(importlib.import_module("torchvision.models"),
                                          unknown[1], None)
        if model_class is None:
            return [f"{path}: {builder.label} refuses these arguments: {exc}"]
        named = list(inspect.signature(model_class).parameters)
        return [f"{path}.{unknown[2]}: {builder.label} has no argument {unknown[2]!r}"
                + suggest(unknown[2], named)]
    except (ValueError, AssertionError) as exc:
        return [f"{path}: {builder.label} refuses these arguments: {exc}"]
    return []


def recipe_problems(recipe: Recipe) -> list[str]:
    """Look up every named builder of a recipe and check its arguments against its signature."""
    problems = []
    sections = [("model", recipe.model, find_model), ("data", recipe.data, find_dataset),
                ("optim", recipe.optim, find_optimizer), ("loss", recipe.loss, find_loss)]
    for path, spec, find in sections:
        if not isinstance(spec.name, str) or not isinstance(spec.args, dict):
            continue  # already reported by the recipe loader
        try:
            builder = find(spec.name)
        except LookupFailed as exc:
            problems.append(f"{path}.name: {exc}")
            continue
        problems += argument_problems(builder, spec.args, f"{path}.args")
    return problems


def load_checked_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """load_recipe plus the builder checks, every problem reported at once (RecipeError)."""
    recipe, problems = read_recipe(path, overrides)
    problems += recipe_problems(recipe)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


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
