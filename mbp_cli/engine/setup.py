"""A run built from its recipe: the device resolved, then data, model, loss and the micro-step."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mbp_cli.catalog.losses import LossFn
from mbp_cli.distributed.ranks import Ranks
from mbp_cli.distributed.world import World
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.engine.model import DTYPES, build_loss, build_model, has_batch_norm, spare_counting
from mbp_cli.engine.splits import build_collate, build_data
from mbp_cli.errors import UsageError
from mbp_cli.recipe.spec import Recipe
from mbp_cli.strategies.batchnorm import TargetBatchStatistics
from mbp_cli.strategies.blocks import BlockStrategies, Recompute, check_blocks, find_blocks
from mbp_cli.strategies.choice import StrategyChoice, check_choice
from mbp_cli.strategies.precision import Precision


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


def start_warnings(setup: Setup, choice: StrategyChoice, micro_batch: int, target_batch: int,
                   world: World) -> list[str]:
    """What the run should know before it trains: where it is not exact, or slow."""
    model, warnings = setup.model, []
    if world.is_distributed and any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p
                                    for m in model.modules()):
        warnings.append("the model has dropout: each rank draws its own masks, so the run "
                        "equals a single process's in distribution, not number for number")
    if choice.precision == "fp16" and setup.device.type == "cpu":
        warnings.append("train.precision: fp16 on the CPU runs slowly (autocast has few fp16 "
                        "kernels there, and nothing needs its loss scaling); bf16 is the CPU's "
                        "format")
    if has_batch_norm(model) and micro_batch < target_batch and not setup.freeze_batchnorm:
        warnings.append(
            "the model has BatchNorm layers: they normalize by the statistics of each "
            f"micro-batch of {micro_batch}, so training is not exactly equal to full "
            f"batches of {target_batch} (their running statistics are updated once per target "
            "batch, as a full batch would; batch.batchnorm: frozen keeps them in eval mode, for "
            "fine-tuning)")
    return warnings
