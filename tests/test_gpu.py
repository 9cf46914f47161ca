"""CUDA figures: run where a GPU is lent (`pytest -m gpu`); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from mbp_cli.memory.probe import ProbeOptions, probe_recipe
from mbp_cli.recipe import load_recipe
from tests.conftest import small_recipe

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MiB = 2**20


def test_cuda_probe_choice_fits_and_the_estimate_is_close(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(
        model={"name": "resnet18", "args": {"num_classes": 10}},
        data={"name": "FakeData", "args": {"size": 64, "image_size": [3, 64, 64]}},
        batch={"target": 512, "micro": "auto"}, train={"steps": 1, "device": "cuda"})))
    cuda = probe_recipe(recipe, ProbeOptions(torch.device("cuda"), budget_bytes=1024 * MiB))
    assert cuda.backend == "cuda" and cuda.verified_peak_bytes <= cuda.usable_bytes
    assert all(m.reserved_bytes >= m.peak_bytes for m in cuda.measurements if m.peak_bytes)
    estimate = probe_recipe(recipe, ProbeOptions(None, budget_bytes=1024 * MiB, estimate=True))
    by_size = {m.micro_batch: m.peak_bytes for m in cuda.measurements}
    for m in estimate.measurements:
        if m.micro_batch in by_size and by_size[m.micro_batch]:
            assert abs(m.peak_bytes - by_size[m.micro_batch]) <= 0.15 * by_size[m.micro_batch]
