"""Streams (IterableDatasets: no length, no indexing) through the real `mbp train`: target
batches taken in order, a pass an epoch, equal to full-batch steps on the same samples computed
here; resumed where the stream was; on two ranks."""

from __future__ import annotations

import pytest
import torch
from test_hugging_face import LR, hf_recipe, write_beside
from torch.utils.data import default_collate

from tests import hf_parts

N, TARGET = 37, 13  # a pass: 13 + 13 + 11, then the next pass begins
OWN_LOSS = {"name": "model", "args": {"items": "next_tokens"}}


def hand_steps(steps: int) -> dict[str, torch.Tensor]:
    """SGD on the stream's samples in order, each target batch in one piece, the model's own
    mean loss (float64)."""
    torch.manual_seed(0)
    model = hf_parts.mean_loss_lm().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    samples = list(hf_parts.TextStream(train=True, n=N))
    batches = [samples[0:13], samples[13:26], samples[26:37]] * 2
    for batch in batches[:steps]:
        model(**default_collate(batch))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def stream_recipe(tmp_path, **train) -> object:
    return write_beside(tmp_path / "project", hf_recipe(
        "mean_loss_lm", OWN_LOSS, {"name": "hf_parts:TextStream"}, **{"steps": 4, **train}))


def assert_equal(run, expected: dict[str, torch.Tensor], tolerance: float = 1e-10) -> None:
    got = torch.load(run / "model.pt", weights_only=True)
    for name, value in expected.items():
        assert float((got[name] - value).norm() / value.norm()) <= tolerance, name


def test_a_stream_trains_in_order_across_passes(cli, tmp_path):
    result = cli("train", stream_recipe(tmp_path, eval_every=2), "--out", tmp_path / "run",
                 "--json")
    assert result.exit_code == 0, result.output
    assert_equal(tmp_path / "run", hand_steps(4))
    lines = [line for line in result.stdout.splitlines() if '"event": "step"' in line]
    assert [('"epoch": 2' in line) for line in lines] == [False, False, False, True]


def test_a_stopped_stream_resumes_where_it_was(cli, tmp_path):
    recipe = stream_recipe(tmp_path)
    assert cli("train", recipe, "--out", tmp_path / "whole").exit_code == 0
    assert cli("train", recipe, "--out", tmp_path / "parts", "--max-steps", 2).exit_code == 0
    resumed = cli("train", "--resume", tmp_path / "parts")
    assert resumed.exit_code == 0, resumed.output
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "model.pt", weights_only=True)
    assert all(torch.equal(whole[name], parts[name]) for name in whole)


def test_a_hugging_face_stream_trains_in_its_order(cli, tmp_path):
    """`datasets`' to_iterable_dataset(): the first target batch is its first 13 texts."""
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", data={"name": "hf_parts:texts_stream"}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    stream_first = hf_parts.Texts(train=True)
    torch.manual_seed(0)
    model = hf_parts.gpt2().double()
    names = [name for name, _ in model.named_parameters()]
    model(**default_collate([stream_first[i] for i in range(TARGET)])).loss.backward()
    parameters = dict(model.named_parameters())
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    update = torch.cat([(saved[n] - parameters[n].detach()).flatten() for n in names])
    gradient = torch.cat([parameters[n].grad.flatten() for n in names])
    assert float((update + LR * gradient).norm() / (LR * gradient).norm()) <= 1e-5


@pytest.mark.parametrize(("key", "value"), [("train.epochs", "2"), ("train.num_workers", "2")])
def test_what_a_stream_cannot_give_is_refused(cli, tmp_path, key, value):
    recipe = stream_recipe(tmp_path)
    settings = ["--set", f"{key}={value}"] + (["--set", "train.steps=null"]
                                              if key == "train.epochs" else [])
    for command in (("validate", recipe, *settings),
                    ("train", recipe, "--out", tmp_path / "run", *settings)):
        result = cli(*command)
        assert result.exit_code == 2 and key in result.output, result.output


@pytest.mark.slow
def test_a_stream_over_two_ranks_equals_the_full_batch_steps(tmp_path):
    from test_distributed import mbp

    recipe = stream_recipe(tmp_path)
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--set", "batch.shares=[3, 1]",
              "--set", "batch.micro=[4, 2]", "-q", cwd=tmp_path / "project")
    assert run.returncode == 0, run.stderr
    assert_equal(tmp_path / "project" / "run", hand_steps(4))


def test_a_hugging_face_stream_resumes_from_its_own_state(cli, tmp_path):
    """datasets' stream keeps a state_dict: the checkpoint holds it, and the resumed run, which
    loads it instead of reading the stream again, equals the uninterrupted one."""
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "mean_loss_lm", OWN_LOSS, {"name": "hf_parts:texts_stream"}, steps=4))
    assert cli("train", recipe, "--out", tmp_path / "whole").exit_code == 0
    assert cli("train", recipe, "--out", tmp_path / "parts", "--max-steps", 2).exit_code == 0
    (saved,) = (tmp_path / "parts" / "checkpoints").glob("*.pt")
    position = torch.load(saved, weights_only=False)["loop"]["stream_position"]
    assert position["offset"] == 26 and position["state"] is not None
    resumed = cli("train", "--resume", tmp_path / "parts")
    assert resumed.exit_code == 0, resumed.output
    whole = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "model.pt", weights_only=True)
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    assert_equal(tmp_path / "whole", hand_steps(4))


def test_a_partitioned_stream_is_refused(cli, tmp_path):
    recipe = stream_recipe(tmp_path)
    partition = ["--set", "train.partition={at: [head]}"]
    for command in (("validate", recipe, *partition),
                    ("train", recipe, "--out", tmp_path / "run", *partition)):
        result = cli(*command)
        assert result.exit_code == 2 and "train.partition" in result.output, result.output


def test_a_pass_shorter_than_the_target_batch_is_said(cli, tmp_path):
    recipe = stream_recipe(tmp_path)
    result = cli("train", recipe, "--out", tmp_path / "run", "--set", "batch.target=64",
                 "--set", "train.steps=2")
    assert result.exit_code == 0, result.output
    assert "pass ended after 37 samples, short of a target batch of 64" in result.output
    ordinary = cli("train", recipe, "--out", tmp_path / "other")
    assert "short of a target batch" not in ordinary.output


@pytest.mark.slow
def test_a_stream_stopped_and_resumed_on_two_ranks_equals_the_full_batch_steps(tmp_path):
    from test_distributed import mbp

    recipe = stream_recipe(tmp_path)
    ranks = ("--nproc", 2, "--set", "batch.shares=[3, 1]", "--set", "batch.micro=[4, 2]")
    first = mbp("train", recipe, "--out", "run", *ranks, "--max-steps", 2, "-q",
                cwd=tmp_path / "project")
    assert first.returncode == 0, first.stderr
    resumed = mbp("train", "--resume", "run", "--nproc", 2, "-q", cwd=tmp_path / "project")
    assert resumed.returncode == 0, resumed.stderr
    assert_equal(tmp_path / "project" / "run", hand_steps(4))
