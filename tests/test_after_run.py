"""After the run: `mbp runs`, `mbp report`, `mbp eval` and `mbp predict` on real runs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, small_recipe
from PIL import Image

from mbp_cli.catalog.datasets import digits
from mbp_cli.catalog.models import small_cnn
from mbp_cli.commands.plot import plot_runs
from mbp_cli.run.records import read_run

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    """A done run, one stopped by --max-steps and one that failed (a NaN loss, exit 4)."""
    from typer.testing import CliRunner

    from mbp_cli.cli import app

    folder = tmp_path_factory.mktemp("after")
    shutil.copy(HERE / "ranked_data.py", folder / "ranked_data.py")
    (folder / "digits.yaml").write_text(yaml.safe_dump(small_recipe(
        train={"steps": 4, "eval_every": 2, "device": "cpu"})))
    (folder / "nan.yaml").write_text(yaml.safe_dump(small_recipe(
        model={"name": "mlp", "args": {"in_features": 6, "out_features": 3}},
        data={"name": "ranked_data:Points", "args": {"nan_rank": 0}})))
    runner = CliRunner()
    for args, code in [(["digits.yaml", "--out", "runs/done"], 0),
                       (["digits.yaml", "--out", "runs/stopped", "--max-steps", "1"], 0),
                       (["nan.yaml", "--out", "runs/failed"], 4)]:
        cwd = os.getcwd()
        os.chdir(folder)
        try:
            result = runner.invoke(app, ["train", *args, "-q"])
        finally:
            os.chdir(cwd)
        assert result.exit_code == code, result.output
    return folder


def test_runs_lists_each_status(cli, runs_folder):
    result = cli("runs", runs_folder / "runs", "--json")
    assert result.exit_code == 0, result.output
    runs = {Path(r["path"]).name: r for r in json.loads(result.output)}
    assert runs["done"]["status"] == "done"
    assert runs["stopped"]["status"] == "stopped at step 1"
    assert runs["failed"]["status"] == "failed at step 0"
    assert runs["done"]["steps"] == 4 and runs["done"]["total_steps"] == 4
    final = json.loads((runs_folder / "runs/done/summary.json").read_text())
    assert runs["done"]["best_eval_accuracy"] >= final["eval_accuracy"]
    table = cli("runs", runs_folder / "runs")
    assert "stopped " in table.output and " 1/4 " in table.output  # stopped at step 1 of 4
    assert "failed " in table.output and " 0/3 " in table.output
    alone = json.loads(cli("runs", runs_folder / "runs/done", "--json").output)
    assert [Path(r["path"]).name for r in alone] == ["done"]  # a run folder itself
    none_yet = cli("runs", runs_folder / "nothing-here")
    assert none_yet.exit_code == 0 and "no runs in" in none_yet.output
    assert cli("runs", runs_folder / "digits.yaml").exit_code == 2
    assert "no such run folder" in cli("report", runs_folder / "runs/nope").output


def test_runs_reads_an_older_runs_folder_and_names_a_corrupt_summary(cli, runs_folder, tmp_path):
    """A run written before start events and `total_steps` in the summary is listed from its
    steps; an unreadable summary.json is listed as such among the others, and one line naming
    it (exit 2) for that run alone."""
    old = tmp_path / "runs" / "old"
    shutil.copytree(runs_folder / "runs" / "done", old)
    metrics = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in metrics
                                               if e["event"] != "start"))
    summary = json.loads((old / "summary.json").read_text())
    del summary["total_steps"], summary["wall_seconds"]
    (old / "summary.json").write_text(json.dumps(summary))
    result = cli("runs", tmp_path / "runs", "--json")
    assert result.exit_code == 0, result.output
    [listed] = json.loads(result.output)
    assert listed["status"] == "done" and (listed["steps"], listed["total_steps"]) == (4, 4)
    assert listed["wall_seconds"] > 0  # the steps' own seconds
    (old / "summary.json").write_text('{"steps": 4, "total')  # cut short
    shutil.copytree(runs_folder / "runs" / "done", tmp_path / "runs" / "fine")
    listed = {Path(r["path"]).name: r["status"] for r in json.loads(
        cli("runs", tmp_path / "runs", "--json").output)}
    assert listed == {"old": "summary.json unreadable", "fine": "done"}  # the others still
    result = cli("runs", old)
    assert result.exit_code == 2
    assert f"{old / 'summary.json'} cannot be read" in result.output


def test_runs_and_report_fit_80_columns_with_every_name_whole(cli, runs_folder, tmp_path,
                                                              monkeypatch):
    """Run folders named as mbp names them (recipe name and time) are listed whole, with
    every figure, in 80 columns; so are the summaries side by side, and the summary a run
    prints at its end."""
    monkeypatch.setenv("COLUMNS", "80")
    names = {"done": "test-digits-20250101-120000", "stopped": "test-digits-20250101-120500",
             "failed": "test-digits-20250101-121000"}
    for old, new in names.items():
        shutil.copytree(runs_folder / "runs" / old, tmp_path / "runs" / new)
    listed = cli("runs", tmp_path / "runs")
    report = cli("report", *(tmp_path / "runs" / n for n in names.values()),
                 "--out", tmp_path / "report.png")
    assert listed.exit_code == report.exit_code == 0, listed.output + report.output
    for result in (listed, report):
        lines = result.stdout.splitlines()
        assert max(map(len, lines)) <= 80, result.stdout
        assert "…" not in result.stdout
    assert all(any(n in line for line in listed.stdout.splitlines()) for n in names.values())
    assert "10.31%" in listed.stdout and " 1/4 " in listed.stdout
    summary = cli("train", runs_folder / "digits.yaml", "--out", tmp_path / "again",
                  "--max-steps", "1")
    assert summary.exit_code == 0, summary.output
    assert max(map(len, summary.stdout.splitlines())) <= 80, summary.stdout
    values = [line.split("│")[2].strip() for line in summary.stdout.splitlines()
              if line.count("│") == 3]
    assert str(tmp_path / "again") in "".join(values)  # folded, not cut


def test_report_draws_every_run_against_steps(cli, runs_folder, tmp_path):
    picture = tmp_path / "report.png"
    runs = [runs_folder / "runs/done", runs_folder / "runs/stopped"]
    result = cli("report", *runs, "--out", picture)
    assert result.exit_code == 0, result.output
    assert picture.stat().st_size > 20_000
    assert "runs side by side" in result.output
    drawn = plot_runs([read_run(r) for r in runs], tmp_path / "again.png")
    assert drawn["train loss"] == [[1, 2, 3, 4], [1]]
    assert drawn["eval accuracy"] == [[2, 4], [1]]
    as_json = json.loads(cli("report", *runs, "--json").output)
    assert [len(r["events"]["step"]) for r in as_json] == [4, 1]


def test_eval_equals_the_runs_final_eval(cli, runs_folder):
    run = runs_folder / "runs/done"
    result = cli("eval", run, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    answer = json.loads(result.output)
    assert answer["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert answer["eval_accuracy"] == summary["eval_accuracy"]
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]  # step 4: the end
    for weights in (checkpoint, run / "model.pt"):
        again = json.loads(cli("eval", run, "--checkpoint", weights, "--json").output)
        assert again["eval_accuracy"] == summary["eval_accuracy"]
    missing = cli("eval", run, "--checkpoint", run / "nope.pt")
    assert missing.exit_code == 2 and "no such file" in missing.output


@pytest.mark.parametrize(("content", "reason"), [
    ("cut short", "not a file written by torch.save, or one cut short"),
    ("not torch's", "not a file written by torch.save, or one cut short"),
    ("code", "it holds Python objects besides tensors, and mbp loads tensors only"),
])
def test_a_weights_file_that_cannot_be_loaded_says_why_in_words(cli, runs_folder, tmp_path,
                                                               content, reason):
    path = tmp_path / "weights.pt"
    if content == "cut short":
        path.write_bytes((runs_folder / "runs/done/model.pt").read_bytes()[:1000])
    elif content == "not torch's":
        path.write_bytes(b"\x00\x01 some other program's file" * 40)
    else:
        torch.save({"layer": Path("a pickled object, not a tensor")}, path)
    result = cli("eval", runs_folder / "runs/done", "--checkpoint", path)
    assert result.exit_code == 2
    assert f"cannot load {path}: {reason}" in result.stderr
    missing = cli("eval", runs_folder / "runs/failed")
    assert missing.exit_code == 2 and "has not finished" in missing.output


def test_predict_a_png_as_the_model_scores_it(cli, runs_folder, tmp_path):
    run = runs_folder / "runs/done"
    image, _ = digits(train=False)[0]
    png = tmp_path / "digit.png"
    Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(png)
    result = cli("predict", run, png, "--top", "2", "--json")
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.output)
    model = small_cnn(num_classes=10, width=8)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        scores = model.eval()(((image * 255).round() / 255).unsqueeze(0)).softmax(1)[0]
    best = scores.topk(2)
    assert [c["class"] for c in answer["top"][0]] == best.indices.tolist()
    assert answer["top"][0][0]["probability"] == pytest.approx(best.values[0].item(), rel=1e-5)
    bad = cli("predict", run, tmp_path / "missing.png")
    assert bad.exit_code == 2 and "input not found" in bad.output
    torch.save(torch.zeros(3, 8, 8), tmp_path / "rgb.pt")
    wrong = cli("predict", run, tmp_path / "rgb.pt")
    assert wrong.exit_code == 2 and "cannot take an input of shape (3, 8, 8)" in wrong.output
    assert "(1, 8, 8)" in wrong.output


def test_predict_says_an_output_that_is_not_finite_has_no_probabilities(cli, runs_folder,
                                                                         tmp_path):
    batch = torch.rand(3, 1, 8, 8)
    batch[1, 0, 0, 0] = float("nan")
    torch.save(batch, tmp_path / "batch.pt")
    result = cli("predict", runs_folder / "runs/done", tmp_path / "batch.pt")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == f"{tmp_path / 'batch.pt'}[1]: the model's output is not finite (a NaN " \
        "or infinite score)"
    assert "%" in lines[0] and "%" in lines[2] and "nan" not in result.stdout
    listed = cli("predict", runs_folder / "runs/done", tmp_path / "batch.pt", "--json")
    assert listed.exit_code == 0, listed.output
    assert "NaN" not in listed.stdout  # strict JSON
    top = json.loads(listed.stdout)[0]["top"]
    assert top[1] is None and len(top[0]) == len(top[2]) == 3


def test_predict_names_the_classes_a_dataset_has(cli, tmp_path):
    """An ImageFolder's class names reach the answer (through mbp's wrappers of the dataset)."""
    for name, shade in (("cats", 30), ("dogs", 220)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (8, 8), (shade + i, shade, shade)).save(
                tmp_path / "images" / name / f"{i}.png")
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(
        model={"name": "small_cnn", "args": {"num_classes": 2, "in_channels": 3, "width": 4}},
        data={"name": "ImageFolder", "args": {"root": str(tmp_path / "images")},
              "eval_fraction": 0.2},
        batch={"target": 8, "micro": 4}, train={"steps": 2, "eval_every": 0,
                                                 "device": "cpu"})))
    assert cli("train", recipe, "--out", tmp_path / "run", "-q").exit_code == 0
    result = cli("predict", tmp_path / "run", tmp_path / "images/dogs/0.png", "--json")
    assert result.exit_code == 0, result.output
    names = {c["name"] for c in json.loads(result.output)[0]["top"][0]}
    assert names == {"cats", "dogs"}


@pytest.mark.slow
def test_a_run_in_progress_is_running(tmp_path, write_recipe):
    recipe = write_recipe(small_recipe(train={"steps": 5000, "eval_every": 0, "device": "cpu"}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    training = subprocess.Popen([sys.executable, "-m", "mbp_cli", "train", str(recipe), "--out",
                                 str(tmp_path / "runs/live"), "-q"], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "runs/live/metrics.jsonl").exists():
            assert time.monotonic() < deadline and training.poll() is None
            time.sleep(0.2)
        listed = subprocess.run([sys.executable, "-m", "mbp_cli", "runs", str(tmp_path / "runs"),
                                 "--json"], env=env, capture_output=True, text=True, check=True)
        assert json.loads(listed.stdout)[0]["status"] == "running"
        again = subprocess.run([sys.executable, "-m", "mbp_cli", "train", "--resume",
                                str(tmp_path / "runs/live")], env=env, capture_output=True,
                               text=True)
        assert again.returncode == 2 and "in use by another mbp train" in again.stderr
    finally:
        training.kill()
        training.wait()
    listed = subprocess.run([sys.executable, "-m", "mbp_cli", "runs", str(tmp_path / "runs"),
                             "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(listed.stdout)[0]["status"].startswith("failed at step")


@pytest.mark.slow
def test_a_resumed_run_killed_after_its_resume_is_failed_not_done(cli, tmp_path, write_recipe):
    recipe = write_recipe(small_recipe(train={"steps": 2, "checkpoint_every": 1,
                                              "eval_every": 0, "device": "cpu"}))
    run = tmp_path / "runs/grown"
    assert cli("train", recipe, "--out", run, "-q").exit_code == 0
    assert json.loads(cli("runs", run, "--json").output)[0]["status"] == "done"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    resumed = subprocess.Popen([sys.executable, "-m", "mbp_cli", "train", "--resume", str(run),
                                "--set", "train.steps=5000", "-q"], env=env)
    try:
        deadline = time.monotonic() + 120
        while max((int(p.stem[5:]) for p in (run / "checkpoints").glob("step-*.pt")),
                  default=0) < 4:  # at step 4 or later (older checkpoints are pruned)
            assert time.monotonic() < deadline and resumed.poll() is None
            time.sleep(0.05)
    finally:
        resumed.kill()  # SIGKILL: no summary of this session is written
        resumed.wait()
    listed = json.loads(cli("runs", run, "--json").output)[0]
    assert listed["status"] == f"failed at step {listed['steps']}", listed
    assert listed["steps"] >= 4 and listed["total_steps"] == 5000


def test_a_failing_final_eval_keeps_the_trained_model_and_a_resume_may_fix_it(cli, tmp_path):
    """Images of mixed sizes, cropped for training but not for the held-out split: the final
    evaluation cannot batch them. model.pt and the last checkpoint are written before it, the
    message names the held-out split's keys, and a resume may change data.eval_transforms."""
    write_images(tmp_path / "images", lambda i: (8 + i, 10 + i))
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(
        model={"name": "small_cnn", "args": {"num_classes": 2, "in_channels": 3, "width": 4}},
        data={"name": "ImageFolder", "args": {"root": str(tmp_path / "images")},
              "eval_fraction": 0.25, "transforms": [{"RandomResizedCrop": {"size": 8}}]},
        batch={"target": 6, "micro": 4},
        train={"steps": 2, "eval_every": 0, "checkpoint_every": 0, "device": "cpu"})))
    run = tmp_path / "run"
    failed = cli("train", recipe, "--out", run, "-q")
    assert failed.exit_code == 2, failed.output
    assert "cannot make a batch of held-out samples" in failed.stderr
    assert "data.eval_transforms" in failed.stderr
    assert "(data.transforms for images)" not in failed.stderr  # training's hint
    assert f"kept in {run / 'model.pt'}" in failed.stderr
    assert "Traceback" not in failed.output
    [checkpoint] = (run / "checkpoints").glob("step-*.pt")
    assert checkpoint.name == "step-000002.pt"
    trained = torch.load(run / "model.pt", weights_only=True)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(trained[k], saved[k]) for k in saved)
    assert not (run / "summary.json").exists()
    resize = "data.eval_transforms=[{Resize: {size: [8, 8]}}]"
    scored = cli("eval", run, "--set", resize, "--json")
    assert scored.exit_code == 0, scored.output
    resumed = cli("train", "--resume", run, "--set", resize, "--set", "train.steps=3", "-q")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_accuracy"] is not None
    unsafe = cli("train", "--resume", run, "--set", resize, "--set", "train.steps=4",
                 "--set", "data.transforms=[{Resize: {size: [8, 8]}}]", "-q")
    assert unsafe.exit_code == 2 and "data.transforms:" in unsafe.stderr


