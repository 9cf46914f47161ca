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

from mbp_cli.catalog.datasets import BUILTIN_DATASETS, INJECTED_DATASET_ARGS
from mbp_cli.catalog.losses import LOSSES, ItemLoss, parameters_of
from mbp_cli.catalog.model_loss import ModelLoss
from mbp_cli.catalog.models import MODELS
from mbp_cli.errors import UserCodeError, suggest, users_code


@dataclass(frozen=True)
class Builder:
    """A callable found by name, with the argument names mbp supplies itself."""

    fn: Callable[..., Any]
    label: str  # how messages name it, e.g. "small_cnn()"
    injected: tuple[str, ...] = ()
    is_torchvision: bool = False
    is_users: bool = False  # imported from the user's code: its errors keep their traceback
    signature_of: Callable[..., Any] | None = None  # whose signature the arguments meet (fn)


class LookupFailed(Exception):
    """A name that resolves to nothing; the message says why, with the nearest names."""


Folders = tuple[str, ...]


def find_model(name: str, folders: Folders = ()) -> Builder:
    """A built-in model, a torchvision model name, or `package.module:callable`."""
    if name in MODELS:
        return Builder(MODELS[name], f"{name}()")
    if ":" in name:
        return Builder(import_path(name, folders), f"{name}()", is_users=True)
    import torchvision.models

    known = torchvision.models.list_models()
    if name in known:
        fn = functools.partial(torchvision.models.get_model, name)
        return Builder(fn, f"torchvision model {name}", is_torchvision=True)
    raise LookupFailed(f"unknown model {name!r}" + suggest(name, [*MODELS, *known]))


def find_dataset(name: str, folders: Folders = ()) -> Builder:
    """A built-in dataset, a torchvision dataset class, or `package.module:callable`."""
    if name in BUILTIN_DATASETS:
        return Builder(BUILTIN_DATASETS[name], f"{name}()", INJECTED_DATASET_ARGS)
    if ":" in name:
        return Builder(import_path(name, folders), f"{name}()", INJECTED_DATASET_ARGS,
                       is_users=True)
    import torchvision.datasets

    known = [n for n in torchvision.datasets.__all__ if n[0].isupper()]
    if name in known:
        return Builder(getattr(torchvision.datasets, name), f"torchvision dataset {name}",
                       INJECTED_DATASET_ARGS, is_torchvision=True)
    raise LookupFailed(f"unknown dataset {name!r}" + suggest(name, [*BUILTIN_DATASETS, *known]))


def find_optimizer(name: str, folders: Folders = ()) -> Builder:
    """A `torch.optim` optimizer class by name."""
    known = [n for n, obj in vars(torch.optim).items()
             if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)
             and obj is not torch.optim.Optimizer]
    if name not in known:
        raise LookupFailed(f"unknown optimizer {name!r}" + suggest(name, known))
    return Builder(getattr(torch.optim, name), f"torch.optim.{name}", ("params",))


def find_loss(name: str, folders: Folders = ()) -> Builder:
    """A built-in loss by name, the model's own (`model`; `auto`: the default), or
    `package.module:callable` of your own (see ItemLoss)."""
    if name == "model":
        return Builder(ModelLoss, "loss model", ("model",))
    if name == "auto":  # its arguments are cross_entropy's: with any, it is cross_entropy
        return Builder(LOSSES["cross_entropy"], "loss auto (cross_entropy)")
    if ":" in name:
        fn = import_path(name, folders)
        takes = [] if inspect.isclass(fn) else list(parameters_of(fn))
        return Builder(functools.partial(ItemLoss, fn, name), f"loss {name}", tuple(takes[:2]),
                       is_users=True, signature_of=fn)
    if name not in LOSSES:
        raise LookupFailed(f"unknown loss {name!r}" + suggest(name, [*LOSSES, "model"]))
    return Builder(LOSSES[name], f"loss {name}")


def import_path(name: str, folders: Folders = ()) -> Callable[..., Any]:
    """`package.module:callable`, the module looked up in `folders` (the recipe's own folder),
    then the current folder, then the installed packages."""
    module_name, _, attr = name.partition(":")
    if not all(module_name.split(".")) or not attr.isidentifier():
        raise LookupFailed(f"{name!r} is not an import path: expected module:callable, e.g. "
                           "my_model:Net")
    top = module_name.split(".")[0]
    searched = list(dict.fromkeys(str(Path(f).resolve()) for f in (*folders, Path.cwd())))
    home = next((f for f in searched if (Path(f) / f"{top}.py").is_file()
                 or (Path(f) / top / "__init__.py").is_file()), None)
    if home is not None:
        _forget_if_elsewhere(top, home)
        if home in sys.path:
            sys.path.remove(home)
        sys.path.insert(0, home)  # kept: DataLoader workers and unpickling import it again
    try:
        with users_code(f"importing {module_name}"):
            module = importlib.import_module(module_name)
    except UserCodeError as exc:
        missing = getattr(exc.__cause__, "name", None)
        is_ours = isinstance(exc.__cause__, ModuleNotFoundError) and missing is not None and (
            module_name == missing or module_name.startswith(missing + "."))
        if not is_ours:
            raise  # the user's module raised, or imports something missing: its traceback
        raise LookupFailed(f"cannot import {module_name!r}: no module {missing!r} in "
                           f"{', '.join(searched)} or the installed packages") from None
    target = getattr(module, attr, None)
    if target is None:
        raise LookupFailed(f"module {module_name!r} has no attribute {attr!r}"
                           + suggest(attr, [n for n in vars(module) if not n.startswith("_")]))
    if not callable(target):
        raise LookupFailed(f"{name} is not callable")
    return target


def _forget_if_elsewhere(top: str, home: str) -> None:
    """Drop a module of this name imported from another folder (another recipe's)."""
    loaded = sys.modules.get(top)
    where = getattr(loaded, "__file__", None) or ""
    if loaded is not None and not Path(where).resolve().is_relative_to(home):
        for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
            del sys.modules[key]
