"""Partitioned training with synthetic labels (experimental): the cut, the codes, each part's
exactness under MBP, the composed model, resume and bad input, through the real CLI."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import default_collate

from mbp_cli.partition.build import build_partition
from mbp_cli.partition.codes import make_codes
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.target_batch import target_batch_step
from tests.conftest import REPO, small_recipe

# A 4-layer MLP on the digits: 0 Flatten, 1 Linear, 2 ReLU, 3 Linear, 4 ReLU, 5 Linear, 6 ReLU,
# 7 Linear; cut before ReLUs, so each part ends with a Linear that can reach Gaussian codes.
MLP = {"name": "mlp", "args": {"in_features": 64, "hidden": 16, "depth": 3}}


def partitioned(at: list, **train: object) -> dict:
    """A quick partitioned digits recipe."""
    return small_recipe(
        model=copy.deepcopy(MLP), batch={"target": 64, "micro": 16},
        optim={"name": "AdamW", "args": {"lr": 0.01}},
        loss={"name": "cross_entropy", "args": {"label_smoothing": 0.1}},
        train={"steps": 6, "eval_every": 0, "checkpoint_every": 2, "device": "cpu",
               "partition": {"at": at, "labels": {"noise": 0.2}}, **train})


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def mbp(*args: object, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in its own process (side by side needs real ranks)."""
    return subprocess.run([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_codes_are_fixed_by_the_seed(tmp_path):
    shapes = [torch.Size([4, 2, 2]), torch.Size([7])]
    first, again = make_codes("gaussian", shapes, 10, 3), make_codes("gaussian", shapes, 10, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert [c.shape for c in first] == [(10, 4, 2, 2), (10, 7)]
    assert not torch.equal(make_codes("gaussian", shapes, 10, 4)[0], first[0])
    uniform = make_codes("uniform", shapes, 10, 3)[0]
    assert uniform.min() >= 0 and uniform.max() < 1
    # a run draws them from labels.seed (default: the recipe's seed) at the cut's width
    recipe = load_recipe(write(tmp_path, partitioned([2, 4])))
    codes = build_partition(recipe, torch.device("cpu")).codes
    assert [c.shape for c in codes] == [(10, 16), (10, 16)]
    assert all(torch.equal(a, b) for a, b in zip(
        codes, make_codes("gaussian", [torch.Size([16])] * 2, 10, 0), strict=True))


@pytest.mark.parametrize(("part", "own_data"), [(0, False), (1, False), (2, False),
                                                (0, True), (2, True)])
def test_each_part_trains_exactly_as_its_full_batch(tmp_path, part, own_data):
    """fp64: the gradient of a part's target batch streamed as uneven micro-batches (7+…+5)
    equals the full batch's, computed here with torch's own losses; for tensors in memory
    (the digits) and for a user's dataset of dict samples."""
    recipe = partitioned([2, 4], dtype="float64")
    if own_data:
        recipe["model"] = {"name": "byo:mlp", "args": {}}
        recipe["data"] = {"name": "byo:DictFeatures", "args": {}, "target": "label"}
        shutil.copy(REPO / "tests" / "byo.py", tmp_path / "byo.py")
    recipe = load_recipe(write(tmp_path, recipe))
    partition = build_partition(recipe, torch.device("cpu"))
    setup, model = partition.setups[part], partition.parts[part]
    samples = [setup.train_set[i] for i in range(40)]
    pieces = [default_collate(samples[i:i + 7]) for i in range(0, 40, 7)]
    target_batch_step(setup.micro_step, pieces)
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    batch = default_collate(samples)
    inputs, targets = (batch["input"], batch["label"]) if isinstance(batch, dict) else batch
    output = model(inputs.double())
    if part < 2:  # towards the next cut's code: mean squared error over every element
        loss = F.mse_loss(output, targets.double().reshape(output.shape))
    else:
        loss = F.cross_entropy(output, targets, label_smoothing=0.1)
    loss.backward()
    for got, want in zip(streamed, (p.grad for p in model.parameters()), strict=True):
        assert (got - want).norm() <= 1e-10 * want.norm()


def test_the_composed_model_is_the_parts_in_turn(tmp_path):
    """ResNet-18 cut at layer3: part 2 ∘ part 1 is the model's own forward, bit for bit, and
    part 1's code has the activation's shape there."""
    recipe = load_recipe(write(tmp_path, small_recipe(
        model={"name": "resnet18", "args": {"num_classes": 10}},
        data={"name": "synthetic", "args": {"num_samples": 32, "shape": [3, 32, 32]}},
        batch={"target": 16, "micro": 4},
        train={"steps": 1, "device": "cpu", "partition": {"at": ["layer3"]}})))
    partition = build_partition(recipe, torch.device("cpu"))
    first, second = partition.parts
    assert partition.codes[0].shape == (10, 128, 4, 4)
    model = partition.whole.model.eval()
    inputs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(second(first(inputs)), model(inputs))
    names = set(model.state_dict())
    assert set(first.state_dict()) | set(second.state_dict()) == names
    assert not set(first.state_dict()) & set(second.state_dict())


@pytest.mark.slow
def test_a_partitioned_run_trains_composes_and_evaluates(tmp_path, cli):
    recipe = write(tmp_path, partitioned([4], steps=30))
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.strip().splitlines()]
    summary = events[-1]
    run = tmp_path / "run"
    assert summary["steps"] == summary["total_steps"] == 60
    # each part's events name it; the composed model's eval is part 0
    assert [(e["event"], e["part"]) for e in events if e["event"] in ("part", "start")] == [
        ("part", 1), ("start", 1), ("part", 2), ("start", 2)]
    assert {e["part"] for e in events if e["event"] == "step"} == {1, 2}
    assert events[-2]["event"] == "eval" and events[-2]["part"] == 0
    assert summary["eval_accuracy"] > 0.5  # composed: well above 10% chance
    parts = summary["partition"]["parts"]
    assert [(p["begins"], p["ends"]) for p in parts] == [("input", "4"), ("4", "output")]
    assert parts[0]["eval_accuracy"] is None and parts[0]["eval_loss"] < 1  # mse to the codes
    assert parts[1]["eval_accuracy"] > 0.9  # classes from noisy codes
    codes = weights(run / "codes.pt")
    assert codes["cut_1"].shape == (10, 16)
    # model.pt is the recipe's own model: eval reads it as any run's, with the same figures
    evaluated = cli("eval", run, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["eval_accuracy"] == pytest.approx(
        summary["eval_accuracy"])
    listed = json.loads(cli("runs", tmp_path, "--json").output)
    assert [(r["status"], r["steps"], r["name"]) for r in listed] == [
        ("done", 60, "test-digits")]
    sample = tmp_path / "sample.pt"
    torch.save(torch.rand(1, 8, 8), sample)
    predicted = cli("predict", run, sample, "--json")
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(predicted.output)[0]["top"][0]) == 3
    # the report pictures each part's curves and tables the whole run beside its parts
    reported = cli("report", run, "--out", tmp_path / "report.png")
    assert reported.exit_code == 0, reported.output
    assert "run/part-1" in reported.output and "run/part-2" in reported.output
    assert (tmp_path / "report.png").stat().st_size > 20_000


@pytest.mark.slow
def test_parts_side_by_side_equal_parts_in_turn_and_a_resume_continues_the_right_part(
        tmp_path):
    recipe = write(tmp_path, partitioned([2, 4]))
    in_turn = mbp("train", recipe, "--out", "in-turn", cwd=tmp_path)
    assert in_turn.returncode == 0, in_turn.stderr
    side = mbp("train", recipe, "--out", "side", "--nproc", "3", cwd=tmp_path)
    assert side.returncode == 0, side.stderr
    expected = weights(tmp_path / "in-turn/model.pt")
    got = weights(tmp_path / "side/model.pt")
    assert all(torch.equal(got[k], v) for k, v in expected.items())

    # 6 steps a part: stop in the middle of part 2, then resume
    stopped = mbp("train", recipe, "--out", "stopped", "--max-steps", "8", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert "continue with: mbp train --resume stopped" in stopped.stderr
    summary = json.loads((tmp_path / "stopped/summary.json").read_text())
    assert [p["steps"] for p in summary["partition"]["parts"]] == [6, 2]
    assert not (tmp_path / "stopped/model.pt").exists()
    resumed = mbp("train", "--resume", "stopped", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "part 1/3 (input → 2): learns the class code at 2 from the inputs; 1,040 " \
        "parameters already trained: loaded" in resumed.stderr
    assert "resuming at step 2" in resumed.stderr
    got = weights(tmp_path / "stopped/model.pt")
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize(("at", "model", "message"), [
    (["7", "nope"], MLP, "the model calls no module 'nope'. Valid cut points: 1, 2, 3, 4, 5, "
                         "6, 7"),
    ([0], MLP, "cannot be cut at 0: the part before it would be empty"),
    (["layer3.0.conv2"], {"name": "resnet18", "args": {"num_classes": 10}},
     "cannot be cut at layer3.0.conv2: 2 values cross there"),
    ([4, 2], MLP, "must name distinct points in the order the model runs them"),
])
def test_a_model_that_cannot_be_cut_there_is_one_line_with_the_valid_points(
        cli, tmp_path, at, model, message):
    recipe = partitioned(at)
    recipe["model"] = model
    if model is not MLP:
        recipe["data"] = {"name": "synthetic", "args": {"num_samples": 80, "shape": [3, 32, 32]}}
    result = cli("train", write(tmp_path, recipe), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert message in result.output
    assert "Valid cut points:" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
    validated = cli("validate", write(tmp_path, recipe))  # refused as training refuses it
    assert validated.exit_code == 2 and message in validated.output


def test_partition_keys_are_checked_like_any_recipe_key(cli, tmp_path):
    recipe = partitioned([4])
    recipe["train"]["partition"]["labels"] = {"knd": "gaussian", "dim": 5}
    recipe["train"]["partition"]["intermediate_loss"] = "l2"
    recipe["memory"] = {"checkpointing": "on"}
    result = cli("train", write(tmp_path, recipe))
    assert result.exit_code == 2
    assert "train.partition.labels.knd: unknown key; did you mean train.partition.labels.kind?" \
        in result.output
    assert "train.partition.intermediate_loss: 'l2' is not one of mse, cosine" in result.output
    assert "memory.checkpointing: not supported with train.partition" in result.output
    # a code must have the cut's width: the composed model is the recipe's own
    recipe = partitioned([4])
    recipe["train"]["partition"]["labels"] = {"dim": 5}
    result = cli("train", write(tmp_path, recipe))
    assert result.exit_code == 2
    assert "the activation at 4 has 16 values" in result.output
    validated = cli("validate", write(tmp_path, recipe))  # validate finds it too
    assert validated.exit_code == 2 and "the activation at 4 has 16 values" in validated.output
    validated = cli("validate", write(tmp_path, partitioned([4])))
    assert validated.exit_code == 0 and "; cut into 2 parts at 4" in validated.output
    # gaussian codes after a ReLU: said before training
    after_relu = cli("train", write(tmp_path, partitioned([5])), "--out", tmp_path / "relu",
                     "--max-steps", "1")
    assert after_relu.exit_code == 0, after_relu.output
    assert "warning: the activation at 5 is never negative" in after_relu.output
    result = cli("train", write(tmp_path, partitioned([4])), "--nproc", "3")
    assert result.exit_code == 2
    assert "cuts the model into 2 parts" in result.output


@pytest.mark.slow
def test_micro_auto_probes_each_part_on_its_own_memory(tmp_path, cli):
    """Under one simulated device, each part (its weights, gradients, optimizer state and
    activations only) fits a larger micro-batch than the whole model does."""
    recipe = partitioned([6], steps=1)
    recipe["model"] = {"name": "mlp", "args": {"in_features": 64, "hidden": 512, "depth": 5}}
    recipe["batch"] = {"target": 1024, "micro": "auto"}
    recipe["optim"] = {"name": "SGD", "args": {"lr": 0.01}}  # AdamW's state would not fit
    path = write(tmp_path, recipe)
    whole = cli("train", path, "--out", tmp_path / "whole", "--set", "train.partition=null",
                "--simulate-memory", "12MiB")
    assert whole.exit_code == 0, whole.output
    parts = cli("train", path, "--out", tmp_path / "parts", "--simulate-memory", "12MiB")
    assert parts.exit_code == 0, parts.output

    def probed(folder: Path) -> dict:
        return json.loads((folder / "probe.json").read_text())

    largest = probed(tmp_path / "whole")["largest_micro_batch"]
    for part in (1, 2):
        answer = probed(tmp_path / f"parts/parts/part-{part}")
        assert answer["largest_micro_batch"] > 1.3 * largest
        assert answer["verified_peak_bytes"] <= answer["usable_bytes"]
    # `mbp probe` answers for each part, as training probed it
    probed_parts = cli("probe", path, "--budget", "12MiB", "--json")
    assert probed_parts.exit_code == 0, probed_parts.output
    answers = json.loads(probed_parts.output)["parts"]
    assert [(a["part"], a["begins"], a["ends"]) for a in answers] == [
        (1, "input", "6"), (2, "6", "output")]
    assert all(a["largest_micro_batch"] > 1.3 * largest for a in answers)


def test_targets_that_name_no_class_are_refused(cli, tmp_path):
    """Ignored targets (-100) have no code: one line, exit 2."""
    shutil.copy(REPO / "tests" / "byo.py", tmp_path / "byo.py")
    recipe = partitioned([1])
    recipe["model"] = {"name": "byo:classifier", "args": {}}
    recipe["data"] = {"name": "byo:Features", "args": {"n": 80}}
    for command in ("train", "validate"):
        result = cli(command, write(tmp_path, recipe), *(["--out", tmp_path / "run"]
                                                          if command == "train" else []))
        assert result.exit_code == 2, result.output
        assert "some targets are -100 (ignored items?), which name no class" in result.output


def test_a_partitioned_run_that_fails_before_training_leaves_nothing(cli, tmp_path):
    """As any run: a model that does not fit its data (3 outputs for 10 classes), or a first
    part that does not fit the device, leaves no run folder behind."""
    recipe = partitioned([4])
    recipe["model"]["args"]["out_features"] = 3
    result = cli("train", write(tmp_path, recipe), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "the first training step failed: Target 9 is out of bounds" in result.output
    assert not (tmp_path / "run").exists()
    result = cli("train", write(tmp_path, partitioned([4])), "--out", tmp_path / "run",
                 "--simulate-memory", "20KiB")
    assert result.exit_code == 3, result.output
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_resumed_only_to_train_longer_and_a_part_not_alone(cli, tmp_path):
    recipe = write(tmp_path, partitioned([4], steps=3))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run).exit_code == 0
    again = cli("train", "--resume", run)
    assert again.exit_code == 2
    assert "has already trained all 3 steps of each part: nothing to resume" in again.output
    longer = cli("train", "--resume", run, "--set", "train.steps=5", "--json")
    assert longer.exit_code == 0, longer.output
    summary = json.loads(longer.output.strip().splitlines()[-1])
    assert [p["steps"] for p in summary["partition"]["parts"]] == [5, 5]
    for command in (("train", "--resume"), ("eval",), ("predict",)):
        refused = cli(*command, run / "parts" / "part-1", *(["x.pt"] if "predict" in command
                                                           else []))
        assert refused.exit_code == 2, refused.output
        assert f"is one part of the partitioned run {run}" in refused.output


@pytest.mark.slow
def test_a_signal_stops_a_partitioned_run_that_then_lists_as_stopped_and_resumes(tmp_path):
    recipe = write(tmp_path, partitioned([4], steps=400, checkpoint_every=5))
    process = subprocess.Popen([sys.executable, "-m", "mbp_cli", "train", recipe, "--out", "run",
                                "--set", "batch.micro=2"], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not list((tmp_path / "run/parts/part-1/checkpoints").glob("*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Resume with: mbp train --resume run" in err
    listed = json.loads(mbp("runs", ".", "--json", cwd=tmp_path).stdout)
    assert listed[0]["status"].startswith("stopped at step ")
    assert listed[0]["name"] == "test-digits" and listed[0]["total_steps"] == 800
    evaluated = mbp("eval", "run", cwd=tmp_path)
    assert evaluated.returncode == 2 and "has not trained all its parts" in evaluated.stderr
    stopped_at = int(listed[0]["status"].rsplit(" ", 1)[1])  # in part 1: its own step
    resumed = mbp("train", "--resume", "run", "--set", f"train.steps={stopped_at + 2}",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run/model.pt").is_file()
