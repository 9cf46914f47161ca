"""The estimate (`--estimate`): the recipe's model and optimizer on fake tensors, fake batches."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from mbp_cli.data.samples import BatchMaker
from mbp_cli.engine.model import DTYPES, build_loss, build_model, spare_counting
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.samples import sample_batch
from mbp_cli.engine.setup import Setup, build_micro_step
from mbp_cli.memory.attention import DeviceAttention
from mbp_cli.memory.measure import StepRunner
from mbp_cli.recipe.spec import Recipe

CUDA = torch.device("cuda")  # what an estimate is about unless told


@dataclass(frozen=True)
class FakeParts:
    """What an estimate measures in: the fake tensor mode, fake batches of any size, and the
    device asked about (whose attention kernel the step runs)."""

    mode: FakeTensorMode
    make_batch: BatchMaker
    device_type: str = "cuda"

    def runner(self, setup: Setup, optimizer: torch.optim.Optimizer) -> StepRunner:
        """Steps of the setup's current micro-step, run on fake tensors."""
        return StepRunner(setup.micro_step, optimizer, self.make_batch, "estimate",
                          context=lambda: self.mode,
                          attention=DeviceAttention(self.device_type))


@contextlib.contextmanager
def quiet_fake_kernels(is_estimate: bool) -> Iterator[None]:
    """Fake tensors log a traceback for a kernel that refuses its shapes before raising; the
    error itself is explained, once."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    if is_estimate:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def fake_setup(recipe: Recipe, device: torch.device = CUDA,
               ) -> tuple[Setup, torch.optim.Optimizer, FakeParts]:
    """The recipe's model and optimizer on fake tensors (no data: fake batches are made), for
    an estimate about `device`."""
    sample, train_set = sample_batch(recipe, 1)
    fake_mode = FakeTensorMode()
    with torch.device("meta"):  # initialized on meta: some inits (ViT's) read values
        model = build_model(recipe, torch.device("cpu"), is_fake=True)
    with fake_mode:
        fake_parameters(model)
        optimizer = build_optimizer(recipe, model)
        loss_fn = build_loss(recipe, model)
    loss_fn = spare_counting(loss_fn, train_set)  # read from the real data

    def make_fake_batch(size: int) -> Any:
        return tree_map(lambda t: torch.zeros((size, *t.shape[1:]), dtype=t.dtype)
                        if isinstance(t, Tensor) else t, sample)

    micro_step = build_micro_step(recipe, model, loss_fn, torch.device("cpu"),
                                  DTYPES[recipe.train.dtype])
    setup = Setup(micro_step, [], None, freeze_batchnorm=recipe.batch.batchnorm == "frozen",
                  block_classes=recipe.memory.checkpoint_modules)
    return setup, optimizer, FakeParts(fake_mode, make_fake_batch, device.type)


def fake_parameters(model: nn.Module) -> None:
    """Replace a meta model's parameters and buffers by fake CPU tensors of the same shapes and
    dtypes (tied ones stay tied); call inside the FakeTensorMode."""
    made: dict[int, Tensor] = {}

    def fake(tensor: Tensor) -> Tensor:
        if id(tensor) not in made:
            empty = torch.empty(tensor.shape, dtype=tensor.dtype)
            made[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else empty)
        return made[id(tensor)]

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    table[name] = fake(tensor)