def test_held_out_samples_the_model_cannot_take_are_one_line_after_the_model_is_kept(
        cli, tmp_path):
    """data.eval_transforms resizing to a shape the MLP cannot take: torch's complaint in the
    evaluation becomes one line naming the held-out split's keys, exit 2."""
    write_images(tmp_path / "images", lambda i: (8, 8))
    recipe = tmp_path / "resized.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(
        model={"name": "mlp", "args": {"in_features": 192, "out_features": 2}},
        data={"name": "ImageFolder", "args": {"root": str(tmp_path / "images")},
              "eval_fraction": 0.25, "eval_transforms": [{"Resize": {"size": [6, 6]}}]},
        batch={"target": 6, "micro": 4}, train={"steps": 1, "device": "cpu"})))
    failed = cli("train", recipe, "--out", tmp_path / "run", "-q")
    assert failed.exit_code == 2, failed.output
    assert "the evaluation on the held-out split failed" in failed.stderr
    assert "data.eval_transforms" in failed.stderr and "Traceback" not in failed.output
    assert (tmp_path / "run" / "model.pt").is_file()


def write_images(folder: Path, size) -> None:
    """Two classes of 8 RGB images each, image i of size size(i)."""
    for name, shade in (("cats", 30), ("dogs", 220)):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", size(i), (shade + i, shade, shade)).save(folder / name / f"{i}.png")


