"""Names to builders: models, datasets, optimizers, losses (built-in, torchvision, imports)."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbp_cli.datasets import BUILTIN_DATASETS, INJECTED_DATASET_ARGS
from mbp_cli.losses import LOSSES
from mbp_cli.models import MODELS
from mbp_cli.recipe import suggest


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
