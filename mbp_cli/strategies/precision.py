"""Mixed precision: autocast around forward and loss; for fp16, a loss scaler that is correct
under accumulation (every micro-batch scaled, one unscale, one decision per target batch)."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How the forward pass runs and how the gradients are scaled for one precision.

    fp16's small range needs a scaled loss; with sums of loss items backpropagated per
    micro-batch (not means) the gradients are larger by the micro-batch, so the first scale is
    the usual 2**16 divided by it, and the dynamic scaler finds its level from there.
    """

    def __init__(self, name: str, device: torch.device, micro_batch: int = 1) -> None:
        self.name = name
        self.dtype = AUTOCAST_DTYPES[name]
        self.device_type = device.type
        self.scaler: torch.amp.GradScaler | None = None
        if name == "fp16":
            first_scale = 2.0 ** max(0, 16 - math.ceil(math.log2(max(1, micro_batch))))
            self.scaler = torch.amp.GradScaler(device.type, init_scale=first_scale)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region for forward and loss (none for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss_sum: Tensor) -> None:
        """Backpropagate one micro-batch's loss sum, scaled for fp16."""
        if self.scaler is None:
            loss_sum.backward()
        else:
            self.scaler.scale(loss_sum).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the accumulated gradients by the scale once, noting any overflow."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer; with fp16, skip the whole target batch when any of its gradients
        overflowed (the scale then drops once). Return whether the optimizer stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    @property
    def scale(self) -> float | None:
        """The fp16 loss scale now (None without a scaler)."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state, for checkpoints (empty without one)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the scaler's state from a checkpoint."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