def test_eval_transforms_that_would_replace_the_weights_transforms_are_refused_on_resume(
        cli, tmp_path):
    """With pretrained weights and no data.transforms, both splits take the weights' own
    transforms until data.eval_transforms is set: then training's change too, so a resume
    that sets it is refused."""
    recipe = small_recipe(
        model={"name": "mobilenet_v3_small", "args": {"weights": "DEFAULT", "num_classes": 3}},
        data={"name": "ImageFolder", "args": {"root": str(tmp_path / "images")}})
    write_images(tmp_path / "images", lambda i: (8, 8))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    resize = "data.eval_transforms=[{Resize: {size: [16, 16]}}]"
    refused = cli("train", "--resume", tmp_path / "run", "--set", resize)
    assert refused.exit_code == 2
    assert "data.eval_transforms: None → [{'Resize'" in refused.stderr
    assert "it decides training's transforms too" in refused.stderr


KEYWORD_MODEL = '''
import torch
from torch import nn
from torch.utils.data import Dataset


class Reviews(Dataset):
    """{"input_ids", "attention_mask", "label"} samples of 6 tokens: a dict batch in training."""

    def __init__(self, train: bool = True, n: int = 20) -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        self.ids = torch.randint(1, 12, (n, 6), generator=g)
        self.mask = (torch.rand(n, 6, generator=g) < 0.8).long()
        self.labels = self.ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "label": self.labels[i]}


class Classifier(nn.Module):
    """forward(input_ids=…, attention_mask=…): (N, 2) scores from the unmasked tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask[..., None]
        return self.head(hidden.sum(1))
'''


