"""One training step's peak memory at a micro-batch size (CUDA allocator or tracked tensors), and
the model, optimizer and RNG put back afterwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from mbp_cli.data.samples import BatchMaker
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.memory.attention import DeviceAttention
from mbp_cli.memory.fit import Measurement
from mbp_cli.memory.tracker import (
    StorageTracker,
    free_cached_memory,
    training_state_tensors,
    unless_out_of_memory,
)
from mbp_cli.rng import restore_rng_states, rng_states


@dataclass
class StepRunner:
    """Runs one complete training step at a micro-batch size and reports its peak memory."""

    micro_step: MicroStep
    optimizer: torch.optim.Optimizer
    make_batch: BatchMaker
    backend: str
    capacity_bytes: int | None = None  # the simulated device's
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    attention: DeviceAttention | None = None  # an estimate's: the asked-about device's kernel

    @property
    def model(self) -> nn.Module:
        """The model being measured."""
        return self.micro_step.model

    @property
    def device(self) -> torch.device:
        """Where it runs."""
        return self.micro_step.device

    def measure(self, micro_batch: int) -> Measurement:
        """Forward, backward and optimizer step (state created) at `micro_batch`; grads cleared."""
        attention = self.attention.active() if self.attention else contextlib.nullcontext()
        with self.context(), attention:
            measured = unless_out_of_memory(lambda: self._measure(micro_batch), self.device,
                                            self.optimizer)
        return measured or Measurement(micro_batch, None)

    def _measure(self, micro_batch: int) -> Measurement:
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.make_batch(micro_batch)
        is_cuda = self.backend == "cuda"
        tracker = None if is_cuda else StorageTracker(self.capacity_bytes)
        if tracker is not None:
            tracker.register([*training_state_tensors(self.model, self.optimizer),
                              *tree_leaves(batch)])
        if is_cuda:
            free_cached_memory(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        with tracker if tracker is not None else contextlib.nullcontext():
            result = self.micro_step(batch)
            self.micro_step.precision.backward(result.loss_sum)  # scaled, as training does
            del result  # the output and the graph go before the optimizer step, as in training
            step_bytes = self._peak(tracker)
            self._reset_peak(tracker)
            self.optimizer.step()
            optimizer_bytes = self._peak(tracker)
            self.optimizer.zero_grad(set_to_none=True)
        seconds = None if self.backend == "estimate" else time.perf_counter() - started
        reserved = int(torch.cuda.max_memory_reserved(self.device)) if is_cuda else None
        return Measurement(micro_batch, max(step_bytes, optimizer_bytes), step_bytes,
                           optimizer_bytes, seconds, reserved)

    def _peak(self, tracker: StorageTracker | None) -> int:
        if tracker is not None:
            return tracker.peak_bytes
        torch.cuda.synchronize(self.device)  # the allocator's figure after the queued work
        return int(torch.cuda.max_memory_allocated(self.device))

    def _reset_peak(self, tracker: StorageTracker | None) -> None:
        if tracker is not None:
            tracker.reset_peak()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)


@contextlib.contextmanager
def preserved_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                             device: torch.device) -> Iterator[None]:
    """Put model, optimizer and every RNG back exactly as they were, and free what was used."""

    def to_cpu(value: Any) -> Any:
        return value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else value

    model_state = tree_map(to_cpu, model.state_dict())
    optimizer_state = tree_map(to_cpu, optimizer.state_dict())
    rng = rng_states()
    try:
        yield
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        restore_rng_states(rng)
        free_cached_memory(device)
