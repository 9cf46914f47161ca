"""A model's repeated blocks, and the strategies applied around them: activation checkpointing
(recompute a block's activations in the backward pass instead of keeping them) and activation
offload (keep a block's saved activations in host memory)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mbp_cli.errors import UsageError

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
Blocks = list[tuple[str, nn.Module]]  # (qualified name, module), in forward order
Contexts = tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]


@dataclass
class Recompute:
    """Whether activation checkpointing is running a block's forward a second time (BatchNorm
    statistics must not count it twice)."""

    is_active: bool = False

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Mark the recomputation."""
        self.is_active = True
        try:
            yield
        finally:
            self.is_active = False

    def contexts(self) -> Contexts:
        """torch.utils.checkpoint's context_fn: nothing for the forward, the mark for the
        recomputation."""
        return contextlib.nullcontext(), self.recomputing()


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def find_blocks(model: nn.Module, class_names: list[str] | None = None) -> Blocks:
    """The model's blocks in forward order, as (qualified name, module).

    With `class_names`, every module of those classes (outermost only). Otherwise the repeated
    blocks: where a module has two or more children of the same class that themselves have
    children (ResNet's layers, a ViT's encoder layers, a ModuleList of transformer blocks,
    the stages of ConvNeXt, EfficientNet or MobileNet), those children are blocks — or, where
    such a child directly holds repeated children (a stage of blocks), the blocks inside it.
    Max-pooling layers outside those blocks come too: they keep int64 indices twice the size
    of their output for the backward pass, and cost next to nothing to recompute (in
    ResNet's stem they hold a fifth of what is saved).
    """
    if class_names:
        wanted = set(class_names)
        found: Blocks = []
        _collect_by_class(model, "", wanted, found)
        return found
    blocks = _repeated_blocks(model, "")
    if not blocks:
        return []
    inside = {id(m) for _, block in blocks for m in block.modules()}
    pools = [(name, m) for name, m in model.named_modules()
             if isinstance(m, MAX_POOLS) and id(m) not in inside]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(blocks + pools, key=lambda block: order[block[0]])


def _collect_by_class(module: nn.Module, prefix: str, wanted: set[str],
                      found: Blocks) -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child).__name__ in wanted:
            found.append((path, child))
        else:
            _collect_by_class(child, f"{path}.", wanted, found)


def _repeated_classes(module: nn.Module) -> set[type]:
    counts = Counter(type(c) for c in module.children() if _has_children(c))
    return {cls for cls, count in counts.items() if count >= 2}


def _repeated_blocks(module: nn.Module, prefix: str) -> Blocks:
    repeated = _repeated_classes(module)
    found: Blocks = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if type(child) in repeated and not _repeated_classes(child):
            found.append((path, child))
        else:
            found += _repeated_blocks(child, f"{path}.")
    return found


def block_classes(model: nn.Module) -> list[str]:
    """Names of the classes of the model's modules (the model itself apart) that hold
    parameters: what `memory.checkpoint_modules` may name."""
    return sorted({type(m).__name__ for name, m in model.named_modules()
                   if name and next(m.parameters(), None) is not None})


def check_blocks(model: nn.Module, class_names: list[str] | None, what: str) -> Blocks:
    """The blocks a strategy applies to, or a UsageError naming the classes to choose from."""
    blocks = find_blocks(model, class_names)
    if not blocks:
        if class_names:
            raise UsageError(f"memory.checkpoint_modules: no module of the classes {class_names} "
                             f"in {type(model).__name__}; its modules' classes are: "
                             f"{', '.join(block_classes(model))}")
        raise UsageError(f"{what}: no repeated blocks found in {type(model).__name__}; name its "
                         f"blocks' classes with memory.checkpoint_modules (one of: "
                         f"{', '.join(block_classes(model)) or 'none'})")
    return blocks


def _is_parameter(tensor: Tensor) -> bool:
    """A parameter, or a view of one: it stays on the device whatever we do with activations."""
    base = tensor if tensor._base is None else tensor._base
    return base.is_leaf and base.requires_grad


@contextlib.contextmanager
def offloaded(*, estimate: bool = False) -> Iterator[None]:
    """Keep the activations saved for the backward pass in host memory (pinned when CUDA is
    there), copied back when the backward pass needs them; parameters stay where they are.

    With `estimate` (fake tensors) nothing is copied: only the shape is kept, so the saved
    activation takes no device memory until the backward pass brings it back, as with a copy.
    """
    pin = torch.cuda.is_available()

    def pack(tensor: Tensor) -> tuple[str, Any]:
        if _is_parameter(tensor):
            return "kept", tensor
        if estimate:
            return "shape", (tensor.device, tensor.size(), tensor.stride(), tensor.dtype)
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout,
                           pin_memory=pin and not tensor.is_sparse)
        host.copy_(tensor, non_blocking=pin)
        return tensor.device.type, (tensor.device, host)

    def unpack(packed: tuple[str, Any]) -> Tensor:
        how, value = packed
        if how == "kept":
            return value
        if how == "shape":
            device, size, stride, dtype = value
            return torch.empty_strided(size, stride, dtype=dtype, device=device).zero_()
        device, host = value
        return host.to(device, non_blocking=pin)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@dataclass
class BlockStrategies:
    """Checkpointing and/or offload applied to blocks by replacing each block's `forward` on
    the instance (the state dict keeps its keys); `remove()` puts the forwards back."""

    blocks: Blocks
    checkpointing: bool = False
    offload_blocks: int = 0  # the first k blocks' activations go to host memory
    estimate: bool = False
    recompute: Recompute = field(default_factory=Recompute)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def apply(self) -> BlockStrategies:
        """Wrap the blocks' forwards; returns itself."""
        for index, (_, block) in enumerate(self.blocks):
            is_offloaded = index < self.offload_blocks
            if self.checkpointing or is_offloaded:
                self._wrap(block, is_offloaded)
        return self

    def _wrap(self, block: nn.Module, is_offloaded: bool) -> None:
        original = block.forward
        had_own = "forward" in block.__dict__
        recompute, checkpointing, estimate = self.recompute, self.checkpointing, self.estimate

        def forward(*args: Any, **kwargs: Any) -> Any:
            context = offloaded(estimate=estimate) if is_offloaded else contextlib.nullcontext()
            with context:
                if checkpointing and torch.is_grad_enabled():
                    # Compiled, the recompute is the compiler's own (BatchNorm's update is not
                    # run twice) and it takes no context_fn but dispatch modes: none is given.
                    marks = {} if torch.compiler.is_compiling() else {
                        "context_fn": recompute.contexts}
                    return checkpoint(original, *args, use_reentrant=False, **marks, **kwargs)
                return original(*args, **kwargs)

        block.forward = forward

        def undo() -> None:
            if had_own:
                block.forward = original
            else:
                del block.forward

        self._undo.append(undo)

    def remove(self) -> None:
        """Put every block's own forward back."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def describe(self) -> str:
        """Which blocks are wrapped, for messages: `layer1.0 … layer4.1`."""
        count = len(self.blocks) if self.checkpointing else self.offload_blocks
        names = [name for name, _ in self.blocks[:count]]
        return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
