"""The recipe: frozen dataclasses and load_recipe(), the one way to read and check a recipe."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mbp_cli.errors import RecipeError, UsageError, suggest
from mbp_cli.recipe.fields import build_section, field_names, kind, spec, typed, unknown_keys
from mbp_cli.recipe.yaml_text import apply_overrides, parse_yaml
from mbp_cli.units import parse_bytes


@dataclass(frozen=True)
class ModelSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    output: str | int | None = spec(None)  # the output's key, attribute or tuple index
    head: str | None = spec(None)  # the classifier replaced for num_classes with weights


@dataclass(frozen=True)
class DataSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    resize: int | None = spec(None, minimum=1)  # square side for image datasets
    eval_fraction: float = spec(0.1, minimum=0.0, maximum=0.9)  # held out if no test split
    target: str | None = spec(None)  # dict samples: the target's key (labels, label, target)
    collate: str | None = spec(None)  # package.module:callable making a batch of samples
    transforms: list[Any] | None = spec(None)  # torchvision transforms.v2, training split
    eval_transforms: list[Any] | None = spec(None)  # held-out split (default: resize, normalize)
    normalize: str | None = spec(None, choices=("imagenet",))
    input_shape: list[int] | None = spec(None)  # one sample's, for --estimate without the data
    # the held-out split's own dataset: {name, args} (data's args too where it is data's own)
    eval: dict[str, Any] | None = spec(None)


@dataclass(frozen=True)
class BatchSpec:
    target: int = spec(minimum=1)
    micro: int | str | list = spec(minimum=1)  # or "auto": the probe picks it; or one per rank
    drop_last: bool = spec(False)  # drop an epoch's smaller last target batch
    memory_budget: int | str | None = spec(None)  # "20GiB"; default: free memory × fraction
    memory_fraction: float = spec(0.9, minimum=0.01, maximum=1.0)
    memory_margin: float = spec(0.05, minimum=0.0, maximum=0.5)  # kept free below the budget
    batchnorm: str = spec("micro", choices=("micro", "frozen"))  # frozen: BatchNorm in eval mode
    shares: list | None = spec(None)  # several ranks: each one's weight (default: even)
    balance: str = spec("even", choices=("even", "dynamic"))  # dynamic: shares follow speed
    rebalance_every: int = spec(0, minimum=0)  # steps between rebalances; 0: each epoch

    def micro_for(self, rank: int, world_size: int) -> int | str:
        """This rank's micro-batch: batch.micro, or its own entry of a list of one per rank;
        'auto' where the probe picks it."""
        if not isinstance(self.micro, list):
            return self.micro
        if len(self.micro) != world_size:
            raise UsageError(f"batch.micro gives {len(self.micro)} micro-batches for "
                             f"{world_size} rank{'s' if world_size > 1 else ''}; give one per "
                             "rank (or one for all)")
        return self.micro[rank]

    @property
    def fixed_micro(self) -> int | None:
        """The micro-batch the recipe fixes for every rank (None: auto, or one per rank)."""
        return self.micro if isinstance(self.micro, int) else None


@dataclass(frozen=True)
class OptimSpec:
    name: str = spec()
    args: dict[str, Any] = spec({})
    # of the whole target batch's gradient; 0 would zero every gradient
    clip_grad_norm: float | None = spec(None, above=0.0)
    clip_grad_value: float | None = spec(None, above=0.0)


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = spec("none", choices=("none", "constant", "cosine", "linear"))
    warmup_steps: int = spec(0, minimum=0)
    final_lr_fraction: float = spec(0.0, minimum=0.0)  # where cosine and linear decay end


@dataclass(frozen=True)
class LossSpec:
    # auto: the model's own where its forward takes labels and no args are given (Hugging
    # Face's way), else cross_entropy
    name: str = spec("auto")
    args: dict[str, Any] = spec({})


@dataclass(frozen=True)
class LabelSpec:
    """train.partition.labels: the synthetic intermediate labels, one random code per class."""

    kind: str = spec("gaussian", choices=("gaussian", "uniform"))  # uniform: [0, 1), after ReLU
    dim: int | str = spec("auto", minimum=1)  # the code's size: the cut's width ('auto')
    noise: float = spec(0.1, minimum=0.0)  # std of the noise on the code a later part reads
    seed: int | None = spec(None, minimum=0)  # default: the recipe's seed


@dataclass(frozen=True)
class PartitionSpec:
    """train.partition (experimental): the model cut into parts that train apart."""

    at: list = spec()  # where a new part begins: module names (or Sequential indices)
    labels: dict[str, Any] = spec({})  # a LabelSpec
    intermediate_loss: str = spec("mse", choices=("mse", "cosine"))


@dataclass(frozen=True)
class TrainSpec:
    steps: int | None = spec(None, minimum=1)
    epochs: int | None = spec(None, minimum=1)
    eval_every: int = spec(50, minimum=0)
    log_every: int = spec(10, minimum=1)
    log: list | None = spec(None)  # loggers besides metrics.jsonl: [tensorboard]
    device: str = spec("auto")
    dtype: str = spec("float32", choices=("float32", "float64"))
    num_workers: int = spec(0, minimum=0)
    checkpoint_every: int = spec(50, minimum=0)  # steps; 0: only at the end
    keep_checkpoints: int = spec(2, minimum=1)
    on_nonfinite: str = spec("stop", choices=("stop", "skip"))  # a NaN or infinite loss
    precision: str = spec("fp32", choices=("fp32", "bf16", "fp16", "auto"))  # autocast
    compile: bool = spec(False)  # torch.compile the model
    collective_timeout: float = spec(1800.0, minimum=1.0)  # seconds a rank waits for the others
    partition: dict[str, Any] | None = spec(None)  # a PartitionSpec: experimental


@dataclass(frozen=True)
class MemorySpec:
    checkpointing: str = spec("off", choices=("off", "on", "auto"))  # recompute activations
    checkpoint_modules: list[str] | None = spec(None)  # block classes (default: found)
    offload: str = spec("off", choices=("off", "on", "auto"))  # activations to host memory
    offload_blocks: int | None = spec(None, minimum=1)  # the first k blocks (on: all)


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
    memory: MemorySpec
    folder: str | None = field(default=None, compare=False)  # where it was read: imports look here

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data, loadable again by load_recipe."""
        data = dataclasses.asdict(self)
        del data["folder"]
        return data


