"""Builder arguments checked against each builder's signature when a recipe loads."""

from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from typing import Any

import torch

from mbp_cli.catalog.datasets import make_transform, transform_steps
from mbp_cli.catalog.pretrained import pretrained_problems
from mbp_cli.errors import REFUSALS, UsageError, suggest
from mbp_cli.recipe.registry import (
    Builder,
    LookupFailed,
    find_dataset,
    find_loss,
    find_model,
    find_optimizer,
    import_path,
)
from mbp_cli.recipe.spec import Recipe, eval_data, recipe_folders


def argument_problems(builder: Builder, args: dict[str, Any], path: str) -> list[str]:
    """Arguments the builder's signature does not take, or required ones the recipe leaves out."""
    try:
        params = inspect.signature(builder.signature_of or builder.fn).parameters
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
    problems += type_problems(builder, {k: v for k, v in args.items() if k in params}, path)
    if builder.is_torchvision and takes_any and not problems and "weights" not in args:
        problems += _trial_build_problems(builder, args, path)
    return problems


# What an annotation of these types takes, as a recipe writes it; others are not checked here.
_TAKES = {int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
          bool: ("true or false", lambda v: isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str)),
          type(None): ("null", lambda v: v is None),
          list: ("a list", lambda v: isinstance(v, list | tuple)),
          tuple: ("a list", lambda v: isinstance(v, list | tuple)),
          dict: ("a mapping", lambda v: isinstance(v, dict))}


def type_problems(builder: Builder, args: dict[str, Any], path: str) -> list[str]:
    """Arguments of a type the builder's annotations do not take (an integer given 'abc'),
    where it annotates them with plain types; others are left to the builder."""
    target = builder.signature_of or builder.fn
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # annotations that do not resolve here: nothing to check against
        return []
    problems = []
    for key, value in args.items():
        kinds = _plain_kinds(hints.get(key))
        if kinds and not any(_TAKES[kind][1](value) for kind in kinds):
            wanted = " or ".join(dict.fromkeys(_TAKES[kind][0] for kind in kinds))
            problems.append(f"{path}.{key}: {builder.label} takes {wanted}, got {value!r}")
    return problems


def _plain_kinds(hint: Any) -> list[type]:
    """The plain types an annotation allows (none: it allows something not checked here)."""
    if hint is None:
        return []
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) \
        or typing.get_origin(hint) is typing.Union else (hint,)
    kinds = [typing.get_origin(m) or m for m in members]
    return kinds if all(kind in _TAKES for kind in kinds) else []


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
    except REFUSALS as exc:  # a value it cannot take (a negative size, say)
        return [f"{path}: {builder.label} refuses these arguments: {' '.join(str(exc).split())}"]
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
            builder = find(spec.name, recipe_folders(recipe))
        except LookupFailed as exc:
            problems.append(f"{path}.name: {exc}")
            continue
        problems += argument_problems(builder, spec.args, f"{path}.args")
        if path == "model" and builder.is_torchvision and spec.args.get("weights") is not None:
            problems += pretrained_problems(spec.name, spec.args, recipe.model.head)
        if path == "data":
            problems += _transform_argument_problems(recipe, builder)
    held_out = eval_data(recipe) if isinstance(recipe.data.eval, dict) else None
    if held_out is not None and isinstance(held_out[0], str):
        try:
            builder = find_dataset(held_out[0], recipe_folders(recipe))
        except LookupFailed as exc:
            problems.append(f"data.eval.name: {exc}")
        else:
            problems += argument_problems(builder, held_out[1], "data.eval.args")
    for key in ("transforms", "eval_transforms"):
        problems += transform_problems(getattr(recipe.data, key), f"data.{key}")
    if recipe.data.collate is not None:
        try:
            import_path(recipe.data.collate, recipe_folders(recipe))
        except LookupFailed as exc:
            problems.append(f"data.collate: {exc}")
    return problems


def _transform_argument_problems(recipe: Recipe, builder: Builder) -> list[str]:
    """Image transforms need a dataset that takes `transform=`: else they would be ignored."""
    data = recipe.data
    asked = [key for key in ("transforms", "eval_transforms", "normalize", "resize")
             if getattr(data, key) is not None]
    try:
        takes_transform = "transform" in inspect.signature(builder.fn).parameters
    except (TypeError, ValueError):
        takes_transform = True
    if not asked or takes_transform:
        return []
    return [f"data.{asked[0]}: {builder.label} takes no `transform` argument, so images cannot be "
            "transformed for it; give the dataset a `transform=None` parameter and apply it to "
            "each sample, as torchvision's datasets do"]


def transform_problems(specs: list[Any] | None, path: str) -> list[str]:
    """Each torchvision transforms.v2 name known, its arguments taken by its signature."""
    if not specs:
        return []  # importing torchvision's transforms takes seconds: only when there are some
    from torchvision.transforms import v2

    known = [name for name in dir(v2) if name[0].isupper()]
    try:
        steps = transform_steps(specs)
    except UsageError as exc:
        return [f"{path}: {exc}"]
    problems = []
    for name, args in steps:
        if name not in known:
            problems.append(f"{path}: unknown transform {name!r}" + suggest(name, known))
            continue
        named = argument_problems(Builder(getattr(v2, name), name), args, f"{path}.{name}")
        if not named:
            try:
                make_transform(name, args)  # cheap: the values are checked too
            except UsageError as exc:
                named = [f"{path}.{name}: {exc}"]
        problems += named
    return problems
