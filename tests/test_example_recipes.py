"""The bring-your-own-code example recipes train through the real CLI and beat the baseline."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from tests.conftest import REPO

EXAMPLES = REPO / "recipes" / "examples"


def own_module(name: str) -> ModuleType:
    """The example's own module, loaded from its file without touching sys.path."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out(recipe: Path, module: str, dataset: str):
    """The recipe's held-out split, built as mbp builds it (train=False, the recipe's args)."""
    args = yaml.safe_load(recipe.read_text())["data"]["args"]
    return getattr(own_module(module), dataset)(train=False, **args)


def train_json(cli, recipe: Path, run: Path, steps: int) -> dict:
    """Train the recipe for `steps` steps with `mbp train --json`; the closing summary."""
    result = cli("train", recipe, "--out", run, "--json", "--set", f"train.steps={steps}",
                 "--set", f"train.eval_every={steps}")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_segmentation_example_beats_all_background(cli, tmp_path):
    recipe = EXAMPLES / "segmentation.yaml"
    masks = held_out(recipe, "shapes", "Shapes").masks
    background = (masks == 0).double().mean().item()
    summary = train_json(cli, recipe, tmp_path / "run", steps=150)
    assert summary["eval_accuracy"] >= background + 0.1, (summary["eval_accuracy"], background)


@pytest.mark.slow
def test_the_tagger_example_beats_the_most_frequent_tag(cli, tmp_path):
    recipe = EXAMPLES / "tagger.yaml"
    tags = torch.cat(held_out(recipe, "tagging", "Tagging").tags)
    most_frequent = tags.bincount().max().item() / len(tags)
    summary = train_json(cli, recipe, tmp_path / "run", steps=60)
    assert summary["eval_accuracy"] >= most_frequent + 0.5, (summary["eval_accuracy"],
                                                              most_frequent)
