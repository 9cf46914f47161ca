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
from torch.utils._pytree import tree_map
from torch.utils.data import Dataset, default_collate

from mbp_cli.accumulate import to_device
from mbp_cli.datasets import TensorPairs
from mbp_cli.losses import LossFn
from mbp_cli.memory.fit import Measurement
from mbp_cli.memory.tracker import (
    StorageTracker,
    free_cached_memory,
    is_out_of_memory,
    training_state_tensors,
)
from mbp_cli.rng import restore_rng_states, rng_states

BatchMaker = Callable[[int], tuple[Tensor, Tensor]]


@dataclass
class StepRunner:
    """Runs one complete training step at a micro-batch size and reports its peak memory."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    make_batch: BatchMaker
    device: torch.device
    dtype: torch.dtype
    backend: str
    capacity_bytes: int | None = None  # the simulated device's
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def measure(self, micro_batch: int) -> Measurement:
        """Forward, backward and optimizer step (state created) at `micro_batch`; grads cleared."""
        with self.context():
            try:
                return self._measure(micro_batch)
            except Exception as exc:  # sorted just below: only out-of-memory is handled
                if not is_out_of_memory(exc):
                    raise
            # Out of the except block: its traceback no longer holds the failed step's tensors.
            self.optimizer.zero_grad(set_to_none=True)
            free_cached_memory(self.device)
            return Measurement(micro_batch, None)

    def _measure(self, micro_batch: int) -> Measurement:
        self.optimizer.zero_grad(set_to_none=True)
        inputs, targets = self.make_batch(micro_batch)
        inputs = to_device(inputs, self.device, self.dtype)
        targets = to_device(targets, self.device, self.dtype)
        is_cuda = self.backend == "cuda"
        tracker = None if is_cuda else StorageTracker(self.capacity_bytes)
        if tracker is not None:
            tracker.register([*training_state_tensors(self.model, self.optimizer), inputs, targets])
        if is_cuda:
            free_cached_memory(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        with tracker if tracker is not None else contextlib.nullcontext():
            loss_sum, _ = self.loss_fn(self.model(inputs), targets)
            loss_sum.backward()
            del loss_sum
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


def batch_maker(dataset: Dataset) -> BatchMaker:
    """Real micro-batches of any size from the start of a dataset (wrapping round if short)."""

    def make(size: int) -> tuple[Tensor, Tensor]:
        indices = [i % len(dataset) for i in range(size)]
        if isinstance(dataset, TensorPairs):
            return dataset.__getitems__(indices)
        return default_collate([dataset[i] for i in indices])

    return make


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
