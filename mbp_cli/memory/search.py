"""The probe's search: measure real steps at growing micro-batches, fit, choose, verify."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mbp_cli.data.batching import accumulation_steps
from mbp_cli.data.samples import batch_maker
from mbp_cli.engine.model import smallest_micro_batch
from mbp_cli.engine.setup import Setup
from mbp_cli.errors import UsageError, does_not_fit
from mbp_cli.memory.estimate import FakeParts
from mbp_cli.memory.fit import Fit, Measurement, fit_line, prefer_even_split, slope_is_stable
from mbp_cli.memory.measure import StepRunner, preserved_training_state
from mbp_cli.memory.tracker import available_bytes
from mbp_cli.recipe.spec import Recipe
from mbp_cli.units import parse_bytes


@dataclass(frozen=True)
class ProbeResult:
    """The choice and the measurements behind it."""

    device: str
    backend: str  # cuda | tracked | simulated | estimate
    budget_bytes: int
    usable_bytes: int  # the budget less the margin
    target_batch: int
    micro_batch: int
    largest_micro_batch: int  # before preferring an even split
    accumulation_steps: int
    fit: Fit
    predicted_peak_bytes: int
    verified_peak_bytes: int
    seconds_per_target_batch: float | None
    probe_seconds: float
    measurements: list[Measurement] = field(default_factory=list)
    attention: str | None = None  # an estimate's attention kernel (`CUDA flash attention`)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --json and probe.json."""
        data = asdict(self)
        data["fit"] = {"fixed_bytes": round(self.fit.fixed_bytes),
                       "per_sample_bytes": round(self.fit.per_sample_bytes),
                       "optimizer_floor_bytes": self.fit.floor_bytes}
        return data


def narrow_down(measure: Callable[[int], Measurement], measured: dict[int, Measurement],
                predicted: int, usable: float, tries: int = 8) -> int:
    """The largest size that fits: verify the prediction, and while the largest size known to
    fit and the smallest known not to are apart, measure where a refit of everything so far
    points (halfway when it points outside)."""
    fits = max(s for s, m in measured.items() if m.fits(usable))
    candidate, is_refit = max(predicted, fits), True
    for _ in range(tries):
        does_fit = measure(candidate).fits(usable)
        if does_fit:
            fits = max(fits, candidate)
        too_big = [s for s, m in measured.items() if not m.fits(usable) and s > fits]
        if not too_big or min(too_big) == fits + 1:
            return fits
        upper = min(too_big)
        refit = fit_line(list(measured.values())).largest_within(usable, upper - 1)
        # A line that has just missed would point just below the miss again (its slope comes
        # from the points it fits): halve the gap instead.
        is_refit = fits < refit < upper and (does_fit or not is_refit)
        candidate = refit if is_refit else (fits + upper) // 2
    return fits


def choose_micro_batch(runner: StepRunner, target_batch: int, budget_bytes: int,
                       margin: float, smallest_size: int = 1) -> ProbeResult:
    """Measure at 1, 2, 4, … until the per-sample slope settles or the budget is reached, fit the
    largest points, predict the largest micro-batch within budget less the margin, prefer an
    even split of the target batch, then verify that size with a real step, stepping down if
    it does not fit."""
    started = time.perf_counter()
    usable = budget_bytes * (1 - margin)
    smallest_size = min(smallest_size, target_batch)
    # The first step creates the optimizer state that every later step carries; where even
    # that runs out of memory, the state is left half made: stop here.
    if runner.measure(smallest_size).peak_bytes is None:
        raise does_not_fit(smallest_size, None, budget_bytes, margin)
    measured: dict[int, Measurement] = {}

    def measure(size: int) -> Measurement:
        if size not in measured:
            measured[size] = runner.measure(size)
        return measured[size]

    smallest = measure(smallest_size)
    if not smallest.fits(usable):
        raise does_not_fit(smallest_size, smallest.peak_bytes, budget_bytes, margin)
    size = smallest_size
    while size < target_batch:
        history = [measured[s] for s in sorted(measured)]
        if not measured[size].fits(usable) or slope_is_stable(history):
            break
        size = min(size * 2, target_batch)
        measure(size)
    fit = fit_line(list(measured.values()))
    largest = narrow_down(measure, measured, fit.largest_within(usable, target_batch), usable)
    chosen = prefer_even_split(largest, target_batch)
    if not measure(chosen).fits(usable):  # memory that does not grow monotonically
        chosen = largest
    verified = measure(chosen)
    steps = accumulation_steps(target_batch, chosen)
    per_target = verified.step_seconds * steps if verified.step_seconds is not None else None
    return ProbeResult(
        device=str(runner.device), backend=runner.backend, budget_bytes=int(budget_bytes),
        usable_bytes=int(usable), target_batch=target_batch, micro_batch=chosen,
        largest_micro_batch=largest, accumulation_steps=steps, fit=fit,
        predicted_peak_bytes=round(fit.predict(chosen)), verified_peak_bytes=verified.peak_bytes,
        seconds_per_target_batch=per_target, probe_seconds=time.perf_counter() - started,
        measurements=[measured[s] for s in sorted(measured)],
        attention=runner.attention.assumed if runner.attention else None)


@dataclass(frozen=True)
class ProbeOptions:
    """Where and against what the probe measures."""

    device: torch.device | None  # with estimate: the device asked about (None: a CUDA GPU)
    budget_bytes: int | None = None  # default: the recipe's, else free memory × fraction
    estimate: bool = False  # fake tensors: no memory used, any model size
    device_memory_bytes: int | None = None  # with estimate: the device being asked about
    capacity_bytes: int | None = None  # a simulated device of this size


def resolve_budget(recipe: Recipe, options: ProbeOptions) -> int:
    """The memory budget: given, or a fraction of the (asked-about, simulated or free) memory."""
    if options.budget_bytes is not None:
        return options.budget_bytes
    if recipe.batch.memory_budget is not None:
        return parse_bytes(recipe.batch.memory_budget)
    memory = options.device_memory_bytes or options.capacity_bytes
    if memory is None and options.estimate:
        raise UsageError("--estimate needs --device-memory (the device asked about) or --budget")
    if memory is None:
        memory = available_bytes(options.device)
    return int(memory * recipe.batch.memory_fraction)


def backend_for(options: ProbeOptions) -> str:
    """Which measurement back end answers for these options."""
    if options.estimate:
        return "estimate"
    if options.capacity_bytes is not None:
        return "simulated"
    return "cuda" if options.device.type == "cuda" else "tracked"


def probe_setup(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                options: ProbeOptions) -> ProbeResult:
    """Probe a built run with its current strategies, leaving its model, optimizer and RNG
    state exactly as found."""
    with preserved_training_state(setup.model, optimizer, setup.device):
        return probe_with(recipe, options, runner_for(setup, optimizer, options))


def runner_for(setup: Setup, optimizer: torch.optim.Optimizer, options: ProbeOptions,
               fake: FakeParts | None = None) -> StepRunner:
    """The step runner that measures the setup's current micro-step for these options (on fake
    tensors for an estimate)."""
    if fake is not None:
        return fake.runner(setup, optimizer)
    return StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set, setup.collate),
                      backend_for(options), options.capacity_bytes)


def probe_with(recipe: Recipe, options: ProbeOptions, runner: StepRunner) -> ProbeResult:
    """The recipe's target batch, budget and margin searched with this runner."""
    return choose_micro_batch(runner, recipe.batch.target, resolve_budget(recipe, options),
                              recipe.batch.memory_margin, smallest_micro_batch(runner.model))
