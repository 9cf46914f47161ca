"""The probe: measure real training steps at growing micro-batches, fit, choose, verify."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

from mbp_cli.data.batching import accumulation_steps
from mbp_cli.data.samples import BatchMaker, batch_maker
from mbp_cli.engine.micro_step import explained_step_errors
from mbp_cli.engine.samples import sample_batch
from mbp_cli.engine.setup import (
    DTYPES,
    Setup,
    build,
    build_loss,
    build_micro_step,
    build_model,
    build_optimizer,
    smallest_micro_batch,
    spare_counting,
)
from mbp_cli.errors import DoesNotFitError, UsageError, does_not_fit
from mbp_cli.memory.attention import DeviceAttention
from mbp_cli.memory.fit import Fit, Measurement, fit_line, prefer_even_split, slope_is_stable
from mbp_cli.memory.measure import StepRunner, preserved_training_state
from mbp_cli.memory.tracker import available_bytes
from mbp_cli.recipe.spec import Recipe
from mbp_cli.strategies.choice import StrategyChoice, candidates, fixed_choice, is_auto
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
        return _probe(recipe, options, _runner(setup, optimizer, options))


@dataclass(frozen=True)
class FakeParts:
    """What an estimate measures in: the fake tensor mode, fake batches of any size, and the
    device asked about (whose attention kernel the step runs)."""

    mode: FakeTensorMode
    make_batch: BatchMaker
    device_type: str = "cuda"


def _runner(setup: Setup, optimizer: torch.optim.Optimizer, options: ProbeOptions,
            fake: FakeParts | None = None) -> StepRunner:
    if fake is not None:
        return StepRunner(setup.micro_step, optimizer, fake.make_batch, "estimate",
                          context=lambda: fake.mode,
                          attention=DeviceAttention(fake.device_type))
    return StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set, setup.collate),
                      backend_for(options), options.capacity_bytes)


CUDA = torch.device("cuda")  # what an estimate is about unless told
SLOWER_CUTOFF = 3.0  # a combination this many times slower per sample is not probed further


@dataclass(frozen=True)
class StrategyRow:
    """One combination of strategies and what the probe found for it."""

    choice: StrategyChoice
    result: ProbeResult | None  # None: it does not fit, or is far slower (see note)
    # (in the table `fits` is then false, or null where it was not probed: too slow)
    note: str = ""
    seconds_at_micro_batch: float | None = None  # per target batch, at the recipe's micro-batch
    slower: float | None = None  # per sample than the fastest, where not probed further

    def to_dict(self) -> dict[str, Any]:
        """One row of the `strategies` table."""
        row: dict[str, Any] = {"label": self.choice.label, **self.choice.to_dict(),
                               "fits": None if self.slower else self.result is not None,
                               "note": self.note,
                               "slower": self.slower}
        if self.result is not None:
            result = self.result
            row.update(micro_batch=result.micro_batch,
                       largest_micro_batch=result.largest_micro_batch,
                       accumulation_steps=result.accumulation_steps,
                       verified_peak_bytes=result.verified_peak_bytes,
                       seconds_per_target_batch=result.seconds_per_target_batch,
                       attention=result.attention)
        if self.seconds_at_micro_batch is not None:
            row["seconds_at_micro_batch"] = self.seconds_at_micro_batch
        return row


@dataclass(frozen=True)
class WeighedStrategies:
    """Each combination of strategies probed, and the one chosen."""

    rows: list[StrategyRow]
    chosen: StrategyRow

    @property
    def choice(self) -> StrategyChoice:
        """The strategies chosen."""
        return self.chosen.choice

    @property
    def chosen_result(self) -> ProbeResult:
        """The probe's answer for them."""
        return self.chosen.result

    def to_dict(self) -> dict[str, Any]:
        """The chosen combination's probe answer, with `choice` (its strategies) and
        `strategies` (the table), for --json and probe.json."""
        return {**self.chosen_result.to_dict(), "choice": self.choice.to_dict(),
                "choice_label": self.choice.label, "choice_keys": self.choice.recipe_keys,
                "strategies": [row.to_dict() for row in self.rows]}


def _per_sample(result: ProbeResult) -> float:
    return result.seconds_per_target_batch / result.target_batch


def probe_strategies(recipe: Recipe, setup: Setup, optimizer: torch.optim.Optimizer,
                     options: ProbeOptions, choices: list[StrategyChoice], *,
                     micro_batch: int | None = None,
                     fake: FakeParts | None = None) -> WeighedStrategies:
    """Probe each combination of strategies and pick the fastest per target batch that fits
    (with a fixed `micro_batch`: the fastest step at that size among those where it fits;
    for an estimate, which has no timings: the fewest micro-batches, the least work first).

    A combination whose step at the fastest one's micro-batch is more than SLOWER_CUTOFF
    times slower per sample is not probed further (bf16 on a CPU without bf16 units is ~30×
    slower: its full probe would take minutes and could not win).
    """
    rows: list[StrategyRow] = []
    with preserved_training_state(setup.model, optimizer, setup.device):
        for choice in choices:
            setup.use(choice, estimate=fake is not None)
            runner = _runner(setup, optimizer, options, fake)
            rows.append(_probe_one(recipe, options, runner, choice, rows, micro_batch,
                                   fake is not None))
    fitting = [row for row in rows if row.result is not None
               and (micro_batch is None or row.result.largest_micro_batch >= micro_batch)]
    if not fitting:
        smallest = micro_batch or smallest_micro_batch(setup.model)
        raise DoesNotFitError(f"no combination of strategies fits a micro-batch of {smallest} "
                              f"(tried: {', '.join(c.label for c in choices)})")
    if fake is not None:  # fewest micro-batches per target batch, then the least added work
        chosen = min(fitting, key=lambda row: (row.result.accumulation_steps, row.choice.cost))
    elif micro_batch is not None:
        chosen = min(fitting, key=lambda row: row.seconds_at_micro_batch)
    else:
        chosen = min(fitting, key=lambda row: row.result.seconds_per_target_batch)
    if chosen.choice.offload_blocks > 1:
        with preserved_training_state(setup.model, optimizer, setup.device):
            chosen = _fewest_offloaded_blocks(setup, optimizer, options, fake, chosen)
        rows.append(chosen)
    return WeighedStrategies(rows, chosen)


