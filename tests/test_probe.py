"""The probe: sizing arithmetic, choices that fit, state left alone, and the CLI answer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
import torch

from mbp_cli.commands.plot import plot_probe
from mbp_cli.data.samples import batch_maker
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.setup import build
from mbp_cli.memory.fit import Measurement, fit_line, prefer_even_split, slope_is_stable
from mbp_cli.memory.measure import StepRunner
from mbp_cli.memory.search import ProbeOptions, narrow_down, probe_setup
from mbp_cli.memory.weigh import probe_recipe
from mbp_cli.recipe.load import load_recipe
from tests.conftest import REPO, small_recipe

CPU = torch.device("cpu")
MiB = 2**20


@pytest.mark.parametrize(("largest", "target", "expected"), [
    (130, 512, 128), (125, 500, 125), (130, 509, 128), (512, 512, 512), (1, 7, 1), (3, 7, 3)])
def test_prefer_even_split(largest, target, expected):
    chosen = prefer_even_split(largest, target)
    assert chosen == expected and chosen <= largest
    assert -(-target // chosen) == -(-target // largest)  # no extra micro-batch


def test_fit_uses_the_largest_points_and_keeps_the_optimizer_floor():
    def step(m: int) -> Measurement:  # 1000 + 10/sample, but small sizes hit a 5000-byte floor
        return Measurement(m, max(1000 + 10 * m, 5000), 1000 + 10 * m, 5000)

    measured = [step(m) for m in (1, 2, 4, 8, 64, 128, 256)]
    fit = fit_line(measured)
    assert (fit.fixed_bytes, fit.per_sample_bytes, fit.floor_bytes) == (1000, 10, 5000)
    assert fit.predict(1) == 5000 and fit.predict(1000) == 11000
    assert fit.largest_within(3000, target_batch=10_000) == 0  # the floor does not fit
    assert fit.largest_within(11_000, target_batch=10_000) == 1000
    assert fit.largest_within(11_000, target_batch=300) == 300
    assert slope_is_stable(measured) and not slope_is_stable(measured[:2])


def digits_setup(write_recipe, **sections):
    recipe = load_recipe(write_recipe(small_recipe(**sections)))
    setup = build(recipe, CPU)
    return recipe, setup, build_optimizer(recipe, setup.model)


def measure(setup, optimizer, size: int) -> int:
    runner = StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set), "tracked")
    runner.measure(1)
    return runner.measure(size).peak_bytes


@pytest.mark.parametrize("budget_mib", [3, 6, 12])
def test_the_choice_fits_and_one_more_sample_would_not(write_recipe, budget_mib):
    recipe, setup, optimizer = digits_setup(
        write_recipe, batch={"target": 1024, "micro": "auto", "memory_margin": 0.05})
    result = probe_setup(recipe, setup, optimizer,
                         ProbeOptions(CPU, budget_bytes=budget_mib * MiB))
    usable = budget_mib * MiB * 0.95
    assert result.usable_bytes == int(usable)
    assert measure(setup, optimizer, result.micro_batch) <= usable
    assert measure(setup, optimizer, result.largest_micro_batch) <= usable
    assert measure(setup, optimizer, result.largest_micro_batch + 1) > usable * 0.99
    assert result.accumulation_steps == -(-1024 // result.micro_batch)
    assert abs(result.predicted_peak_bytes - result.verified_peak_bytes) <= 0.02 * usable


def test_probing_leaves_model_optimizer_and_rng_as_they_were(write_recipe):
    recipe, setup, optimizer = digits_setup(
        write_recipe, optim={"name": "Adam", "args": {"lr": 0.01}})
    runner = StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set), "tracked")
    runner.measure(4)  # a trained step: Adam has state to disturb
    params = {k: v.clone() for k, v in setup.model.state_dict().items()}
    state = {k: {n: t.clone() for n, t in per_param.items()}
             for k, per_param in optimizer.state_dict()["state"].items()}
    torch.manual_seed(123)
    random.seed(123)
    probe_setup(recipe, setup, optimizer, ProbeOptions(CPU, budget_bytes=4 * MiB))
    assert all(torch.equal(params[k], v) for k, v in setup.model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[k][n], after[k][n]) for k in state for n in state[k])
    assert all(p.grad is None for p in setup.model.parameters())
    expected_draw = (torch.manual_seed(123), torch.rand(3))[1]
    torch.manual_seed(123)
    random.seed(123)
    probe_setup(recipe, setup, optimizer, ProbeOptions(CPU, budget_bytes=4 * MiB))
    assert torch.equal(torch.rand(3), expected_draw) and random.random() == random.Random(
        123).random()


def test_a_simulated_device_that_fails_above_its_capacity(write_recipe):
    """Steps past the capacity raise out-of-memory; the probe lands on the largest that runs."""
    recipe, setup, optimizer = digits_setup(
        write_recipe, batch={"target": 1024, "micro": "auto", "memory_margin": 0.0})
    capacity = 5 * MiB
    result = probe_setup(recipe, setup, optimizer, ProbeOptions(
        CPU, budget_bytes=capacity, capacity_bytes=capacity))
    assert result.backend == "simulated"
    runner = StepRunner(setup.micro_step, optimizer, batch_maker(setup.train_set), "simulated",
                        capacity_bytes=capacity)
    runner.measure(1)
    assert runner.measure(result.largest_micro_batch).peak_bytes <= capacity
    assert runner.measure(result.largest_micro_batch + 1).peak_bytes is None  # out of memory
    assert any(m.peak_bytes is None for m in result.measurements)


def test_estimate_matches_the_tracked_probe(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(batch={"target": 256, "micro": "auto"})))
    tracked = probe_recipe(recipe, ProbeOptions(CPU, budget_bytes=4 * MiB))
    estimated = probe_recipe(recipe, ProbeOptions(None, budget_bytes=4 * MiB, estimate=True))
    assert estimated.micro_batch == tracked.micro_batch
    assert [m.peak_bytes for m in estimated.measurements] == [
        m.peak_bytes for m in tracked.measurements]
    assert all(m.step_seconds is None for m in estimated.measurements)


def test_probe_json_for_scripts(cli, write_recipe):
    result = cli("probe", write_recipe(small_recipe()), "--budget", "6MiB", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert {"device", "budget_bytes", "micro_batch", "accumulation_steps", "target_batch",
            "fit", "measurements"} <= set(answer)
    assert answer["budget_bytes"] == 6 * MiB and answer["target_batch"] == 50
    assert set(answer["fit"]) >= {"fixed_bytes", "per_sample_bytes"}
    assert all({"micro_batch", "peak_bytes", "step_seconds"} <= set(m)
               for m in answer["measurements"])


def test_probe_table_for_people(cli, write_recipe):
    result = cli("probe", write_recipe(small_recipe()), "--budget", "6MiB")
    assert result.exit_code == 0
    assert "micro-batch" in result.stdout and "of budget" in result.stdout
    assert "choice: micro-batch 50 × 1 accumulation steps" in result.stdout


def test_nothing_fits_is_exit_3(cli, write_recipe):
    result = cli("probe", write_recipe(small_recipe()), "--budget", "20KiB")
    assert result.exit_code == 3
    assert "does not fit: a step at micro-batch 1 needs" in result.stderr
    assert "budget is 20.0 KiB" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "lots"], "--budget: 'lots' is not a memory size"),
    (["--device-memory", "8GiB"], "--device-memory goes with --estimate"),
    (["--estimate"], "--estimate needs --device-memory"),
    (["--estimate", "--device-memory", "24"],  # a unit left out: not a 24-byte device
     "--device-memory: '24' has no unit, so it would be 24 bytes; add one, e.g. 24GiB or 24MiB"),
])
def test_probe_usage_errors(cli, write_recipe, args, message):
    result = cli("probe", write_recipe(small_recipe()), *args)
    assert result.exit_code == 2 and message in result.stderr


def test_plot_is_drawn_and_marks_what_did_not_fit(cli, write_recipe, tmp_path):
    """A target batch far past the budget: the search measures sizes over the usable budget;
    the table says `over` on their rows and the picture marks them apart from those that fit."""
    recipe = write_recipe(small_recipe(batch={"target": 1400, "micro": "auto"}))
    png = tmp_path / "probe.png"
    shown = cli("probe", recipe, "--budget", "2MiB", "--plot", png)
    assert shown.exit_code == 0, shown.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    result = json.loads(cli("probe", recipe, "--budget", "2MiB", "--json").output)
    usable = result["usable_bytes"]
    over = [m["micro_batch"] for m in result["measurements"]
            if m["peak_bytes"] is None or m["peak_bytes"] > usable]
    assert over and " over" in shown.output
    drawn = plot_probe(result, tmp_path / "again.png")
    assert sorted(drawn["over"] + drawn["out_of_memory"]) == over
    assert max(drawn["fits"]) == result["largest_micro_batch"] < min(over)


def test_plot_without_matplotlib_says_how_to_get_it(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = cli("probe", write_recipe(small_recipe()), "--plot", tmp_path / "p.png")
    assert result.exit_code == 2 and "pip install 'mbp-cli[plot]'" in result.stderr


@pytest.mark.slow
def test_probe_of_the_readme_recipe_answers_in_seconds():
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mbp_cli", "probe", "recipes/digits.yaml",
                           "--budget", "64MiB", "--json"], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert time.perf_counter() - started < 10
    assert json.loads(done.stdout)["micro_batch"] >= 1


@pytest.mark.slow
def test_resnet50_estimate_for_an_80gib_gpu_in_bounded_time_and_memory(tmp_path):
    recipe = tmp_path / "resnet50.yaml"
    recipe.write_text(
        "model: {name: resnet50}\n"
        "data: {name: FakeData, args: {size: 8, image_size: [3, 224, 224], num_classes: 1000}}\n"
        "batch: {target: 1024, micro: auto}\noptim: {name: SGD, args: {lr: 0.1, momentum: 0.9}}\n"
        "train: {epochs: 1}\n")
    code = ("import resource, subprocess, sys, json, time; t = time.perf_counter(); "
            "out = subprocess.run([sys.executable, '-m', 'mbp_cli', 'probe', sys.argv[1], "
            "'--estimate', '--device-memory', '80GiB', '--json'], capture_output=True, "
            "text=True, check=True).stdout; print(json.dumps({'seconds': time.perf_counter() - t,"
            " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
            "'answer': json.loads(out)}))")
    report = json.loads(subprocess.run([sys.executable, "-c", code, str(recipe)], cwd=REPO,
                                       capture_output=True, text=True, check=True).stdout)
    assert report["seconds"] < 60 and report["rss"] < 2 * 2**30
    answer = report["answer"]
    assert answer["backend"] == "estimate" and 256 <= answer["micro_batch"] <= 1024
    assert answer["verified_peak_bytes"] <= answer["usable_bytes"]


def test_batch_norm_models_are_probed_from_two_samples(write_recipe):
    """BatchNorm cannot train on one sample of a 1×1 feature map (ResNet-18 on 32×32 images)."""
    recipe = load_recipe(write_recipe(small_recipe(
        model={"name": "resnet18", "args": {"num_classes": 10}},
        data={"name": "FakeData", "args": {"size": 16, "image_size": [3, 32, 32]}},
        batch={"target": 64, "micro": "auto"})))
    result = probe_recipe(recipe, ProbeOptions(CPU, budget_bytes=160 * MiB))
    assert result.measurements[0].micro_batch == 2
    assert 2 <= result.micro_batch <= 64


@pytest.mark.slow
def test_estimate_needs_no_dataset_on_the_machine(cli, tmp_path, monkeypatch):
    """A CI script checks the paper's recipe for an 80 GiB GPU without CIFAR-10 on disk: the
    input shape is CIFAR-10's known one, and nothing is downloaded."""
    monkeypatch.chdir(tmp_path)
    result = cli("probe", REPO / "recipes/paper/cifar10-resnet50-b1024.yaml", "--estimate",
                 "--device-memory", "80GiB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["micro_batch"] >= 16
    assert not (tmp_path / "data").exists()


def test_estimate_takes_the_input_shape_from_the_recipe(cli, write_recipe, tmp_path):
    recipe = small_recipe(model={"name": "small_cnn", "args": {"in_channels": 3}},
                          data={"name": "ImageFolder", "args": {"root": str(tmp_path / "no")}})
    args = ("probe", write_recipe(recipe), "--estimate", "--device-memory", "64MiB")
    refused = cli(*args)
    assert refused.exit_code == 2
    assert "without the dataset, validate and --estimate need the shape of one input sample " \
           "as data.input_shape" in refused.stderr
    answered = cli(*args, "--set", "data.input_shape=[3, 16, 16]", "--json")
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.stdout)["target_batch"] == 50


