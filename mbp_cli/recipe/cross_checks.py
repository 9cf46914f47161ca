"""The checks that read more than one field of a recipe, each problem added to the list."""

from __future__ import annotations

import math
import re
from typing import Any

from mbp_cli.errors import suggest
from mbp_cli.recipe.fields import build_section
from mbp_cli.recipe.spec import LabelSpec, PartitionSpec, Recipe
from mbp_cli.units import parse_bytes

DEVICE_NAME = r"auto|cpu|mps|(cuda|xpu)(:[0-9]+)?"


def cross_check(recipe: Recipe, problems: list[str]) -> None:
    """Append each problem that no one field shows alone: values that contradict each other,
    list and name formats, train.partition and what it does not support yet."""
    batch, train = recipe.batch, recipe.train
    if isinstance(recipe.optim.args, dict):
        problems += [f"optim.args.{key}: {value} is not a finite number (an update with it "
                     "makes the weights infinite or NaN)"
                     for key, value in recipe.optim.args.items()
                     if isinstance(value, float) and not math.isfinite(value)]
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