def _fewest_offloaded_blocks(setup: Setup, optimizer: torch.optim.Optimizer,
                             options: ProbeOptions, fake: FakeParts | None,
                             row: StrategyRow) -> StrategyRow:
    """The same micro-batch with the fewest blocks offloaded that still fits: the blocks saved
    first are needed last in the backward pass, so offloading the first k stalls least."""
    result = row.result
    fits, too_few = row.choice.offload_blocks, 0
    peak = result.verified_peak_bytes
    while fits - too_few > 1:
        middle = (fits + too_few) // 2
        setup.use(dataclasses.replace(row.choice, offload_blocks=middle),
                  estimate=fake is not None)
        measured = _runner(setup, optimizer, options, fake).measure(result.micro_batch)
        if measured.fits(result.usable_bytes):
            fits, peak = middle, measured.peak_bytes
        else:
            too_few = middle
    choice = dataclasses.replace(row.choice, offload_blocks=fits)
    return StrategyRow(choice, dataclasses.replace(result, verified_peak_bytes=peak),
                       f"the fewest blocks to offload for micro-batch {result.micro_batch}",
                       row.seconds_at_micro_batch)


def _probe_one(recipe: Recipe, options: ProbeOptions, runner: StepRunner,
               choice: StrategyChoice, done: list[StrategyRow], micro_batch: int | None,
               is_estimate: bool) -> StrategyRow:
    timed = [row for row in done if row.result is not None and not is_estimate]
    if timed:
        fastest = min(timed, key=lambda row: _per_sample(row.result))
        size = fastest.result.micro_batch
        quick = runner.measure(size)
        if quick.peak_bytes is not None:
            slower = quick.step_seconds / size / _per_sample(fastest.result)
            if slower > SLOWER_CUTOFF:
                return StrategyRow(choice, None, f"{slower:.0f}× slower per sample than "
                                                 f"{fastest.choice.label}: not probed further",
                                   slower=slower)
    try:
        result = _probe(recipe, options, runner)
    except DoesNotFitError:
        return StrategyRow(choice, None, "does not fit")
    seconds = None
    if micro_batch is not None and result.largest_micro_batch >= micro_batch \
            and not is_estimate:
        # The recipe's micro-batch is what trains: its figures are the answer
        steps = accumulation_steps(result.target_batch, micro_batch)
        measured = runner.measure(micro_batch)
        seconds = measured.step_seconds * steps
        result = dataclasses.replace(
            result, micro_batch=micro_batch, accumulation_steps=steps,
            predicted_peak_bytes=round(result.fit.predict(micro_batch)),
            verified_peak_bytes=measured.peak_bytes, seconds_per_target_batch=seconds)
    return StrategyRow(choice, result, "", seconds)


def probe_recipe(recipe: Recipe, options: ProbeOptions, *,
                 every_strategy: bool = False) -> ProbeResult | WeighedStrategies:
    """Build the recipe (on fake tensors for an estimate) and probe it with the recipe's
    strategies, or weigh every strategy that applies (`every_strategy`)."""
    fake = None
    if options.estimate:
        device = options.device or CUDA
        setup, optimizer, fake = fake_setup(recipe, device)
    else:
        setup = build(recipe, options.device)
        optimizer = build_optimizer(recipe, setup.model)
        device = setup.device
    setup.train_mode()
    # A step that fails (a model that does not fit its data, a backward or a recompute that
    # raises) is explained as training explains it: one line, after your code's traceback
    with explained_step_errors(True), _quiet_fake_kernels(fake is not None):
        if every_strategy or is_auto(recipe):
            choices = candidates(recipe, device, setup.block_count(),
                                 estimate=options.estimate, every=every_strategy)
            micro_batch = recipe.batch.micro if isinstance(recipe.batch.micro, int) \
                and not every_strategy else None
            return probe_strategies(recipe, setup, optimizer, options, choices,
                                    micro_batch=micro_batch, fake=fake)
        setup.use(fixed_choice(recipe, device, lambda: len(setup.blocks("memory.offload")),
                               estimate=options.estimate), estimate=options.estimate)
        if fake is not None:
            return _probe(recipe, options, _runner(setup, optimizer, options, fake))
        return probe_setup(recipe, setup, optimizer, options)


@contextlib.contextmanager
def _quiet_fake_kernels(is_estimate: bool) -> Iterator[None]:
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
    spare_counting(loss_fn, train_set)  # read from the real data

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


def _probe(recipe: Recipe, options: ProbeOptions, runner: StepRunner) -> ProbeResult:
    return choose_micro_batch(runner, recipe.batch.target, resolve_budget(recipe, options),
                              recipe.batch.memory_margin, smallest_micro_batch(runner.model))
