"""Probe accuracy: time to answer, and the largest micro-batch it finds against the true largest
that fits the same budget (every size measured with a real tracked step, from the smallest to
twice the first that does not fit), for four models. Also the fake-tensor estimate's answer and
time.

    python bench/probe_accuracy.py
"""

from __future__ import annotations

import time

import torch
from common import markdown_table, write_result

from mbp_cli.data.samples import batch_maker
from mbp_cli.engine.model import smallest_micro_batch
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.setup import build
from mbp_cli.memory.measure import StepRunner, preserved_training_state
from mbp_cli.memory.search import ProbeOptions, probe_setup
from mbp_cli.memory.weigh import probe_recipe
from mbp_cli.recipe.load import build_recipe

CPU = torch.device("cpu")
MiB = 2**20
SGD = {"name": "SGD", "args": {"lr": 0.1, "momentum": 0.9}}
CASES = [
    ("small_cnn, digits 8×8", 8 * MiB, {"name": "small_cnn"}, {"name": "digits"}),
    ("mlp, digits 8×8", 2 * MiB, {"name": "mlp", "args": {"hidden": 256, "depth": 3}},
     {"name": "digits"}),
    ("tiny_lm, tokens ≤ 24", 6 * MiB, {"name": "tiny_lm"}, {"name": "synthetic_tokens"}),
    ("resnet18, 3×32×32", 160 * MiB, {"name": "resnet18", "args": {"num_classes": 10}},
     {"name": "FakeData", "args": {"size": 64, "image_size": [3, 32, 32]}}),
]


def recipe_for(model: dict, data: dict):
    problems: list[str] = []
    recipe = build_recipe({"model": model, "data": data, "optim": SGD,
                           "batch": {"target": 1024, "micro": "auto"},
                           "train": {"steps": 1, "device": "cpu"}}, "probe-bench", problems)
    assert not problems, problems
    return recipe


def true_largest(recipe, budget: int) -> tuple[int, int]:
    """The largest micro-batch whose real step fits: every size from the smallest up to twice
    the boundary (or the target batch) is measured, so no assumption about growth is made.
    Returns it and the number of sizes measured."""
    setup = build(recipe, CPU)
    optimizer = build_optimizer(recipe, setup.model)
    runner = StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set), "tracked")
    usable = budget * (1 - recipe.batch.memory_margin)
    smallest = smallest_micro_batch(setup.model)
    largest, size, first_too_big = 0, smallest, None
    with preserved_training_state(setup.model, optimizer, CPU):
        runner.measure(smallest)
        while size <= recipe.batch.target and (first_too_big is None
                                               or size <= 2 * first_too_big):
            if runner.measure(size).fits(usable):
                largest = size
            elif first_too_big is None:
                first_too_big = size
            size += 1
    return largest, size - smallest


def main() -> None:
    rows = []
    for name, budget, model, data in CASES:
        recipe = recipe_for(model, data)
        setup = build(recipe, CPU)
        optimizer = build_optimizer(recipe, setup.model)
        started = time.perf_counter()
        found = probe_setup(recipe, setup, optimizer, ProbeOptions(CPU, budget_bytes=budget))
        probe_seconds = time.perf_counter() - started
        started = time.perf_counter()
        estimate = probe_recipe(recipe, ProbeOptions(None, budget_bytes=budget, estimate=True))
        estimate_seconds = time.perf_counter() - started
        truth, sizes_scanned = true_largest(recipe, budget)
        rows.append({
            "case": name, "budget_bytes": budget, "true_largest": truth,
            "sizes_scanned": sizes_scanned, "probe_largest": found.largest_micro_batch,
            "probe_choice": found.micro_batch, "probe_steps": len(found.measurements) + 1,
            "probe_seconds": probe_seconds, "estimate_largest": estimate.largest_micro_batch,
            "estimate_seconds": estimate_seconds,
            "predicted_peak_bytes": found.predicted_peak_bytes,
            "verified_peak_bytes": found.verified_peak_bytes})
        print(rows[-1])
    table = markdown_table(
        ["model", "budget", "true largest", "probe: largest", "probe: choice", "probe time",
         "real steps", "estimate: largest", "estimate time"],
        [[r["case"], f"{r['budget_bytes'] // MiB} MiB", r["true_largest"], r["probe_largest"],
          r["probe_choice"], f"{r['probe_seconds']:.1f} s", r["probe_steps"],
          r["estimate_largest"], f"{r['estimate_seconds']:.1f} s"] for r in rows])
    print(table)
    write_result("probe-accuracy", {"device": "cpu", "backend": "tracked", "margin": 0.05,
                                    "rows": rows, "table": table})


if __name__ == "__main__":
    main()