@pytest.mark.slow
def test_estimate_of_a_vit_whose_init_reads_values(cli, tmp_path, monkeypatch):
    """ViT's truncated-normal init reads tensor values, which fake tensors cannot: the estimate
    builds the model on the meta device first."""
    monkeypatch.chdir(tmp_path)
    result = cli("probe", REPO / "recipes/cifar10-vit_b_16.yaml", "--estimate",
                 "--device-memory", "80GiB", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["micro_batch"] > 64


def test_narrowing_finds_the_largest_when_small_sizes_hide_the_slope():
    """Small steps grow slower than large ones (their peak is mostly fixed state), so the
    first prediction runs out of memory, with no peak to learn from; the search must close in
    on the true largest size anyway, not step down one size per try."""
    usable, capacity = 10_000, 10_500

    def peak(size: int) -> int | None:
        grown = 8000 + (2 * size if size <= 8 else 16 + 6 * (size - 8))
        return grown if grown <= capacity else None  # past the device: out of memory

    true_largest = max(m for m in range(1, 5000) if (peak(m) or usable + 1) <= usable)
    measured = {m: Measurement(m, peak(m), peak(m)) for m in (1, 2, 4, 8)}
    predicted = fit_line(list(measured.values())).largest_within(usable, 5000)
    assert peak(predicted) is None  # the line from the small sizes overshoots
    tried = []

    def measure(size: int) -> Measurement:
        tried.append(size)
        return measured.setdefault(size, Measurement(size, peak(size), peak(size)))

    largest = narrow_down(measure, measured, predicted, usable)
    assert 0.95 * true_largest <= largest <= true_largest
    assert measured[largest].fits(usable) and len(tried) <= 8


def test_optimizer_state_that_cannot_be_made_is_does_not_fit(cli, write_recipe, tmp_path):
    """AdamW's two moments for a 1.1M-parameter MLP overflow a 12 MiB simulated device at
    micro-batch 1: exit 3 with the reason, not a half-made optimizer state's KeyError."""
    recipe = small_recipe(
        model={"name": "mlp", "args": {"in_features": 64, "hidden": 512, "depth": 5}},
        batch={"target": 64, "micro": "auto"}, optim={"name": "AdamW", "args": {}})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run",
                 "--simulate-memory", "12MiB")
    assert result.exit_code == 3, result.output
    assert "the recipe does not fit: a step at micro-batch 1 ran out of memory" in result.output
