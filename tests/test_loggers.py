"""train.log: [tensorboard], [mlflow], [wandb] — what each logged, read back with the tool's own
reader."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_recipe
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mbp_cli.catalog.tracking import Tracker


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


# MLflow and W&B: each tool's own reader reads back what a run (and its resume) logged.

SERIES = [("train/loss", "loss", "step"), ("train/lr", "lr", "step"),
          ("train/micro_batch", "micro_batch", "step"),
          ("train/accumulation_steps", "micro_batches", "step"),
          ("eval/loss", "eval_loss", "eval"), ("eval/accuracy", "eval_accuracy", "eval")]


def records_by_step(run_dir) -> dict[str, dict[int, dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {kind: {r["step"]: r for r in records if r["event"] == kind}
            for kind in ("step", "eval")}


def train_then_resume(cli, write_recipe, tmp_path, logger: str):
    """Train 3 of 4 steps, lose the last checkpoint (as a kill before it was written would),
    resume: the resume redoes step 3, which the first part had logged."""
    recipe = write_recipe(small_recipe(train={"steps": 4, "eval_every": 1, "device": "cpu",
                                              "checkpoint_every": 1, "log": [logger]}))
    run_dir = tmp_path / "run"
    first = cli("train", recipe, "--out", run_dir, "--max-steps", "3", "-q")
    assert first.exit_code == 0, first.output
    kept = json.loads((run_dir / f"{logger}.json").read_text())
    (run_dir / "checkpoints/step-000003.pt").unlink()
    second = cli("train", "--resume", run_dir, "-q")
    assert second.exit_code == 0, second.output
    return run_dir, kept


def test_mlflow_series_equal_the_metrics_across_a_resume_in_one_run(cli, write_recipe, tmp_path,
                                                                    monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: beside the run
    run_dir, kept = train_then_resume(cli, write_recipe, tmp_path, "mlflow")
    assert kept["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == kept["run_id"]
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"event": "start"' in line]  # the start line says where the store is
    assert [s["logs"] for s in starts] == [[f"mlflow at {kept['tracking_uri']}"]] * 2
    client = MlflowClient(kept["tracking_uri"])
    experiment = client.get_experiment_by_name("test-digits")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [kept["run_id"]]  # the resume went on in it
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.args.lr"] == "0.1"
    assert run.data.params["model.args.width"] == "8"
    metrics = records_by_step(run_dir)
    assert sorted(metrics["step"]) == [1, 2, 3, 4]
    for key, field, kind in SERIES:
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(metrics[kind]), (key, steps)  # each step once
        for m in history:
            assert m.value == pytest.approx(metrics[kind][m.step][field], rel=1e-6), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["final_train_loss"] == pytest.approx(summary["final_train_loss"])
    assert run.data.metrics["eval_accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert run.data.tags["summary.device"] == "cpu"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == \
        ["model.pt", "summary.json"]
    logged = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == summary


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, its own settings and caches in tmp_path, set up anew (W&B reads its
    settings once a process)."""
    import wandb

    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb.teardown()
    yield
    wandb.teardown()


def wandb_records(files) -> list[dict]:
    """The records of an offline run's .wandb file, as W&B's own reader prints them."""
    read = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(files)], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in read.stdout.splitlines() if line.strip()]


def test_wandb_offline_series_equal_the_metrics_across_a_resume_in_one_run(
        cli, write_recipe, tmp_path, wandb_offline):
    run_dir, kept = train_then_resume(cli, write_recipe, tmp_path, "wandb")
    assert kept["mode"] == "offline"
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) == 2  # W&B keeps each part apart; `wandb sync` joins them by the id
    history: dict[int, dict] = {}
    summary_said: dict = {}
    for part in parts:
        records = wandb_records(part)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        assert run["run_id"] == kept["id"] and run["project"] == "test-digits"
        config = {}
        for r in [{"config": run["config"]}, *(r for r in records if r["type"] == "config")]:
            config.update(r["config"].get("update", {}))
        assert config["optim"]["args"]["lr"] == 0.1  # the resume's too (its changes may differ)
        for r in records:
            if r["type"] == "history":
                step = r["history"]["step"]["num"]
                assert step not in history, f"step {step} logged twice"
                history[step] = r["history"]["item"]
            elif r["type"] == "summary":
                summary_said.update(r["summary"].get("update", {}))
        (done,) = [r["exit"] for r in records if r["type"] == "exit"]
        assert done.get("exit_code", 0) == 0
    metrics = records_by_step(run_dir)
    assert sorted(history) == [1, 2, 3, 4]
    for key, field, kind in SERIES:
        for step, record in metrics[kind].items():
            assert history[step][key] == pytest.approx(record[field], rel=1e-6), (key, step)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary_said["final_train_loss"] == pytest.approx(summary["final_train_loss"])
    assert summary_said["steps"] == 4 and summary_said["versions"] == summary["versions"]


@pytest.mark.parametrize(("logger", "package", "extra"),
                         [("mlflow", "mlflow", "mlflow-skinny"), ("wandb", "wandb", "wandb")])