READ_FROM = "# mbp: read from "  # a saved recipe's first line: where its import paths resolve
DEVICE_NAME = r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?"
SECTIONS: dict[str, type] = {
    "model": ModelSpec, "data": DataSpec, "batch": BatchSpec, "optim": OptimSpec,
    "schedule": ScheduleSpec, "loss": LossSpec, "train": TrainSpec, "memory": MemorySpec,
}
REQUIRED_SECTIONS = ("model", "data", "batch", "optim")
TOP_LEVEL_KEYS = ("name", "seed", *SECTIONS)


def read_recipe(path: str | Path,
                overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, list[str]]:
    """Read and override a recipe; return it (defaults where values are bad) and its problems.

    Import paths in it are looked up first in the folder a run's saved copy names on its first
    line, else in the file's own folder.
    """
    path = find_recipe(Path(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read recipe {path}: {exc}") from exc
    folder = str(path.resolve().parent)
    if text.startswith(READ_FROM):  # a run folder's copy: its imports resolve as they did
        folder = text.split("\n", 1)[0].removeprefix(READ_FROM)
    raw, problems = parse_yaml(text)
    if not isinstance(raw, dict):  # not a recipe at all: nothing else in it can be told
        if raw is not None:
            problems.append(f"the top level must be a mapping of sections, got {kind(raw)}")
        raise RecipeError(str(path), problems or ["the file is empty"])
    problems += apply_overrides(raw, overrides, tuple(SECTIONS))
    recipe = build_recipe(raw, path.stem, problems)
    return dataclasses.replace(recipe, folder=folder), problems


def dump_recipe(recipe: Recipe) -> str:
    """YAML text of a resolved recipe, in section order."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


def build_recipe(raw: dict[str, Any], default_name: str, problems: list[str]) -> Recipe:
    """Build the Recipe from a mapping of sections, appending every problem found; defaults
    fill the gaps."""
    unknown_keys(raw, TOP_LEVEL_KEYS, "", problems)
    name = typed(raw.get("name", default_name), str, "name", problems) or default_name
    seed = typed(raw.get("seed", 0), int, "seed", problems)
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        problems.append(f"seed: must be from 0 to 2**63 - 1, got {seed}")
    sections = {}
    for key, cls in SECTIONS.items():
        value = raw.get(key)
        if value is None and key in REQUIRED_SECTIONS:
            problems.append(f"{key}: missing section")
        if isinstance(value, str) and "name" in field_names(cls):
            value = {"name": value}  # `loss: mse` is short for `loss: {name: mse}`
        sections[key] = build_section(cls, value, key, problems)
    recipe = Recipe(name=name, seed=seed if isinstance(seed, int) else 0, **sections)
    _cross_checks(recipe, problems)
    return recipe


def _cross_checks(recipe: Recipe, problems: list[str]) -> None:
    batch, train = recipe.batch, recipe.train
    if isinstance(batch.micro, str) and batch.micro != "auto":
        problems.append(f"batch.micro: expected an integer or 'auto', got {batch.micro!r}")
    per_rank = batch.micro if isinstance(batch.micro, list) else []
    if isinstance(batch.micro, list) and not (per_rank and all(
            m == "auto" or _is_count(m) and (not _is_count(batch.target) or m <= batch.target)
            for m in per_rank)):
        problems.append("batch.micro: a list gives each rank its micro-batch: positive integers "
                        f"up to batch.target, or 'auto'; got {batch.micro!r}")
    shares = batch.shares
    if shares is not None and not (shares and all(
            isinstance(w, int | float) and not isinstance(w, bool) and w >= 0 for w in shares)
            and sum(shares) > 0):
        problems.append("batch.shares: expected each rank's weight, numbers >= 0 not all 0, "
                        f"such as [2, 1]; got {shares!r}")
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
    shape = recipe.data.input_shape
    if shape is not None and not (shape and all(isinstance(n, int) and not isinstance(n, bool)
                                                and n >= 1 for n in shape)):
        problems.append(f"data.input_shape: expected a list of positive integers such as "
                        f"[3, 224, 224], got {shape!r}")
    if train.precision in ("bf16", "fp16") and train.dtype != "float32":
        problems.append(f"train.precision: {train.precision} autocasts float32 parameters; "
                        f"train.dtype is {train.dtype}")
    memory = recipe.memory
    names = memory.checkpoint_modules
    if names is not None and not (names and all(isinstance(n, str) for n in names)):
        problems.append("memory.checkpoint_modules: expected a list of class names such as "
                        f"[Block], got {names!r}")
    elif names and memory.checkpointing == "off" and memory.offload == "off":
        problems.append("memory.checkpoint_modules: names blocks, but memory.checkpointing and "
                        "memory.offload are off; set memory.checkpointing: on (or auto)")
    if memory.offload_blocks is not None and memory.offload == "off":
        problems.append("memory.offload_blocks: counts blocks to offload, but memory.offload is "
                        "off; set memory.offload: on (or auto)")
    from mbp_cli.catalog.loggers import LOGGERS

    for name in train.log or []:
        if name not in LOGGERS:
            problems.append(f"train.log: {name!r} is not a logger mbp has; it has "
                            f"{', '.join(LOGGERS)}" + suggest(str(name), list(LOGGERS)))
    if train.partition is not None:
        _check_partition(recipe, problems)
    if recipe.loss.name == "auto" and isinstance(recipe.loss.args, dict) and (
            {"items", "check"} & set(recipe.loss.args)):
        problems.append("loss.args.items: goes with the model's own loss: set loss.name: model")
    held_out = recipe.data.eval
    if held_out is not None:
        problems += [f"data.eval.{key}: unknown key; data.eval takes name and args"
                     for key in held_out if key not in ("name", "args")]
        if not isinstance(held_out.get("name", ""), str) or \
                not isinstance(held_out.get("args", {}), dict):
            problems.append("data.eval: expected {name: a dataset, args: {…}}")
    if (train.steps is None) == (train.epochs is None):
        problems.append("train: give exactly one of train.steps and train.epochs")


def eval_data(recipe: Recipe) -> tuple[str, dict[str, Any]] | None:
    """data.eval as (dataset name, arguments): data's own name where it names none, and then
    data's args under its own."""
    held_out = recipe.data.eval
    if held_out is None:
        return None
    name = held_out.get("name", recipe.data.name)
    inherited = recipe.data.args if name == recipe.data.name else {}  # data's own: its args
    return name, {**inherited, **held_out.get("args", {})}


def partition_spec(recipe: Recipe) -> tuple[PartitionSpec, LabelSpec] | None:
    """train.partition and its labels as dataclasses (None: normal training)."""
    if recipe.train.partition is None:
        return None
    problems: list[str] = []
    partition = build_section(PartitionSpec, recipe.train.partition, "train.partition", problems)
    labels = build_section(LabelSpec, partition.labels, "train.partition.labels", problems)
    return partition, labels


def _check_partition(recipe: Recipe, problems: list[str]) -> None:
    found: list[str] = []
    partition = build_section(PartitionSpec, recipe.train.partition, "train.partition", found)
    if partition.labels is not None:
        labels = build_section(LabelSpec, partition.labels, "train.partition.labels", found)
        if isinstance(labels.dim, str) and labels.dim != "auto":
            found.append(f"train.partition.labels.dim: expected 'auto' or an integer, got "
                         f"{labels.dim!r}")
    at = partition.at
    if isinstance(at, list) and not (at and all(
            isinstance(a, str) or isinstance(a, int) and not isinstance(a, bool) and a >= 0
            for a in at)):
        found.append("train.partition.at: expected a list of module names (or indices of a "
                      f"Sequential) where a new part begins, such as [layer3]; got {at!r}")
    unsupported = {"train.precision: auto": recipe.train.precision == "auto",
                   "memory.checkpointing": recipe.memory.checkpointing != "off",
                   "memory.offload": recipe.memory.offload != "off",
                   "train.compile": recipe.train.compile,
                   "batch.shares": recipe.batch.shares is not None,
                   "batch.micro (a list per rank)": isinstance(recipe.batch.micro, list)}
    for key, is_set in unsupported.items():
        if is_set:
            found.append(f"{key}: not supported with train.partition (experimental) yet")
    problems += found


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def recipe_folders(recipe: Recipe) -> tuple[str, ...]:
    """Where the recipe's import paths are looked up before the current folder."""
    return (recipe.folder,) if recipe.folder else ()


def recipes_folder() -> Path:
    """Where the bundled recipes are: inside the installed package (a wheel), else the
    repository's recipes/ beside it (an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "recipes"
    return packaged if packaged.is_dir() else package.parent / "recipes"


def find_recipe(path: Path) -> Path:
    """A recipe file, or a bundled recipe by name (`digits`, `examples/tagger`)."""
    if path.is_file():
        return path
    folder = recipes_folder()
    named = folder / path.with_suffix(".yaml") if path.suffix in ("", ".yaml") else None
    if named is not None and not path.is_absolute() and named.is_file():
        return named
    names = [str(p.relative_to(folder).with_suffix("")) for p in sorted(folder.rglob("*.yaml"))]
    raise UsageError(f"recipe file not found: {path}" + (suggest(str(path), names) or
                     f" (bundled recipes, usable by name: {', '.join(names)})"))


def bundled_recipes() -> list[tuple[Path, str]]:
    """The bundled recipes, each with the first comment line of its file."""
    folder = recipes_folder()
    found = []
    for path in sorted(folder.rglob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines()
        description = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), "")
        found.append((path.relative_to(folder).with_suffix(""), description))
    return found
