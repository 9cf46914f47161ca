"""Which strategies a run uses: the recipe's, or for `auto` the candidates the probe weighs."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mbp_cli.errors import UsageError
from mbp_cli.recipe.spec import Recipe


@dataclass(frozen=True)
class StrategyChoice:
    """One combination of strategies."""

    precision: str = "fp32"
    checkpointing: bool = False
    offload_blocks: int = 0  # the first k blocks' saved activations in host memory

    @property
    def label(self) -> str:
        """`bf16 + checkpointing`, `fp32 + offload 4 blocks`, `fp32`."""
        parts = [self.precision]
        if self.checkpointing:
            parts.append("checkpointing")
        if self.offload_blocks:
            parts.append(f"offload {self.offload_blocks} blocks")
        return " + ".join(parts)

    @property
    def cost(self) -> int:
        """How much work the strategies add, to break ties without timings: recomputing a
        block costs more than copying its activations; bf16 costs nothing."""
        return 2 * self.checkpointing + bool(self.offload_blocks)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for probe.json and --json."""
        return asdict(self)

    @property
    def recipe_keys(self) -> str:
        """The recipe keys that train with these strategies, as --set would take them."""
        keys = [f"train.precision={self.precision}",
                f"memory.checkpointing={'on' if self.checkpointing else 'off'}",
                f"memory.offload={'on' if self.offload_blocks else 'off'}"]
        if self.offload_blocks:
            keys.append(f"memory.offload_blocks={self.offload_blocks}")
        return " ".join(keys)


def offload_refusal(device: torch.device) -> str:
    """Why offload means nothing on this device (empty when it applies)."""
    if device.type == "cuda":
        return ""
    return (f"memory.offload: activations on a {device.type} device already live in host "
            "memory, so there is nothing to offload (it moves them from a CUDA GPU; ask "
            "`mbp probe --estimate` about a GPU)")


def refuse_offload_here(device: torch.device) -> None:
    """A UsageError with the reason where offload means nothing on this device."""
    reason = offload_refusal(device)
    if reason:
        raise UsageError(reason)


def is_auto(recipe: Recipe) -> bool:
    """Whether the recipe leaves a strategy for the probe to choose."""
    return "auto" in (recipe.train.precision, recipe.memory.checkpointing, recipe.memory.offload)


def blocks_to_offload(recipe: Recipe, block_count: int) -> int:
    """memory.offload_blocks, or every block; more than the model has is refused."""
    wanted = recipe.memory.offload_blocks
    if wanted is not None and wanted > block_count:
        raise UsageError(f"memory.offload_blocks: {wanted}, but the model has {block_count} "
                         "blocks to offload; leave it out to offload them all")
    return wanted or block_count


def fixed_choice(recipe: Recipe, device: torch.device, count_blocks: Callable[[], int], *,
                 estimate: bool = False) -> StrategyChoice:
    """The recipe's own choice where it names one (auto counts as off here); offload refused
    where it means nothing. `count_blocks` is asked only for offload, and raises where the
    model has no blocks."""
    memory = recipe.memory
    offload = 0
    if memory.offload == "on":
        if not estimate:
            refuse_offload_here(device)
        block_count = count_blocks()
        offload = blocks_to_offload(recipe, block_count)
    precision = recipe.train.precision if recipe.train.precision != "auto" else "fp32"
    return StrategyChoice(precision, memory.checkpointing == "on", offload)


def candidates(recipe: Recipe, device: torch.device, block_count: int, *, estimate: bool,
               every: bool = False) -> list[StrategyChoice]:
    """The combinations to weigh: each `auto` (or, with `every`, each strategy) tried off and
    on, the others as the recipe sets them. bf16 where the device runs it; offload on CUDA
    (or in an estimate); block strategies where the model has blocks."""
    fixed = fixed_choice(recipe, device, lambda: block_count, estimate=estimate)
    memory = recipe.memory
    bf16 = device.type == "cpu" or estimate or (device.type == "cuda"
                                                 and torch.cuda.is_bf16_supported())
    precisions = [fixed.precision]
    if every or recipe.train.precision == "auto":
        precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
        if every and fixed.precision not in precisions:
            precisions.append(fixed.precision)  # the recipe's own fp16, weighed with them
    checkpointing = [False, True] if block_count and (every or memory.checkpointing == "auto") \
        else [fixed.checkpointing]
    offload_applies = block_count and (estimate or not offload_refusal(device))
    offloads = [0, blocks_to_offload(recipe, block_count)] \
        if offload_applies and (every or memory.offload == "auto") else [fixed.offload_blocks]
    found = []
    for precision, is_checkpointed, offload in itertools.product(precisions, checkpointing,
                                                                 offloads):
        if is_checkpointed and offload:
            continue  # a checkpointed block keeps only its input: little left to offload
        found.append(StrategyChoice(precision, is_checkpointed, offload))
    return found


def check_choice(choice: StrategyChoice, device: torch.device, *, estimate: bool) -> None:
    """Refuse what cannot run here, with the reason."""
    if choice.offload_blocks and not estimate:
        refuse_offload_here(device)
    if choice.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("train.precision: bf16 is not supported by this GPU; use fp16")