def test_a_logger_whose_package_is_missing_is_one_line_before_training(
        cli, write_recipe, tmp_path, monkeypatch, logger, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    recipe = write_recipe(small_recipe(train={"steps": 1, "device": "cpu", "log": [logger]}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: train.log: {logger} needs the {extra} package: " \
        f"pip install 'mbp-cli[{logger}]'"
    assert not (tmp_path / "run").exists()


def test_an_mlflow_store_that_does_not_answer_is_one_line_before_training(
        cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    recipe = write_recipe(small_recipe(train={"steps": 1, "device": "cpu", "log": ["mlflow"]}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: train.log: mlflow's tracking store http://127.0.0.1:9 does "
                           "not answer (")
    assert line.endswith("set MLFLOW_TRACKING_URI to one that does")
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_a_login_is_one_line_before_training(
        cli, write_recipe, tmp_path, monkeypatch, wandb_offline):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    wandb.teardown()  # to read the mode anew
    recipe = write_recipe(small_recipe(train={"steps": 1, "device": "cpu", "log": ["wandb"]}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: train.log: wandb is online and not logged in: run `wandb login` (or set "
        "WANDB_API_KEY), or set WANDB_MODE=offline to log here")
    assert not (tmp_path / "run").exists()


class Flaky(Tracker):
    """A tracker whose store goes away at `fails_at` (0: never); it notes how its run ended."""

    tool = "flaky"
    fails_at = 0
    ended: list[str] = []

    def start(self) -> dict:
        return {"id": "flaky-1"}

    def send(self, step: int, figures: dict) -> None:
        if step == self.fails_at:
            raise ConnectionError("the store went away\nand said more")

    def send_summary(self, summary: dict) -> None:
        pass

    def end(self) -> None:
        Flaky.ended.append(self.status)


@pytest.fixture
def flaky(monkeypatch):
    from mbp_cli.catalog.loggers import LOGGERS

    monkeypatch.setitem(LOGGERS, "flaky", Flaky)
    monkeypatch.setattr(Flaky, "ended", [])
    return Flaky


def test_a_tracker_that_fails_mid_run_is_warned_about_once_and_the_run_goes_on(
        cli, write_recipe, tmp_path, flaky, monkeypatch):
    monkeypatch.setattr(flaky, "fails_at", 2)
    recipe = write_recipe(small_recipe(train={"steps": 3, "eval_every": 1, "device": "cpu",
                                              "log": ["flaky"]}))
    result = cli("train", recipe, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output
    warning = ("flaky logging failed (ConnectionError: the store went away); the run goes on "
               "without it (metrics.jsonl has every figure)")
    assert result.stderr.count("warning: ") == 0  # --quiet; metrics.jsonl has it
    records = records_by_step(tmp_path / "run")
    assert sorted(records["step"]) == [1, 2, 3]
    said = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["message"] for r in said if r["event"] == "warning"] == [warning]
    assert flaky.ended == []  # left behind once it failed


@pytest.mark.parametrize(("ending", "status"), [("done", "FINISHED"), ("signal", "KILLED"),
                                                ("error", "FAILED")])
def test_a_trackers_run_ends_with_the_runs_status(tmp_path, flaky, ending, status):
    from mbp_cli.commands.train import train
    from mbp_cli.errors import StoppedError
    from mbp_cli.recipe.load import load_recipe
    from mbp_cli.run.start import RunOptions

    def end_early(event) -> None:  # the sinks before the loggers: they see step 1 alone
        if event.kind == "step" and event.step == 1 and ending == "signal":
            os.kill(os.getpid(), signal.SIGINT)  # stops after this target batch
        elif event.kind == "step" and event.step == 2 and ending == "error":
            raise RuntimeError("a fault of the run's")

    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(small_recipe(train={"steps": 3, "device": "cpu",
                                                   "log": ["flaky"]})))
    expected = {"done": None, "signal": StoppedError, "error": RuntimeError}[ending]
    with pytest.raises(expected) if expected else contextlib.nullcontext():
        train(load_recipe(path), RunOptions(tmp_path / "run"), [end_early])
    assert flaky.ended == [status]


def test_overwrite_removes_the_trackers_files_and_leaves_the_users(tmp_path):
    from mbp_cli.run.folder import check_run_dir, remove_results

    run = tmp_path / "run"
    files = run / "wandb" / "offline-run-20260101_000000-abc"
    files.mkdir(parents=True)
    (files / "run-abc.wandb").write_bytes(b"W&B")
    (run / "wandb" / "latest-run").symlink_to(files)
    (run / "wandb" / "debug.log").write_text("")
    (run / "wandb" / "my-notes.txt").write_text("mine")
    for kept in ("wandb.json", "mlflow.json"):
        (run / kept).write_text("{}")
    held = check_run_dir(run, overwrite=True)
    assert {"wandb", "wandb.json", "mlflow.json"} <= set(held)
    remove_results(run, held)
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == \
        ["wandb", "wandb/my-notes.txt"]
