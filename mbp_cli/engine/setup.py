"""A run built from its recipe: device, data, model, loss, optimizer (real or fake), schedule."""

from __future__ import annotations

import functools
import inspect
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mbp_cli.catalog.datasets import TensorPairs, build_split, hold_out, image_transform, is_stream
from mbp_cli.catalog.losses import ClassificationLoss, LossFn
from mbp_cli.catalog.model_loss import ModelLoss, is_hugging_face, takes_labels
from mbp_cli.catalog.pretrained import build_pretrained, weights_transforms
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.errors import UsageError, users_code
from mbp_cli.recipe import registry
from mbp_cli.recipe.spec import Recipe, ScheduleSpec, eval_data, recipe_folders
from mbp_cli.strategies.batchnorm import TargetBatchStatistics
from mbp_cli.strategies.blocks import BlockStrategies, Recompute, check_blocks, find_blocks
from mbp_cli.strategies.choice import StrategyChoice, check_choice
from mbp_cli.strategies.precision import Precision

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
    """Everything a run builds from its recipe: the data, the micro-step (which holds the
    model, the loss, the device, the dtype and the precision) and the memory strategies."""

    micro_step: MicroStep
    train_set: Dataset
    eval_set: Dataset | None
    collate: Callable[[list[Any]], Any] | None = None  # data.collate, else torch's default
    freeze_batchnorm: bool = False  # batch.batchnorm: frozen
    block_classes: list[str] | None = None  # memory.checkpoint_modules
    choice: StrategyChoice = field(default_factory=StrategyChoice)
    recompute: Recompute = field(default_factory=Recompute)
    _blocks: list[tuple[str, nn.Module]] | None = None
    _wrapped: BlockStrategies | None = None
    _statistics: TargetBatchStatistics | None = None

    def blocks(self, what: str = "memory.checkpointing") -> list[tuple[str, nn.Module]]:
        """The model's blocks that checkpointing and offload wrap (found once); a UsageError
        naming the classes to choose from when there are none."""
        if self._blocks is None:
            self._blocks = check_blocks(self.model, self.block_classes, what)
        return self._blocks

    def block_count(self) -> int:
        """How many blocks the strategies could wrap (0: none found)."""
        if self._blocks is None:
            return len(find_blocks(self.model, self.block_classes))
        return len(self._blocks)

    def use(self, choice: StrategyChoice, *, estimate: bool = False,
            micro_batch: int = 1) -> None:
        """Run with these strategies from now on (replacing the ones used before); fp16's
        first loss scale suits `micro_batch`."""
        check_choice(choice, self.device, estimate=estimate)
        if self._wrapped is not None:
            self._wrapped.remove()
            self._wrapped = None
        if choice.checkpointing or choice.offload_blocks:
            what = "memory.checkpointing" if choice.checkpointing else "memory.offload"
            self._wrapped = BlockStrategies(self.blocks(what), choice.checkpointing,
                                            choice.offload_blocks, estimate,
                                            self.recompute).apply()
        self.micro_step.precision = Precision(choice.precision, self.device, micro_batch)
        self.choice = choice

    def describe_blocks(self) -> str:
        """Which blocks the strategies wrap now ('' when none)."""
        return self._wrapped.describe() if self._wrapped is not None else ""

    def target_batch(self, ranks: Ranks | None = None) -> AbstractContextManager:
        """Around one target batch: BatchNorm's running statistics updated once at its end
        (from every rank's micro-batches)."""
        if self.freeze_batchnorm:
            return nullcontext()
        if self._statistics is None:
            self._statistics = TargetBatchStatistics(self.model, self.recompute)
        return self._statistics.target_batch(ranks)

    def train_mode(self) -> None:
        """The model in training mode; BatchNorm layers kept in eval mode where frozen (their
        running statistics are used and not updated, so every split is exact)."""
        self.model.train()
        if self.freeze_batchnorm:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @property
    def model(self) -> nn.Module:
        """The model being trained."""
        return self.micro_step.model

    @property
    def loss_fn(self) -> LossFn:
        """The loss as (sum, count)."""
        return self.micro_step.loss_fn

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.micro_step.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' and floating-point inputs' dtype."""
        return self.micro_step.dtype


def build(recipe: Recipe, device: torch.device, *, with_weights: bool = True) -> Setup:
    """Seed every generator, then build data, model and loss as the recipe names them
    (pretrained weights loaded unless `with_weights` is False: a run's model.pt fills them)."""
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    train_set, eval_set = build_data(recipe)
    model = build_model(recipe, device, with_weights=with_weights)
    if recipe.train.compile:
        model.compile()  # in place: the state dict keeps its keys
    loss_fn = spare_counting(build_loss(recipe, model), train_set, eval_set)
    micro_step = build_micro_step(recipe, model, loss_fn, device, DTYPES[recipe.train.dtype])
    return Setup(micro_step, train_set, eval_set, build_collate(recipe),
                 freeze_batchnorm=recipe.batch.batchnorm == "frozen",
                 block_classes=recipe.memory.checkpoint_modules)


def build_micro_step(recipe: Recipe, model: nn.Module, loss_fn: LossFn, device: torch.device,
                     dtype: torch.dtype) -> MicroStep:
    """The micro-step with the recipe's output and target keys."""
    return MicroStep(model, loss_fn, device, dtype, output_key=recipe.model.output,
                     target_key=recipe.data.target)


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
    with users_code(f"loss {name}") if builder.is_users else nullcontext():
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


def build_collate(recipe: Recipe) -> Callable[[list[Any]], Any] | None:
    """data.collate, its errors shown as the user's own; None for torch's default."""
    if recipe.data.collate is None:
        return None
    collate = registry.import_path(recipe.data.collate, recipe_folders(recipe))
    return functools.partial(_users_collate, collate, recipe.data.collate)


def _users_collate(collate: Callable[[list[Any]], Any], name: str, samples: list[Any]) -> Any:
    with users_code(f"data.collate {name}"):
        return collate(samples)


def check_not_empty(recipe: Recipe, train_samples: int) -> None:
    """Refuse a training split without samples."""
    if train_samples == 0:
        raise UsageError(f"data: the training split of {recipe.data.name} is empty")


def check_target_batch(recipe: Recipe, train_samples: int) -> None:
    """Refuse a target batch larger than the training split: each step would be an epoch."""
    check_not_empty(recipe, train_samples)
    target = recipe.batch.target
    if train_samples < target:
        raise UsageError(f"batch.target: {target} is larger than the training split of "
                         f"{train_samples} samples, so every step would be one whole epoch; "
                         f"for full-batch training set batch.target: {train_samples}")


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
        raise UsageError(f"optim.args {recipe.optim.args}: {recipe.optim.name} refused them: "
                         f"{exc}") from exc


def build_data(recipe: Recipe) -> tuple[Dataset, Dataset | None]:
    """The training split and the held-out split (data.eval's dataset, else the dataset's own
    test split, else a seeded fraction), each with its transforms."""
    spec = recipe.data
    data = registry.find_dataset(spec.name, recipe_folders(recipe))
    train_tf, eval_tf = split_transforms(recipe, data.is_torchvision)

    def split(train: bool, transform: Any) -> Dataset | None:
        return build_split(data.fn, spec.args, train=train, transform=transform,
                           is_users=data.is_users)

    train_set = split(True, train_tf)
    held_out = eval_data(recipe)
    if held_out is not None:  # data.eval: a dataset of its own, its test split or all of it
        source = registry.find_dataset(held_out[0], recipe_folders(recipe))

        def eval_split(train: bool) -> Dataset | None:
            return build_split(source.fn, held_out[1], train=train, transform=eval_tf,
                               is_users=source.is_users)

        eval_set = eval_split(False)
        return train_set, eval_split(True) if eval_set is None else eval_set
    eval_set = split(False, eval_tf)
    if eval_set is None and not is_stream(train_set):  # a stream's held-out: its own split
        eval_source = split(True, eval_tf) if eval_tf is not train_tf else None
        train_set, eval_set = hold_out(train_set, spec.eval_fraction, recipe.seed, eval_source)
    return train_set, eval_set


def held_out_words(recipe: Recipe) -> str:
    """Which samples the held-out split is, in words (what `mbp eval` scored)."""
    held_out = eval_data(recipe)
    if held_out is not None:
        args = ", ".join(f"{key}={value}" for key, value in held_out[1].items())
        return f"{held_out[0]}({args}), data.eval's"
    builder = registry.find_dataset(recipe.data.name, recipe_folders(recipe))
    if {"train", "split"} & set(inspect.signature(builder.fn).parameters):
        return f"the test split of {recipe.data.name}"
    return f"{recipe.data.eval_fraction:.0%} of {recipe.data.name}, held out by seed"


def split_transforms(recipe: Recipe, is_torchvision: bool) -> tuple[Any, Any]:
    """(training, held-out) image transforms: the recipe's, else the pretrained weights' own,
    else resize and normalize; None for datasets that are not images."""
    spec = recipe.data
    asked = spec.transforms is not None or spec.eval_transforms is not None
    if not (is_torchvision or asked or spec.resize or spec.normalize):
        return None, None
    preset = None
    if "weights" in recipe.model.args and recipe.model.name in _torchvision_models():
        preset = weights_transforms(recipe.model.name, recipe.model.args)
    if preset is not None and not asked:
        return preset, preset
    train_tf = image_transform(spec.transforms, resize=spec.resize, normalize=spec.normalize)
    if spec.eval_transforms is None and not spec.transforms:
        return train_tf, train_tf
    return train_tf, image_transform(spec.eval_transforms, resize=spec.resize,
                                     normalize=spec.normalize)


def _torchvision_models() -> list[str]:
    import torchvision.models

    return torchvision.models.list_models()


def build_model(recipe: Recipe, device: torch.device, *, is_fake: bool = False,
                with_weights: bool = True) -> nn.Module:
    """The recipe's model in the training dtype on the device (pretrained weights loaded and
    the head replaced where the recipe asks; without them for fake tensors or `with_weights`
    False, the same shapes from a fresh model)."""
    dtype = DTYPES[recipe.train.dtype]
    spec = recipe.model
    builder = registry.find_model(spec.name, recipe_folders(recipe))
    if builder.is_torchvision and spec.args.get("weights") is not None and not is_fake:
        model = build_pretrained(spec.name, spec.args, spec.head, load=with_weights)
        return model.to(device, dtype)
    # fake tensors: torchvision's shapes without its weights (a builder of your own keeps any
    # argument named weights)
    args = {k: v for k, v in spec.args.items() if k != "weights" or not builder.is_torchvision}
    make = functools.partial(builder.fn, **args)
    guard = users_code(f"model {spec.name}") if builder.is_users else nullcontext()
    if not is_fake:
        with guard:
            return without_cache(make().to(device, dtype))
    # Fake parameters cannot be converted after the fact: build them in the training dtype.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with guard:
            return without_cache(make())
    finally:
        torch.set_default_dtype(default_dtype)


def without_cache(model: nn.Module) -> nn.Module:
    """A Hugging Face model set not to keep its key-value cache: training never reads it, and
    activation checkpointing's recompute would fill it a second time (a size mismatch)."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
    return model


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
