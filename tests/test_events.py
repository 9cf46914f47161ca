"""Typed events and their sinks: the metrics file, the terminal, JSON lines, your own logger."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from mbp_cli.commands.output.plain import PlainReporter, Reporter
from mbp_cli.commands.train import train
from mbp_cli.events import Event, Step
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions
from tests.conftest import small_recipe


@dataclass(frozen=True)
class Mystery(Event):
    kind: ClassVar[str] = "mystery"


@pytest.mark.parametrize("reporter", [Reporter(), PlainReporter(1)])
def test_an_unknown_event_is_an_error_not_skipped(reporter):
    with pytest.raises(TypeError, match="has no handler for event Mystery"):
        reporter(Mystery())


def test_a_new_logger_is_one_sink_and_sees_what_metrics_jsonl_has(write_recipe, tmp_path):
    seen: list[Event] = []
    train(load_recipe(write_recipe(small_recipe())), RunOptions(tmp_path / "run"),
          sinks=[seen.append])
    assert [e.kind for e in seen] == ["start", "step", "step", "eval", "step", "eval", "done"]
    assert all(isinstance(e, Step) for e in seen if e.kind == "step")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert logged == [e.to_dict() for e in seen[:-1]]  # all but the summary, in order
