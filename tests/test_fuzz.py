"""A seeded fuzz of recipe values, builder arguments included: whatever a user writes, mbp
answers with an exit code — 0, 2 (a usage error, one line) or 3 (does not fit) — and never a
traceback."""

from __future__ import annotations

import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mbp_cli.cli import app

# Bundled recipes whose builders are all built in (a builder of your own keeps its traceback)
KEYS = {
    "digits": ["model.args.num_classes", "model.args.width", "model.args.in_channels",
               "optim.args.lr", "optim.args.weight_decay", "loss.args.label_smoothing",
               "loss.args.ignore_index", "loss.args.weight", "batch.micro", "batch.target",
               "train.steps", "schedule.warmup_steps", "optim.clip_grad_norm", "data.resize",
               "data.normalize", "data.eval_fraction", "data.args.nothing", "seed"],
    "tiny-lm": ["model.args.vocab_size", "model.args.dim", "model.args.layers",
                "data.args.num_samples", "data.args.vocab_size", "data.args.min_len",
                "data.args.max_len", "data.args.ignore_index", "optim.args.betas",
                "optim.args.eps", "loss.args.ignore_index", "loss.args.class_dim",
                "batch.micro"],
    "examples/partitioned-mlp": ["model.args.in_features", "model.args.hidden",
                                 "model.args.depth", "model.args.dropout", "train.partition.at",
                                 "train.partition.labels.noise", "train.partition.labels.dim",
                                 "train.partition.labels.kind",
                                 "train.partition.intermediate_loss"],
}
SCALARS = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(), st.none(), st.text(max_size=6),
                    st.sampled_from(["abc", "cpu", "auto", "mse", "uniform", "0.5", "1e-3"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.sampled_from(["a", "name", "args"]), SCALARS, max_size=2))


def as_text(value: object) -> str:
    """The value as YAML text on a --set line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix(
        "\n...").removesuffix("...").strip()


@st.composite
def overrides(draw: st.DrawFn) -> tuple[str, list[str]]:
    recipe = draw(st.sampled_from(sorted(KEYS)))
    sets = []
    for key in draw(st.lists(st.sampled_from(KEYS[recipe]), min_size=1, max_size=3)):
        text = draw(st.one_of(VALUES.map(as_text), st.text(max_size=8)))  # or raw text
        sets += ["--set", f"{key}={text}"]
    return recipe, sets


def answers_with_an_exit_code(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, catch_exceptions=False)  # a traceback fails here
    assert result.exit_code in (0, 2, 3), result.output
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("error: "), result.output


@pytest.mark.slow
@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_validate_answers_every_value_with_an_exit_code(case):
    recipe, sets = case
    answers_with_an_exit_code(["validate", recipe, *sets])


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_one_step_of_training_answers_every_value_with_an_exit_code(case):
    recipe, sets = case
    with tempfile.TemporaryDirectory() as folder:
        answers_with_an_exit_code(["train", recipe, *sets, "--set", "train.eval_every=0",
                                   "--set", "train.device=cpu", "--max-steps", "1",
                                   "--out", f"{folder}/run", "--quiet"])
