"""Shared helpers: write small recipes and run the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mbp_cli.cli import app

REPO = Path(__file__).resolve().parent.parent


def small_recipe(**sections: Any) -> dict[str, Any]:
    """A quick digits recipe (a few steps, uneven micro-batches) with sections replaced."""
    recipe = {
        "name": "test-digits", "seed": 0,
        "model": {"name": "small_cnn", "args": {"num_classes": 10, "width": 8}},
        "data": {"name": "digits", "args": {}},
        "batch": {"target": 50, "micro": 7},
        "optim": {"name": "SGD", "args": {"lr": 0.1}},
        "schedule": {"name": "none"},
        "loss": {"name": "cross_entropy"},
        "train": {"steps": 3, "eval_every": 2, "device": "cpu"},
    }
    recipe.update(sections)
    return recipe


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict (or raw text) to a YAML file in tmp_path and return its path."""

    def write(content: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    return write


@pytest.fixture
def cli():
    """Run `mbp ARGS...` in-process through Typer's CliRunner."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def collect(events: list[dict[str, Any]]) -> list:
    """Sinks for train() that keep each event, as its JSON object, in `events`."""
    return [lambda event: events.append(event.to_dict())]
