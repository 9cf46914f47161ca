"""Gradient clipping once per target batch, on the full batch's gradient: a split clips as one
piece would (fp64, against torch's own clipping of the full-batch gradient)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mbp_cli.catalog.datasets import digits
from mbp_cli.catalog.models import mlp
from mbp_cli.data.batching import epoch_target_batches
from tests.conftest import small_recipe


@pytest.mark.parametrize(("clip", "value"), [("clip_grad_norm", 0.05), ("clip_grad_value", 0.002)])
def test_clipping_a_split_equals_clipping_the_full_batch(cli, write_recipe, tmp_path, clip,
                                                        value):
    recipe = small_recipe(model={"name": "mlp", "args": {"hidden": 32}},
                          optim={"name": "SGD", "args": {"lr": 0.5}, clip: value},
                          train={"steps": 1, "eval_every": 0, "device": "cpu",
                                 "dtype": "float64"})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    step = next(e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "step")

    torch.manual_seed(0)
    model = mlp(hidden=32).double()
    data = digits(train=True)
    batch = epoch_target_batches(len(data), 50, seed=0, epoch=0, drop_last=False)[0]
    F.cross_entropy(model(data.inputs[batch].double()), data.targets[batch]).backward()
    if clip == "clip_grad_norm":
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), value)
        assert norm > value  # the clip is active
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        torch.nn.utils.clip_grad_value_(model.parameters(), value)
    assert step["grad_norm"] == pytest.approx(float(norm), rel=1e-10)
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected = p - 0.5 * p.grad
            assert float((got[name] - expected).norm() / expected.norm()) <= 1e-10, name


def test_no_clipping_no_norm(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run", "--json")
    steps = [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "step"]
    assert steps and all(e["grad_norm"] is None for e in steps)
