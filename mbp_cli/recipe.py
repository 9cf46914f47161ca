"""The recipe: frozen dataclasses and load_recipe(), the one way to read and check a recipe."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbp_cli.errors import RecipeError, UsageError
from mbp_cli.recipe_yaml import apply_overrides, parse_yaml
from mbp_cli.units import parse_bytes


def _spec(default: Any = dataclasses.MISSING, *, minimum: float | None = None,
          maximum: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A recipe field with its default and the constraints the loader checks."""
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSpec:
    name: str = _spec()
    args: dict[str, Any] = _spec({})
    output: str | None = _spec(None)  # the output's key or attribute (default: logits, out, [0])
    head: str | None = _spec(None)  # the classifier replaced for num_classes with weights


@dataclass(frozen=True)
class DataSpec:
    name: str = _spec()
    args: dict[str, Any] = _spec({})
    resize: int | None = _spec(None, minimum=1)  # square side for image datasets
    eval_fraction: float = _spec(0.1, minimum=0.0, maximum=0.9)  # held out if no test split
    target: str | None = _spec(None)  # dict samples: the target's key (labels, label, target)
    collate: str | None = _spec(None)  # package.module:callable making a batch of samples
    transforms: list[Any] | None = _spec(None)  # torchvision transforms.v2, training split
    eval_transforms: list[Any] | None = _spec(None)  # held-out split (default: resize, normalize)
    normalize: str | None = _spec(None, choices=("imagenet",))
    input_shape: list[int] | None = _spec(None)  # one sample's, for --estimate without the data


@dataclass(frozen=True)
class BatchSpec:
    target: int = _spec(minimum=1)
    micro: int | str = _spec(minimum=1)  # or "auto": the probe picks it
    drop_last: bool = _spec(False)  # drop an epoch's smaller last target batch
    memory_budget: int | str | None = _spec(None)  # "20GiB"; default: free memory × fraction
    memory_fraction: float = _spec(0.9, minimum=0.01, maximum=1.0)
    memory_margin: float = _spec(0.05, minimum=0.0, maximum=0.5)  # kept free below the budget


@dataclass(frozen=True)
class OptimSpec:
    name: str = _spec()
    args: dict[str, Any] = _spec({})


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = _spec("none", choices=("none", "constant", "cosine", "linear"))
    warmup_steps: int = _spec(0, minimum=0)
    final_lr_fraction: float = _spec(0.0, minimum=0.0)  # where cosine and linear decay end


@dataclass(frozen=True)
class LossSpec:
    name: str = _spec("cross_entropy")
    args: dict[str, Any] = _spec({})


