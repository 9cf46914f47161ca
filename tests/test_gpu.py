"""CUDA figures and checks, run by `make gpu-check` where a GPU is lent; skipped elsewhere.

What only a GPU shows: the fake-tensor estimate against CUDA's max_memory_allocated, the probe's
choice against the true largest micro-batch found by search on the device, and exactness in
float64 on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from mbp_cli.data.samples import batch_maker
from mbp_cli.engine.optim import build_optimizer
from mbp_cli.engine.setup import build
from mbp_cli.memory.attention import DeviceAttention
from mbp_cli.memory.estimate import fake_setup
from mbp_cli.memory.measure import StepRunner
from mbp_cli.memory.search import ProbeOptions
from mbp_cli.memory.weigh import probe_recipe
from mbp_cli.recipe.load import load_recipe
from tests.conftest import small_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MiB = 2**20
CUDA = torch.device("cuda")
ESTIMATE_TOLERANCE = 0.10  # estimate vs max_memory_allocated, relative


def image_recipe(write_recipe, model: str, side: int, micro: int | str = "auto"):
    return load_recipe(write_recipe(small_recipe(
        model={"name": model, "args": {"num_classes": 10}},
        data={"name": "FakeData", "args": {"size": 256, "image_size": [3, side, side],
                                           "num_classes": 10}},
        batch={"target": 1024, "micro": micro}, train={"steps": 1, "device": "cuda"})))


@pytest.mark.parametrize("model, micro", [("resnet18", 64), ("resnet50", 32), ("vit_b_16", 16)])
def test_the_estimate_is_within_tolerance_of_cuda(write_recipe, model, micro):
    recipe = image_recipe(write_recipe, model, 224, micro)
    setup = build(recipe, CUDA)
    setup.train_mode()
    real = StepRunner(setup.micro_step, build_optimizer(recipe, setup.model),
                      batch_maker(setup.train_set, setup.collate), "cuda").measure(micro)
    fake, optimizer, parts = fake_setup(recipe)
    fake.train_mode()
    estimated = StepRunner(fake.micro_step, optimizer, parts.make_batch, "estimate",
                           context=lambda: parts.mode,
                           attention=DeviceAttention("cuda")).measure(micro)
    assert real.peak_bytes and estimated.peak_bytes
    error = abs(estimated.peak_bytes - real.peak_bytes) / real.peak_bytes
    assert error <= ESTIMATE_TOLERANCE, (model, real.peak_bytes / MiB,
                                         estimated.peak_bytes / MiB)


def test_the_probe_choice_fits_and_is_within_5_percent_of_the_true_largest(write_recipe):
    recipe = image_recipe(write_recipe, "resnet18", 64)
    budget = 2048 * MiB
    result = probe_recipe(recipe, ProbeOptions(CUDA, budget_bytes=budget))
    assert result.backend == "cuda" and result.verified_peak_bytes <= result.usable_bytes
    setup = build(recipe, CUDA)
    setup.train_mode()
    runner = StepRunner(setup.micro_step, build_optimizer(recipe, setup.model),
                        batch_maker(setup.train_set, setup.collate), "cuda")
    low, high = 1, 2 * result.largest_micro_batch + 2  # the true largest, by bisection
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if runner.measure(middle).fits(result.usable_bytes) \
            else (low, middle)
    assert 0.95 * low <= result.largest_micro_batch <= low


def test_training_on_cuda_is_exact_in_float64(cli, write_recipe, tmp_path):
    runs = {}
    for micro in (7, 50):  # 7 × 7 + 1 against one piece of 50
        recipe = write_recipe(small_recipe(
            batch={"target": 50, "micro": micro},
            train={"steps": 2, "eval_every": 0, "device": "cuda", "dtype": "float64"}),
            name=f"r{micro}.yaml")
        result = cli("train", recipe, "--out", tmp_path / str(micro), "-q")
        assert result.exit_code == 0, result.output
        runs[micro] = torch.load(tmp_path / str(micro) / "model.pt", weights_only=True)
    for name, full in runs[50].items():
        if full.is_floating_point():
            assert ((runs[7][name] - full).norm() / full.norm()).item() <= 1e-10, name


def test_cuda_probe_choice_fits_and_the_estimate_is_close(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(
        model={"name": "resnet18", "args": {"num_classes": 10}},
        data={"name": "FakeData", "args": {"size": 64, "image_size": [3, 64, 64]}},
        batch={"target": 512, "micro": "auto"}, train={"steps": 1, "device": "cuda"})))
    cuda = probe_recipe(recipe, ProbeOptions(CUDA, budget_bytes=1024 * MiB))
    assert cuda.backend == "cuda" and cuda.verified_peak_bytes <= cuda.usable_bytes
    assert all(m.reserved_bytes >= m.peak_bytes for m in cuda.measurements if m.peak_bytes)
    estimate = probe_recipe(recipe, ProbeOptions(None, budget_bytes=1024 * MiB, estimate=True))
    by_size = {m.micro_batch: m.peak_bytes for m in cuda.measurements}
    for m in estimate.measurements:
        if m.micro_batch in by_size and by_size[m.micro_batch]:
            assert abs(m.peak_bytes - by_size[m.micro_batch]) <= 0.15 * by_size[m.micro_batch]