def test_predict_takes_a_saved_dict_of_keyword_inputs(cli, tmp_path):
    """A model trained on dict batches (keyword inputs) is given a torch.save'd dict, one
    sample or a batch, and scores it as the model does when called with those keywords."""
    (tmp_path / "reviews.py").write_text(KEYWORD_MODEL)
    recipe = tmp_path / "reviews.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(
        model={"name": "reviews:Classifier"}, data={"name": "reviews:Reviews"},
        loss={"name": "cross_entropy"}, batch={"target": 8, "micro": 3},
        train={"steps": 2, "eval_every": 0, "device": "cpu"})))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "-q").exit_code == 0
    generator = torch.Generator().manual_seed(7)
    batch = {"input_ids": torch.randint(1, 12, (3, 6), generator=generator),
             "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    torch.save(batch, tmp_path / "batch.pt")
    one = {"input_ids": batch["input_ids"][1], "attention_mask": batch["attention_mask"][1],
           "label": torch.tensor(1)}  # a sample as the dataset gives it: the target left out
    torch.save(one, tmp_path / "one.pt")
    result = cli("predict", run, tmp_path / "batch.pt", tmp_path / "one.pt", "--json")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.output)
    spec = importlib.util.spec_from_file_location("own_reviews", tmp_path / "reviews.py")
    reviews = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reviews)
    model = reviews.Classifier()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    with torch.no_grad():
        scores = model.eval()(**batch).softmax(1)
    assert len(answers[0]["top"]) == 3 and len(answers[1]["top"]) == 1
    for row, ranked in zip(scores, answers[0]["top"], strict=True):
        assert ranked[0]["class"] == row.argmax().item()
        assert ranked[0]["probability"] == pytest.approx(row.max().item(), rel=1e-5)
    assert answers[1]["top"][0] == answers[0]["top"][1]
    torch.save({"input_ids": batch["input_ids"], "mask": batch["attention_mask"]},
               tmp_path / "misnamed.pt")
    misnamed = cli("predict", run, tmp_path / "misnamed.pt")
    assert misnamed.exit_code == 2 and "Traceback" not in misnamed.output
    assert "cannot take an input of shape {input_ids: (3, 6), mask: (3, 6)}" in misnamed.stderr
    assert "attention_mask: (6,)" in misnamed.stderr  # a sample of the run's data
    torch.save({"input_ids": [1, 2, 3]}, tmp_path / "list.pt")
    listed = cli("predict", run, tmp_path / "list.pt")
    assert listed.exit_code == 2
    assert "holds a dict, but not of named tensors ('input_ids' is a list" in listed.stderr
