"""Strategies weighed (each probed, the fastest that fits chosen), and `mbp probe`'s entry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mbp_cli.data.batching import accumulation_steps
from mbp_cli.engine.micro_step import explained_step_errors
from mbp_cli.engine.model import smallest_micro_batch
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.setup import Setup, build
from mbp_cli.errors import DoesNotFitError
from mbp_cli.memory.estimate import CUDA, FakeParts, fake_setup, quiet_fake_kernels
from mbp_cli.memory.measure import StepRunner, preserved_training_state
from mbp_cli.memory.search import ProbeOptions, ProbeResult, probe_setup, probe_with, runner_for
from mbp_cli.recipe.spec import Recipe
from mbp_cli.strategies.choice import StrategyChoice, candidates, fixed_choice, is_auto

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
            runner = runner_for(setup, optimizer, options, fake)
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
        measured = runner_for(setup, optimizer, options, fake).measure(result.micro_batch)
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
        result = probe_with(recipe, options, runner)
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
    with explained_step_errors(True), quiet_fake_kernels(fake is not None):
        if every_strategy or is_auto(recipe):
            choices = candidates(recipe, device, setup.block_count(),
                                 estimate=options.estimate, every=every_strategy)
            micro_batch = None if every_strategy else recipe.batch.fixed_micro
            return probe_strategies(recipe, setup, optimizer, options, choices,
                                    micro_batch=micro_batch, fake=fake)
        setup.use(fixed_choice(recipe, device, lambda: len(setup.blocks("memory.offload")),
                               estimate=options.estimate), estimate=options.estimate)
        if fake is not None:
            return probe_with(recipe, options, runner_for(setup, optimizer, options, fake))
        return probe_setup(recipe, setup, optimizer, options)
