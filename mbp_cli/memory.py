"""Peak memory of a run: the CUDA allocator's figure on a GPU, the process's peak RSS on a CPU."""

from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    """Reads the peak memory since construction (CUDA) or since the process started (CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(device)

    @property
    def source(self) -> str:
        """What the figure measures, for the summary."""
        return "cuda_max_memory_allocated" if self.is_cuda else "process_peak_rss"

    def peak_bytes(self) -> int:
        """The peak so far, in bytes."""
        if self.is_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
