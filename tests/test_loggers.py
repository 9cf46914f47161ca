"""train.log: [tensorboard] — the event file read back with TensorBoard's own reader."""

from __future__ import annotations

import json

import pytest
from conftest import small_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir, tag: str) -> dict[int, float]:
    reader = EventAccumulator(str(run_dir / "tensorboard"))
    reader.Reload()
    values = [(e.step, e.value) for e in reader.Scalars(tag)]
    steps = [step for step, _ in values]
    assert len(steps) == len(set(steps)), f"{tag} logged twice for a step: {steps}"
    return dict(values)


def test_tensorboard_scalars_equal_the_metrics_across_a_resume(cli, write_recipe, tmp_path):
    recipe = write_recipe(small_recipe(train={"steps": 4, "eval_every": 1, "device": "cpu",
                                              "checkpoint_every": 1, "log": ["tensorboard"]}))
    run_dir = tmp_path / "run"
    assert cli("train", recipe, "--out", run_dir, "--max-steps", "3", "-q").exit_code == 0
    # The first part had logged step 3; the resume starts from the checkpoint of step 2.
    (run_dir / "checkpoints/step-000003.pt").unlink()
    assert cli("train", "--resume", run_dir, "-q").exit_code == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if r["event"] == "step"}
    evals = {r["step"]: r for r in records if r["event"] == "eval"}
    assert sorted(steps) == [1, 2, 3, 4]
    for tag, field, source in [("train/loss", "loss", steps), ("train/lr", "lr", steps),
                               ("train/micro_batch", "micro_batch", steps),
                               ("eval/loss", "eval_loss", evals),
                               ("eval/accuracy", "eval_accuracy", evals)]:
        logged = scalars(run_dir, tag)
        assert sorted(logged) == sorted(source)
        for step, value in logged.items():
            assert value == pytest.approx(source[step][field], rel=1e-6), (tag, step)


def test_an_unknown_logger_is_named_with_the_ones_there_are(cli, write_recipe):
    recipe = write_recipe(small_recipe(train={"steps": 1, "device": "cpu",
                                              "log": ["tensorbord"]}))
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "train.log: 'tensorbord' is not a logger mbp has" in result.output
    assert "did you mean tensorboard" in result.output