@dataclass(frozen=True)
class TrainSpec:
    steps: int | None = _spec(None, minimum=1)
    epochs: int | None = _spec(None, minimum=1)
    eval_every: int = _spec(50, minimum=0)
    log_every: int = _spec(10, minimum=1)
    device: str = _spec("auto")
    dtype: str = _spec("float32", choices=("float32", "float64"))
    num_workers: int = _spec(0, minimum=0)
    checkpoint_every: int = _spec(50, minimum=0)  # steps; 0: only at the end
    keep_checkpoints: int = _spec(2, minimum=1)
    on_nonfinite: str = _spec("stop", choices=("stop", "skip"))  # a NaN or infinite loss


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int
    model: ModelSpec
    data: DataSpec
    batch: BatchSpec
    optim: OptimSpec
    schedule: ScheduleSpec
    loss: LossSpec
    train: TrainSpec
    folder: str | None = field(default=None, compare=False)  # where it was read: imports look here

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, loadable again by load_recipe."""
        data = dataclasses.asdict(self)
        del data["folder"]
        return data


DEVICE_NAME = r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?"
SECTIONS: dict[str, type] = {
    "model": ModelSpec, "data": DataSpec, "batch": BatchSpec, "optim": OptimSpec,
    "schedule": ScheduleSpec, "loss": LossSpec, "train": TrainSpec,
}
REQUIRED_SECTIONS = ("model", "data", "batch", "optim")
TOP_LEVEL_KEYS = ("name", "seed", *SECTIONS)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                folder: str | None = None) -> Recipe:
    """Read, override and validate a recipe file, builder arguments checked against their
    signatures (nothing downloaded); raise RecipeError listing every problem at once."""
    from mbp_cli.arguments import recipe_problems  # imports torch: only once the YAML is read

    recipe, problems = read_recipe(path, overrides, folder)
    problems += recipe_problems(recipe)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def read_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                folder: str | None = None) -> tuple[Recipe, list[str]]:
    """Read and override a recipe; return it (defaults where values are bad) and its problems.

    Import paths in it are looked up in `folder` first (default: the file's own folder).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read recipe {path}: {exc}") from exc
    raw, problems = parse_yaml(text)
    if raw is not None:
        problems += apply_overrides(raw, overrides, tuple(SECTIONS))
    recipe = build_recipe(raw, path.stem, problems)
    return dataclasses.replace(recipe, folder=folder or str(path.resolve().parent)), problems


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a resolved recipe, in section order."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


def build_recipe(raw: Any, default_name: str, problems: list[str]) -> Recipe:
    """Build the Recipe from raw data, appending every problem found; defaults fill the gaps."""
    if raw is None and not problems:
        problems.append("the file is empty")
    if raw is not None and not isinstance(raw, dict):
        problems.append(f"the top level must be a mapping of sections, got {_kind(raw)}")
    raw = raw if isinstance(raw, dict) else {}
    _unknown_keys(raw, TOP_LEVEL_KEYS, "", problems)
    name = _typed(raw.get("name", default_name), str, "name", problems) or default_name
    seed = _typed(raw.get("seed", 0), int, "seed", problems)
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        problems.append(f"seed: must be from 0 to 2**63 - 1, got {seed}")
    sections = {}
    for key, cls in SECTIONS.items():
        value = raw.get(key)
        if value is None and key in REQUIRED_SECTIONS:
            problems.append(f"{key}: missing section")
        if isinstance(value, str):
            value = {"name": value}  # `loss: mse` is short for `loss: {name: mse}`
        sections[key] = _build_section(cls, value, key, problems)
    recipe = Recipe(name=name, seed=seed if isinstance(seed, int) else 0, **sections)
    _cross_checks(recipe, problems)
    return recipe


def _cross_checks(recipe: Recipe, problems: list[str]) -> None:
    batch, train = recipe.batch, recipe.train
    if isinstance(batch.micro, str) and batch.micro != "auto":
        problems.append(f"batch.micro: expected an integer or 'auto', got {batch.micro!r}")
    if batch.memory_budget is not None:
        try:
            parse_bytes(batch.memory_budget)
        except ValueError as exc:
            problems.append(f"batch.memory_budget: {exc}")
    sizes_are_valid = all(isinstance(n, int) and n >= 1 for n in (batch.micro, batch.target))
    if sizes_are_valid and batch.micro > batch.target:
        problems.append(f"batch.micro: {batch.micro} is larger than batch.target {batch.target}")
    if isinstance(train.device, str) and not re.fullmatch(DEVICE_NAME, train.device):
        problems.append(f"train.device: {train.device!r} is not a device name such as auto, "
                        "cpu, cuda, cuda:1 or mps")
    if (train.steps is None) == (train.epochs is None):
        problems.append("train: give exactly one of train.steps and train.epochs")


def _build_section(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    """Build one section's dataclass; fields are reported missing only in a section written out."""
    is_written = isinstance(value, dict)
    if value is not None and not is_written:
        problems.append(f"{path}: expected a mapping, got {_kind(value)}")
    if not is_written:
        value = {}
    _unknown_keys(value, _field_names(cls), path + ".", problems)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in value:
            if required:
                if is_written:
                    problems.append(f"{key}: missing")
                kwargs[f.name] = None  # the recipe is refused; None keeps later checks quiet
            continue
        checked = _typed(value[f.name], hints[f.name], key, problems)
        if checked is not _INVALID:
            _constraints(checked, f.metadata, key, problems)
            kwargs[f.name] = checked
        elif required:
            kwargs[f.name] = None
    return cls(**kwargs)


_INVALID = object()


def _typed(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Return `value` if it has the type `hint` names (ints pass as floats), else note a problem."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (str, dict, list) and isinstance(value, origin):
            return value
    wanted = " or ".join(_TYPE_WORDS[typing.get_origin(k) or k] for k in allowed)
    problems.append(f"{key}: expected {wanted}, got {value!r} ({_kind(value)})")
    return _INVALID


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", list: "a list", type(None): "null"}


def _constraints(value: Any, meta: typing.Mapping[str, Any], key: str,
                 problems: list[str]) -> None:
    minimum, choices = meta.get("minimum"), meta.get("choices")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and not math.isfinite(value):
        problems.append(f"{key}: must be a finite number, got {value!r}")
        return
    if minimum is not None and is_number and value < minimum:
        problems.append(f"{key}: must be at least {minimum:g}, got {value!r}")
    if meta.get("maximum") is not None and is_number and value > meta["maximum"]:
        problems.append(f"{key}: must be at most {meta['maximum']:g}, got {value!r}")
    if choices and value is not None and value not in choices:
        problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}"
                        + suggest(str(value), choices))


def _unknown_keys(mapping: dict, known: tuple[str, ...] | list[str], prefix: str,
                  problems: list[str]) -> None:
    for key in mapping:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown key" + suggest(str(key), known, prefix))


def suggest(word: str, options: typing.Iterable[str], prefix: str = "") -> str:
    """'; did you mean X?' for the option nearest to `word` (case aside), or nothing."""
    by_lower = {option.lower(): option for option in options}
    if word.lower() in by_lower:
        return f"; did you mean {prefix}{by_lower[word.lower()]}?"
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{by_lower[match[0]]}?" if match else ""


def recipe_folders(recipe: Recipe) -> tuple[str, ...]:
    """Where the recipe's import paths are looked up before the current folder."""
    return (recipe.folder,) if recipe.folder else ()


def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)


def bundled_recipes() -> list[tuple[Path, str]]:
    """The recipes shipped beside the package, each with the first comment line of its file."""
    folder = Path(__file__).resolve().parent.parent / "recipes"
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        description = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
        try:
            shown = path.relative_to(Path.cwd())
        except ValueError:
            shown = path
        found.append((shown, description))
    return found

