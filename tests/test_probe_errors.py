"""A training step that fails under `mbp probe` (with --strategies, with --estimate) is explained
as `mbp train` explains it: one line and exit 2 for torch's complaint, your traceback and one
line where your own code raised."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

FAILING = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class Samples(Dataset):
    def __init__(self, train=True):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(12, 6, generator=g), torch.randint(2, (12,), generator=g)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class CachingBlock(nn.Module):
    """Keeps its input as a cache that a second call in the same step reads, as a KV cache
    is kept: checkpointing's recompute finds it filled."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6)
        self.cache = None

    def forward(self, x):
        if self.cache is not None:
            x = torch.cat([self.cache, x], dim=1)
        self.cache = x.detach()
        return torch.tanh(self.layer(x))


class Net(nn.Module):
    def __init__(self, mistake="none"):
        super().__init__()
        self.mistake = mistake
        self.blocks = nn.Sequential(CachingBlock(), CachingBlock())
        self.head = nn.Linear(5 if mistake == "shape" else 6, 2)

    def forward(self, x):
        for block in self.blocks:
            block.cache = None  # a new step: the cache starts empty
        if self.mistake == "bug":
            raise ValueError("my forward is broken")
        x = self.blocks(x)
        if self.mistake == "in place":
            x = torch.sigmoid(x)
            x += 1  # sigmoid's backward needs its output: fails in the backward
        return self.head(x)
'''

# torch's words for a shape mistake: the real kernel's, the fake tensors' (--estimate)
SHAPE = ("the first training step failed: mat1 and mat2 shapes cannot be multiplied",
         "the first training step failed: a and b must have same reduction dim")
IN_PLACE = ("the first training step failed: one of the variables needed for gradient "
            "computation has been modified by an inplace operation",)
ESTIMATE = ("--estimate", "--device-memory", "1GiB")


def failing_recipe(tmp_path: Path, mistake: str) -> Path:
    (tmp_path / "failing.py").write_text(FAILING)
    recipe = {"name": "failing", "model": {"name": "failing:Net", "args": {"mistake": mistake}},
              "data": {"name": "failing:Samples"}, "batch": {"target": 4, "micro": 2},
              "optim": {"name": "SGD", "args": {"lr": 0.1}},
              "train": {"steps": 1, "device": "cpu"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("options", [(), ("--strategies",), ESTIMATE,
                                     ("--strategies", *ESTIMATE)])
@pytest.mark.parametrize(("mistake", "message"), [
    ("shape", SHAPE),  # in the forward
    ("in place", IN_PLACE),  # in the backward
])
def test_torchs_complaint_is_one_line(cli, tmp_path, mistake, message, options):
    result = cli("probe", failing_recipe(tmp_path, mistake), *options)
    assert result.exit_code == 2, result.output
    assert any(words in result.stderr for words in message), result.stderr
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1
    assert "fake_tensor" not in result.stderr  # the estimate's kernels log nothing of it


def test_a_recompute_that_fails_under_checkpointing_is_one_line(cli, tmp_path):
    """Plain steps work; checkpointing's recompute reads a filled cache (as Hugging Face's
    causal LMs do with use_cache): the strategies that recompute fail."""
    recipe = failing_recipe(tmp_path, "none")
    assert cli("probe", recipe).exit_code == 0
    result = cli("probe", recipe, "--strategies")
    assert result.exit_code == 2, result.output
    assert SHAPE[0] in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("options", [(), ("--strategies",), ESTIMATE])
def test_your_own_code_raising_shows_its_traceback_and_one_line(cli, tmp_path, options):
    result = cli("probe", failing_recipe(tmp_path, "bug"), *options)
    assert result.exit_code == 2, result.output
    assert "Traceback" in result.stderr and 'raise ValueError("my forward is broken")' in \
        result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"error: the first training step failed in {tmp_path / 'failing.py'}: "
        "ValueError: my forward is broken")
