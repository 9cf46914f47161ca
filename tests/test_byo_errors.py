"""Mistakes in your own model, data and loss: one message and exit 2 when they are the recipe's
(with the traceback when they are in your own code), and no run folder left behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_byo import CASES, byo_recipe, write_beside_byo

MISTAKES = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class Samples(Dataset):
    """What a sample is, by `kind`."""

    def __init__(self, kind="ok", train=True):
        self.kind = kind

    def __len__(self):
        return 12

    def __getitem__(self, i):
        x = torch.randn(6)
        if self.kind == "string target":
            return x, "cat"
        if self.kind == "not tensors":
            return object(), 1
        if self.kind == "wrong shape":
            return torch.randn(5), 1
        if self.kind == "one element":
            return (x,)
        if self.kind == "raises":
            raise KeyError("no such row")
        if self.kind == "float target":
            return x, float(i % 2)
        if self.kind == "dict without target":
            return {"x": x, "y": i % 2}
        if self.kind == "class out of range":
            return x, 7
        return x, i % 2


class Net(nn.Module):
    def __init__(self, returns="tensor"):
        super().__init__()
        self.returns = returns
        self.layer = nn.Linear(6, 2)

    def forward(self, x):
        out = self.layer(x)
        if self.returns == "string":
            return "scores"
        if self.returns == "dict without scores":
            return {"hidden": "no tensor here"}
        if self.returns == "one score":
            return out[:, 0]
        if self.returns == "list":
            return [out.tolist()]
        if self.returns == "a bug":
            return out + self.forgotten
        return out


def broken(**kwargs):
    raise ValueError("my constructor is broken")


def mean_loss(output, target):
    return torch.nn.functional.cross_entropy(output, target)


def broken_loss(output, target):
    raise ValueError("my loss is broken")
'''


def mistake_recipe(tmp_path: Path, model_args=None, data_args=None, loss="cross_entropy",
                   model="mistakes:Net") -> Path:
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "mistakes.py").write_text(MISTAKES)
    recipe = {"name": "mistake", "model": {"name": model, "args": model_args or {}},
              "data": {"name": "mistakes:Samples", "args": data_args or {}},
              "loss": loss, "batch": {"target": 4, "micro": 2},
              "optim": {"name": "SGD", "args": {"lr": 0.1}},
              "train": {"steps": 1, "device": "cpu"}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(("model_args", "data_args", "loss", "message"), [
    ({"returns": "string"}, {}, "cross_entropy",
     "the model returned a str; expected a tensor, a dict or object with logits or out"),
    ({"returns": "dict without scores"}, {}, "cross_entropy",
     "the model returned a dict with keys ['hidden']; expected a tensor"),
    ({}, {"kind": "string target"}, "cross_entropy",
     "(a str, a str); expected a tensor"),
    ({}, {"kind": "not tensors"}, "cross_entropy", "a sample is a tuple of (a object, a int)"),
    ({}, {"kind": "wrong shape"}, "cross_entropy",
     "the first training step failed: mat1 and mat2 shapes cannot be multiplied"),
    ({}, {"kind": "one element"}, "cross_entropy",
     "expected (inputs, target), (input1, input2, …, target) or a dict with a target key"),
    ({}, {}, "mistakes:mean_loss", "returned one number (a mean?); expected per-item losses"),
])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_wrong_outputs_batches_and_samples_are_one_message(cli, tmp_path, model_args, data_args,
                                                           loss, message, command):
    recipe = mistake_recipe(tmp_path, model_args, data_args, loss)
    extra = ["--out", tmp_path / "run"] if command == "train" else []
    result = cli(command, recipe, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing written: fix it and run the same command


@pytest.mark.parametrize(("where", "message"), [
    ("model", "error: model mistakes:broken raised ValueError: my constructor is broken"),
    ("forward", "mistakes.py: AttributeError: 'Net' object has no attribute 'forgotten'"),
    ("loss", "mistakes.py: ValueError: my loss is broken"),
    ("dataset", "raised KeyError: 'no such row'"),
    ("dataset in a worker", "raised KeyError: 'no such row'"),
])
def test_your_own_code_raising_keeps_its_traceback(cli, tmp_path, where, message):
    if where == "model":
        recipe = mistake_recipe(tmp_path, model="mistakes:broken")
    elif where == "forward":
        recipe = mistake_recipe(tmp_path, model_args={"returns": "a bug"})
    elif where == "loss":
        recipe = mistake_recipe(tmp_path, loss="mistakes:broken_loss")
    else:
        recipe = mistake_recipe(tmp_path, data_args={"kind": "raises"})
    workers = "1" if where.endswith("worker") else "0"
    result = cli("train", recipe, "--out", tmp_path / "run", "--set",
                 f"train.num_workers={workers}")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "mistakes.py" in result.stderr  # their code
    assert message in result.stderr and not (tmp_path / "run").exists()
    if where.startswith("dataset"):  # which sample, so it can be looked at
        assert re.search(r"error: dataset Samples, sample \d+, raised", result.stderr)


def test_fixing_the_model_and_running_the_same_command_again_just_works(cli, tmp_path):
    recipe = mistake_recipe(tmp_path, {"returns": "string"})
    command = ("train", recipe, "--out", tmp_path / "run")
    assert cli(*command).exit_code == 2
    recipe.write_text(recipe.read_text().replace("returns: string", "returns: tensor"))
    assert cli(*command).exit_code == 0


def test_a_target_batch_larger_than_the_split_is_refused(cli, tmp_path):
    recipe = mistake_recipe(tmp_path)
    result = cli("train", recipe, "--set", "batch.target=50", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert ("batch.target: 50 is larger than the training split of 12 samples, so every step "
            "would be one whole epoch; for full-batch training set batch.target: 12"
            ) in result.stderr


def test_json_errors_end_with_an_error_line(cli, tmp_path):
    recipe = mistake_recipe(tmp_path, {"returns": "string"})
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["exit_code"] == 2
    assert last["message"].startswith("the model returned a str")


def test_a_module_not_found_names_the_folders_searched(cli, tmp_path):
    recipe = mistake_recipe(tmp_path, model="nowhere_to_be_found:Net")
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert ("cannot import 'nowhere_to_be_found': no module 'nowhere_to_be_found' in "
            f"{recipe.parent}, {Path.cwd()} or the installed packages") in result.stderr


@pytest.mark.slow
def test_imports_resolve_from_the_recipe_folder_also_on_resume_from_elsewhere(tmp_path):
    """Run from another folder, stop after one step, resume from a third: byo.py is found."""
    model, data, loss, _ = CASES["(N, C, L) sequence tagger"]
    recipe = write_beside_byo(tmp_path / "project", byo_recipe(model, data, loss, steps=3))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}

    def mbp(*args: object, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=120)

    run = tmp_path / "run"
    first = mbp("train", recipe, "--out", run, "--max-steps", "1", "--quiet", cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    resumed = mbp("train", "--resume", run, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize(("source", "message"), [
    ("import transformerz\n", "error: importing broken_module raised ModuleNotFoundError: No "
                              "module named 'transformerz'"),
    ("def f(:\n", "error: importing broken_module raised SyntaxError: invalid syntax"),
])
def test_a_module_of_yours_that_fails_to_import_shows_its_traceback(cli, tmp_path, source,
                                                                    message):
    recipe = mistake_recipe(tmp_path, model="broken_module:Net")
    (recipe.parent / "broken_module.py").write_text(source)
    result = cli("validate", recipe)
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and message in result.stderr


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_model_builder_that_returns_no_module_or_a_name_that_is_no_path(cli, tmp_path,
                                                                         command):
    recipe = mistake_recipe(tmp_path, model="builders:returns_none")
    (recipe.parent / "builders.py").write_text("def returns_none():\n    return None\n")
    result = cli(command, recipe, "--out", tmp_path / "run") if command == "train" else \
        cli(command, recipe)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: model.name builders:returns_none returned a NoneType, not a " \
        "torch.nn.Module" in result.stderr
    blank = cli(command, recipe, "--set", "model.name=:Net")
    assert blank.exit_code == 2 and "Traceback" not in blank.output
    assert "model.name: ':Net' is not an import path: expected module:callable" in blank.stderr


def test_validate_refuses_what_train_would(cli, tmp_path):
    recipe = mistake_recipe(tmp_path)
    too_big = cli("validate", recipe, "--set", "batch.target=50")
    assert too_big.exit_code == 2 and "larger than the training split of 12" in too_big.stderr
    transforms = cli("validate", recipe, "--set", "data.transforms=[RandomHorizontalFlip]")
    assert transforms.exit_code == 2
    assert "data.transforms: mistakes:Samples() takes no `transform` argument" \
        in transforms.stderr
    lr = cli("validate", recipe, "--set", "optim.args.lr=abc")
    assert lr.exit_code == 2 and "optim.args.lr='abc': SGD refuses it (" in lr.stderr
    if not torch.cuda.is_available():
        absent = cli("validate", recipe, "--set", "train.device=cuda")
        assert absent.exit_code == 2 and "CUDA is not available here" in absent.stderr


def test_a_run_folders_recipe_validates_from_anywhere(cli, tmp_path, monkeypatch):
    recipe = mistake_recipe(tmp_path)
    assert cli("train", recipe, "--out", tmp_path / "run", "--quiet").exit_code == 0
    monkeypatch.chdir("/")
    result = cli("validate", tmp_path / "run" / "recipe.yaml")
    assert result.exit_code == 0, result.output
