"""The real `mbp` command: exit codes, messages, output modes and the run folder it writes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from mbp_cli import __version__
from mbp_cli.catalog.models import small_cnn
from tests.conftest import small_recipe


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"mbp {__version__}"


def test_recipes_lists_the_bundled_ones(cli):
    result = cli("recipes")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("digits ") and "handwritten digits" in line for line in lines)


def test_validate_accepts_a_good_recipe(cli, write_recipe):
    result = cli("validate", write_recipe(small_recipe()))
    assert result.exit_code == 0 and "valid recipe 'test-digits'" in result.stdout


def test_mbp_debug_shows_the_traceback_and_keeps_the_exit_code(cli, write_recipe, monkeypatch):
    """A script that debugs sees the exit codes it would see without MBP_DEBUG."""
    monkeypatch.setenv("MBP_DEBUG", "1")
    result = cli("validate", write_recipe(small_recipe()), "--set", "model.name=no_such_model")
    assert result.exit_code == 2
    assert result.stderr.index("Traceback") < result.stderr.index("error: ")
    assert "  • model.name: unknown model 'no_such_model'" in result.stderr


def test_validate_refuses_a_bad_recipe_with_exit_2_and_no_traceback(cli, write_recipe):
    path = write_recipe(small_recipe(batch={"target": 8, "mirco": 2}))
    result = cli("validate", path, "--set", "optim.args.lr=fast", "--set", "seed=1.5")
    assert result.exit_code == 2
    assert f"error: {path} with the --set overrides is not a valid recipe (3 problems)" \
        in result.stderr
    assert "  • batch.mirco: unknown key; did you mean batch.micro?" in result.stderr
    assert "  • seed: expected an integer, got 1.5 (a number)" in result.stderr
    assert "Traceback" not in result.output and "MBP_DEBUG=1" not in result.stderr  # not ours
    section = cli("validate", write_recipe(small_recipe()), "--set", "memory=on")
    assert "memory: expected a mapping, got a string" in section.stderr  # no name to be short for


def test_missing_recipe_file_is_a_usage_error(cli, tmp_path):
    result = cli("train", tmp_path / "absent.yaml", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "recipe file not found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_writes_the_run_folder(cli, write_recipe, tmp_path):
    run = tmp_path / "run"
    result = cli("train", write_recipe(small_recipe()), "--out", run, "--set", "optim.args.lr=0.05")
    assert result.exit_code == 0, result.output
    assert {p.name for p in run.iterdir()} == {"recipe.yaml", "metrics.jsonl", "model.pt",
                                              "summary.json", "checkpoints"}
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000003.pt"]
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["optim"]["args"]["lr"] == 0.05  # the override is what was saved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2, 3]
    assert all(r["samples"] == 50 and r["micro_batches"] == 8 for r in records
               if r["event"] == "step")  # 50 = 7 × 7 + 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples_seen"] == 150
    assert (summary["micro_batch"], summary["accumulation_steps"]) == (7, 8)
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["peak_memory_bytes"] > 0
    assert summary["versions"]["torch"] == torch.__version__
    model = small_cnn(num_classes=10, width=8)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))


def test_plain_output_when_not_a_terminal(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run")
    assert result.exit_code == 0
    assert "training test-digits on cpu (float32): target batch 50 = micro-batch 7 × 8" \
        in result.stderr
    assert "step 3/3" in result.stderr and "eval @ step 2: loss" in result.stderr
    assert "eval accuracy" in result.stdout and "\x1b[" not in result.output


def test_json_lines_on_stdout(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "step", "eval", "step", "eval",
                                            "done"]
    assert events[-1]["steps"] == 3 and events[-1]["run_dir"] == str(tmp_path / "run")
    assert "step 3/3" in result.stderr  # people watching still see progress


def test_quiet_prints_nothing(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0 and result.output == ""


def test_max_steps_and_device_options(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run",
                 "--max-steps", "1", "--device", "cpu", "--json")
    assert json.loads(result.stdout.splitlines()[-1])["steps"] == 1
    assert f"stopped after step 1 of 3; continue with: mbp train --resume {tmp_path / 'run'}" \
        in result.stderr


def test_json_and_quiet_print_only_the_json(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run", "--json",
                 "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    assert [json.loads(line)["event"] for line in result.stdout.splitlines()][-1] == "done"


def test_unavailable_device_is_refused(cli, write_recipe, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("train", write_recipe(small_recipe()), "--out", tmp_path / "run",
                 "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


def test_a_run_folder_with_results_is_not_overwritten(cli, write_recipe, tmp_path):
    recipe, run = write_recipe(small_recipe()), tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet").exit_code == 0
    def files():
        return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    before = files()
    result = cli("train", recipe, "--out", run, "--set", "seed=1")
    assert result.exit_code == 2
    assert f"run folder {run} already holds results" in result.stderr
    assert "--overwrite" in result.stderr
    assert files() == before
    (run / "notes.txt").write_text("mine")
    assert cli("train", recipe, "--out", run, "--overwrite", "--set", "seed=1").exit_code == 0
    assert (run / "model.pt").read_bytes() != before["model.pt"]
    assert (run / "notes.txt").read_text() == "mine"  # only mbp's own files are replaced


def test_runs_started_in_the_same_second_get_a_default_folder_each(cli, write_recipe,
                                                                    tmp_path, monkeypatch):
    recipe = write_recipe(small_recipe(train={"steps": 1, "eval_every": 0, "device": "cpu"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda *_: "20250101-120000")  # the same second
    failed = cli("train", write_recipe(small_recipe(model={"name": "mlp", "args": {
        "in_features": 10}}), "bad.yaml"))
    assert failed.exit_code == 2 and not (tmp_path / "runs").exists()  # it leaves nothing
    for seed in ("0", "1"):
        result = cli("train", recipe, "--quiet", "--set", f"seed={seed}")
        assert result.exit_code == 0, result.output
    first = tmp_path / "runs/test-digits-20250101-120000"
    second = first.with_name(f"{first.name}-2")
    assert sorted((tmp_path / "runs").iterdir()) == [first, second]
    assert "seed: 0" in (first / "recipe.yaml").read_text()
    assert "seed: 1" in (second / "recipe.yaml").read_text()
    assert (first / "model.pt").read_bytes() != (second / "model.pt").read_bytes()


def test_a_model_that_does_not_fit_its_data_is_explained(cli, write_recipe, tmp_path):
    model = {"name": "mlp", "args": {"in_features": 10}}
    result = cli("train", write_recipe(small_recipe(model=model)), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "the first training step failed" in result.stderr
    assert "model.args fit the data" in result.stderr and "Traceback" not in result.output


def test_a_regression_loss_on_class_labels_is_explained(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(small_recipe(loss="mse")), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "does not fit the target" in result.stderr


def test_batch_norm_models_are_warned_about(cli, write_recipe, tmp_path):
    recipe = small_recipe(
        model={"name": "resnet18", "args": {"num_classes": 4}},
        data={"name": "FakeData",
              "args": {"size": 20, "image_size": [3, 32, 32], "num_classes": 4}},
        batch={"target": 8, "micro": 4}, train={"steps": 1, "eval_every": 0, "device": "cpu"})
    run = tmp_path / "run"
    result = cli("train", write_recipe(recipe), "--out", run)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: the model has BatchNorm layers") == 1
    assert '"event": "warning"' in (run / "metrics.jsonl").read_text()


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_reader_that_stops_reading_costs_no_run(write_recipe, tmp_path, flags):
    """`mbp train … 2>&1 | head -2`: once head has gone, the run goes on quietly to its end and
    writes its model, exit 0, with no complaint at exit."""
    import subprocess
    import sys

    recipe = write_recipe(small_recipe(train={"steps": 40, "log_every": 1, "eval_every": 0,
                                              "device": "cpu"}))
    run = subprocess.Popen([sys.executable, "-m", "mbp_cli", "train", str(recipe), "--out",
                            str(tmp_path / "run"), *flags],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first = [run.stdout.readline() for _ in range(2)]
    run.stdout.close()  # as head does after its lines
    assert run.wait(timeout=300) == 0, first
    assert (tmp_path / "run" / "model.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 40
