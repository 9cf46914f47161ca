"""Memory of a training step: CUDA's allocator, or live tensor storage tracked op by op."""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from mbp_cli.errors import is_out_of_memory

T = TypeVar("T")
BLOCK_BYTES = 512  # CUDA's caching allocator rounds every allocation up to 512-byte blocks


class SimulatedOutOfMemoryError(torch.OutOfMemoryError):
    """Raised by a StorageTracker with a capacity, as CUDA raises when memory runs out."""


def unless_out_of_memory(run: Callable[[], T], device: torch.device,
                         holder: torch.nn.Module | torch.optim.Optimizer) -> T | None:
    """`run()`, or None when it ran out of memory: then the gradients it left in `holder` are
    cleared (a backward that failed halfway leaves partial sums) and memory is freed. Any other
    error is raised."""
    try:
        return run()
    except Exception as exc:  # sorted just below: only out-of-memory is handled
        if not is_out_of_memory(exc):
            raise
    # Out of the except block: its traceback no longer holds the failed step's tensors.
    holder.zero_grad(set_to_none=True)
    free_cached_memory(device)
    return None


def round_to_block(nbytes: int) -> int:
    """Bytes an allocation of `nbytes` takes in CUDA's caching allocator."""
    return -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages, as seen op by op, and their peak.

    Tensors made before the mode was entered (parameters, optimizer state, the batch) are added
    with `register`. A storage is counted once however many views share it, and uncounted when
    it is freed. With `capacity_bytes` set it is a simulated device: an op whose output would
    take live memory past the capacity raises SimulatedOutOfMemoryError.
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        super().__init__()
        self.capacity_bytes = capacity_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def register(self, tensors: Iterable[Any]) -> None:
        """Count tensors that already exist (anything that is not a tensor is skipped)."""
        for value in tensors:
            if isinstance(value, torch.Tensor):
                self._add(value)

    def reset_peak(self) -> None:
        """Start a new peak from the memory live now."""
        self.peak_bytes = self.live_bytes

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._sizes:
            return
        size = round_to_block(storage.nbytes())
        self._sizes[storage] = size
        self.live_bytes += size
        weakref.finalize(storage, self._free, size)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _free(self, size: int) -> None:
        self.live_bytes -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        peak_before = self.peak_bytes
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._add(value)
        if self.capacity_bytes is not None and self.live_bytes > self.capacity_bytes:
            message = (f"simulated device out of memory: {self.live_bytes:,} bytes needed, "
                       f"capacity {self.capacity_bytes:,} bytes (while running {func})")
            self.peak_bytes = peak_before  # as a device's peak, the refused allocation never was
            # Drop every reference to the failed output: the traceback keeps this frame alive.
            out = value = None
            raise SimulatedOutOfMemoryError(message)
        return out


def training_state_tensors(model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Parameters, their gradients and the optimizer's state: what a step keeps between steps."""
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += list(model.buffers())
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in tree_leaves(state)
                    if isinstance(v, torch.Tensor)]
    return tensors


def free_cached_memory(device: torch.device) -> None:
    """Collect garbage (running storage finalizers) and return CUDA's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def available_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's `mem_get_info`, else the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class PeakMemory:
    """The run's peak of tensor memory: CUDA's max_memory_allocated, a simulated device's
    peak, or on the CPU the live tensors tracked over the first MEASURED_STEPS target batches
    (memory is flat in the target batch; tracking every op all run long would slow it). The
    process's peak RSS — mostly torch's own libraries on a CPU — is kept apart."""

    MEASURED_STEPS = 2

    def __init__(self, device: torch.device, tracker: StorageTracker | None = None,
                 state: Callable[[], list[torch.Tensor]] | None = None) -> None:
        """`state`: the tensors a step keeps between steps, for the CPU's measurement (none:
        the peak RSS stands in, as under torch.compile)."""
        self.device, self.tracker, self.state = device, tracker, state
        self.measured, self.measured_peak = 0, 0
        self.active: StorageTracker | None = None  # measuring the target batch in progress
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @property
    def source(self) -> str:
        """What the figure measures, for the summary."""
        if self.device.type == "cuda":
            return "cuda_max_memory_allocated"
        if self.tracker is not None:
            return "tracked_tensors"
        return "tracked_tensors_first_steps" if self.measured else "process_peak_rss"

    def measuring(self) -> contextlib.AbstractContextManager:
        """Around a target batch and its update: on the CPU, the first ones tracked."""
        if self.device.type == "cuda" or self.tracker is not None or self.state is None \
                or self.measured >= self.MEASURED_STEPS:
            return contextlib.nullcontext()
        return self._tracked()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self.active = StorageTracker()
        self.active.register(self.state())
        try:
            with self.active:
                yield
            self.measured += 1
            self.measured_peak = max(self.measured_peak, self.active.peak_bytes)
        finally:
            self.active = None

    def peak_bytes(self) -> int:
        """The peak so far, in bytes."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.tracker is not None:
            return self.tracker.peak_bytes
        if self.active is not None:
            return max(self.measured_peak, self.active.peak_bytes)
        return self.measured_peak if self.measured else process_peak_rss()


def process_peak_rss() -> int:
    """The process's peak resident memory, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
