"""How peak memory grows with the micro-batch: the fit, the prediction, the choice (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """One real (or fake-tensor) training step at a micro-batch size."""

    micro_batch: int
    peak_bytes: int | None  # None: it ran out of memory
    step_bytes: int | None = None  # peak of forward + backward (grows with the micro-batch)
    optimizer_bytes: int | None = None  # peak of the optimizer step (does not grow)
    step_seconds: float | None = None
    reserved_bytes: int | None = None  # CUDA's max_memory_reserved: allocated plus cache

    def fits(self, usable_bytes: float) -> bool:
        """Whether this step ran and stayed within `usable_bytes`."""
        return self.peak_bytes is not None and self.peak_bytes <= usable_bytes


@dataclass(frozen=True)
class Fit:
    """peak(m) = max(fixed_bytes + per_sample_bytes × m, floor_bytes)."""

    fixed_bytes: float
    per_sample_bytes: float
    floor_bytes: int  # the optimizer step's peak

    def predict(self, micro_batch: int) -> float:
        """Predicted peak bytes of a step at `micro_batch`."""
        return max(self.fixed_bytes + self.per_sample_bytes * micro_batch, self.floor_bytes)

    def largest_within(self, usable_bytes: float, target_batch: int) -> int:
        """The largest micro-batch predicted to fit (at most the target batch); 0 if none."""
        if self.predict(1) > usable_bytes:
            return 0
        if self.per_sample_bytes <= 0:
            return target_batch
        return min(target_batch, int((usable_bytes - self.fixed_bytes) // self.per_sample_bytes))


def fit_line(measurements: list[Measurement]) -> Fit:
    """Least squares through the largest (up to three) steps that ran; small sizes mislead.

    At small micro-batches the optimizer step or fixed costs set the peak, so only the largest
    points describe how the forward and backward pass grow.
    """
    ran = sorted((m for m in measurements if m.peak_bytes is not None),
                 key=lambda m: m.micro_batch)
    if not ran:
        raise ValueError("no step ran: nothing to fit")
    floor = max(m.optimizer_bytes or 0 for m in ran)
    points = [(m.micro_batch, _growing_bytes(m)) for m in ran[-3:]]
    if len(points) == 1:
        size, peak = points[0]
        return Fit(0.0, peak / size, floor)
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return Fit(mean_y - slope * mean_x, slope, floor)


def _growing_bytes(m: Measurement) -> int:
    """The part of a step's peak that grows with the micro-batch: forward and backward."""
    return m.step_bytes if m.step_bytes is not None else m.peak_bytes


def slope_is_stable(measurements: list[Measurement], tolerance: float = 0.05) -> bool:
    """Whether the bytes per sample between the last three sizes agree within `tolerance`."""
    ran = [m for m in measurements if m.peak_bytes is not None]
    if len(ran) < 3:
        return False
    (a, b, c) = ran[-3:]

    def slope(p: Measurement, q: Measurement) -> float:
        return (_growing_bytes(q) - _growing_bytes(p)) / (q.micro_batch - p.micro_batch)

    first, second = slope(a, b), slope(b, c)
    return second > 0 and abs(first - second) <= tolerance * second


def prefer_even_split(largest: int, target_batch: int) -> int:
    """The smallest micro-batch that needs no more micro-batches than `largest` does.

    512 with at most 130 → 128 (4 × 128); 500 → 125; 509 → 128 (128, 128, 128, 125).
    Same number of steps through the model, evener pieces and a lower peak.
    """
    pieces = math.ceil(target_batch / largest)
    return math.ceil(target_batch / pieces)
