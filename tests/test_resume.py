"""Checkpoints, exact resume after a real kill, graceful stops and non-finite losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mbp_cli.errors import UsageError
from tests.conftest import REPO, small_recipe

# Dropout draws from the RNG in every step: only a resume that restores it is bitwise equal.
RECIPE = small_recipe(
    name="resume", model={"name": "mlp", "args": {"hidden": 128, "dropout": 0.2}},
    batch={"target": 100, "micro": 3},
    optim={"name": "AdamW", "args": {"lr": 1.0e-3}}, schedule={"name": "cosine",
                                                            "warmup_steps": 5},
    train={"steps": 60, "eval_every": 25, "checkpoint_every": 10, "keep_checkpoints": 3,
           "device": "cpu"})


def write(tmp_path: Path, recipe: dict = RECIPE) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def mbp(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, **kwargs)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def one_go(tmp_path_factory) -> Path:
    """The same run done without interruption, as the reference."""
    tmp_path = tmp_path_factory.mktemp("one-go")
    done = mbp("train", write(tmp_path), "--out", tmp_path / "run", "--quiet")
    assert done.returncode == 0, done.stderr
    return tmp_path / "run"


@pytest.mark.slow
def test_killed_with_sigkill_then_resumed_ends_bitwise_equal(tmp_path, one_go):
    run = tmp_path / "run"
    process = start("train", write(tmp_path), "--out", run, "--quiet")
    wait_for(run / "checkpoints" / "step-000030.pt", process)
    process.send_signal(signal.SIGKILL)  # at whatever moment the run is at
    assert process.wait() == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    resumed = mbp("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    assert_bitwise_equal(parameters(run), parameters(one_go))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"event": "step"' in line]
    assert steps == list(range(1, 61))  # each step logged once, lost steps logged again
    assert len(list((run / "checkpoints").glob("step-*.pt"))) == 3


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_finishes_the_batch_checkpoints_and_says_how_to_resume(
        tmp_path, one_go, sig, code):
    run = tmp_path / "run"
    process = start("train", write(tmp_path), "--out", run, "--quiet")
    wait_for(run / "checkpoints" / "step-000020.pt", process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert f"stopped: by {sig.name} after step" in stderr
    assert f"Resume with: mbp train --resume {run}" in stderr
    stopped_at = int(stderr.split("after step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{stopped_at:06d}.pt").exists()
    resumed = mbp("train", "--resume", run, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(parameters(run), parameters(one_go))


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_checkpoint_stays_good(tmp_path, one_go):
    run = tmp_path / "run"
    process = start("train", write(tmp_path), "--out", run, "--quiet")
    wait_for(run / "checkpoints" / "step-000020.pt", process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    resumed = mbp("train", "--resume", run, "--quiet")  # whatever checkpoint is newest loads
    assert resumed.returncode == 0, resumed.stderr
    assert "corrupt" not in resumed.stderr
    assert_bitwise_equal(parameters(run), parameters(one_go))


def test_a_corrupt_checkpoint_is_named_and_the_one_before_is_used(cli, tmp_path):
    recipe = write(tmp_path, small_recipe(train={"steps": 6, "checkpoint_every": 2,
                                                 "keep_checkpoints": 3, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "4").exit_code == 0
    newest = run / "checkpoints" / "step-000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    (run / "model.pt").unlink()
    result = cli("train", "--resume", run)
    assert result.exit_code == 0, result.output
    assert f"warning: checkpoint {newest} is corrupt or truncated" in result.stderr
    assert "resuming at step 2 from" in result.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_an_unreadable_checkpoint_is_not_kept_in_place_of_a_good_one(cli, tmp_path):
    """keep_checkpoints: 1 after a resume that went back past a corrupt newest checkpoint: the
    checkpoint just written is the one kept, the corrupt one is set aside, not counted."""
    recipe = write(tmp_path, small_recipe(train={"steps": 8, "checkpoint_every": 2,
                                                 "keep_checkpoints": 2, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "4").exit_code == 0
    folder = run / "checkpoints"
    newest = folder / "step-000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    first = cli("train", "--resume", run, "--max-steps", "1",
                "--set", "train.keep_checkpoints=1")
    assert first.exit_code == 0, first.output
    assert "resuming at step 2 from" in first.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003.pt",
                                                       "step-000004.pt.unreadable"]
    second = cli("train", "--resume", run, "--set", "train.keep_checkpoints=1")
    assert second.exit_code == 0, second.output
    assert "corrupt" not in second.stderr and "resuming at step 3 from" in second.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_resume_with_every_checkpoint_corrupt_changes_nothing(cli, tmp_path):
    """Starting over would replace model.pt and the metrics: refused, the fix named."""
    recipe = write(tmp_path, small_recipe(train={"steps": 6, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "4").exit_code == 0
    for checkpoint in (run / "checkpoints").glob("step-*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    result = cli("train", "--resume", run)
    assert result.exit_code == 2
    assert f"no checkpoint of {run} can be read (2 corrupt or truncated); nothing was " \
        "changed" in result.stderr
    assert {path: path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file()} == before


def test_overwrite_with_resume_is_refused_and_changes_nothing(cli, tmp_path):
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "1").exit_code == 0
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    result = cli("train", "--resume", run, "--overwrite")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --overwrite does not go with --resume, which "
                                    f"continues the run in {run}; to start afresh there "
                                    f"instead: mbp train RECIPE --out {run} --overwrite")
    assert {path: path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file()} == before


def test_resume_refuses_a_changed_recipe_but_takes_more_steps(cli, tmp_path):
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet").exit_code == 0
    refused = cli("train", "--resume", run, "--set", "optim.args.lr=0.5",
                  "--set", "batch.target=40")
    assert refused.exit_code == 2
    assert "these keys differ:\n  • batch.target: 50 → 40\n  • optim.args.lr: 0.1 → 0.5" \
        in refused.stderr
    longer = cli("train", "--resume", run, "--set", "train.steps=4", "--json")
    assert longer.exit_code == 0, longer.output
    steps = [json.loads(line) for line in longer.stdout.splitlines()]
    assert [e["step"] for e in steps if e["event"] == "step"] == [3, 4]
    [listed] = json.loads(cli("runs", run, "--json").output)
    assert (listed["status"], listed["total_steps"]) == ("done", 4)  # the resume's schedule


def test_resume_without_a_checkpoint_starts_over_and_needs_a_run_folder(cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert "nothing to resume" in cli("train", "--resume", run).stderr
    (run / "recipe.yaml").write_text(yaml.safe_dump(small_recipe(train={"steps": 2,
                                                                        "device": "cpu"})))
    result = cli("train", "--resume", run)
    assert result.exit_code == 0 and "starting from step 0" in result.stderr
    assert cli("train").exit_code == 2


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_loss_that_becomes_nonfinite(cli, tmp_path, policy):
    recipe = write(tmp_path, small_recipe(
        optim={"name": "SGD", "args": {"lr": 1.0e+6}},  # diverges within a few steps
        train={"steps": 8, "eval_every": 0, "device": "cpu", "on_nonfinite": policy}))
    run = tmp_path / "run"
    result = cli("train", recipe, "--out", run, "--json")
    steps = [json.loads(line) for line in result.stdout.splitlines()
             if '"event": "step"' in line]
    if policy == "stop":
        assert result.exit_code == 4
        bad_step = int(result.stderr.split("the loss at step ")[1].split(" ")[0])
        assert f"The last good state (after step {bad_step - 1})" in result.stderr
        assert (run / "checkpoints" / f"step-{bad_step - 1:06d}.pt").exists()
        assert len(steps) == bad_step - 1
    else:
        assert result.exit_code == 0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["skipped_steps"] >= 1 and len(steps) == 8
        assert "update is skipped" in result.stderr


def fill_the_disk_writing(monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    """fsync fails with ENOSPC for files whose path holds `marker`, as a full disk makes it."""
    real_fsync = os.fsync

    def fsync_that_fills_the_disk(fd: int) -> None:
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_that_fills_the_disk)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(cli, tmp_path,
                                                                       monkeypatch):
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    run = tmp_path / "run"
    real_fsync, writes = os.fsync, []

    def fsync_that_fills_the_disk(fd):
        writes.append(fd)
        if len(writes) == 5:  # the second checkpoint (two fsyncs per atomic write)
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_that_fills_the_disk)
    result = cli("train", recipe, "--out", run, "--quiet")
    monkeypatch.undo()
    assert result.exit_code == 1
    assert "cannot write checkpoint" in result.stderr and "No space left" in result.stderr
    assert "the previous checkpoint, step-000002.pt, is intact" in result.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002.pt"]
    assert cli("train", "--resume", run, "--quiet").exit_code == 0


def test_a_full_disk_at_the_first_checkpoint_claims_no_earlier_one(cli, tmp_path, monkeypatch):
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    fill_the_disk_writing(monkeypatch, "/checkpoints/")
    result = cli("train", recipe, "--out", tmp_path / "run", "--quiet")
    monkeypatch.undo()
    assert result.exit_code == 1
    assert "cannot write checkpoint" in result.stderr and "intact" not in result.stderr
    assert "no earlier checkpoint was written" in result.stderr


def test_a_full_disk_while_saving_the_model_is_a_clear_error(cli, tmp_path, monkeypatch):
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    fill_the_disk_writing(monkeypatch, ".model.pt.")
    result = cli("train", recipe, "--out", tmp_path / "run", "--quiet")
    monkeypatch.undo()
    assert result.exit_code == 1
    assert f"error: cannot write model {tmp_path / 'run' / 'model.pt'}: No space left" \
        in result.stderr
    assert "Traceback" not in result.output
    assert not list((tmp_path / "run").glob(".*.tmp"))  # no half-written file left behind


def test_an_unwritable_output_folder_is_a_clear_error(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = cli("train", write(tmp_path), "--out", blocker / "run")
    assert result.exit_code == 2 and "cannot prepare run folder" in result.stderr


def test_max_steps_keeps_the_schedule_and_resume_finishes_it_bitwise(cli, tmp_path):
    """--max-steps 7 of a 12-step cosine schedule: the learning rate at each step is the full
    run's, a checkpoint is written at step 7, and the resumed run ends bitwise equal."""
    recipe = dict(RECIPE, train={**RECIPE["train"], "steps": 12, "checkpoint_every": 0})
    path = write(tmp_path, recipe)
    whole = cli("train", path, "--out", tmp_path / "whole", "--json")
    part = cli("train", path, "--out", tmp_path / "part", "--json", "--max-steps", "7")
    assert whole.exit_code == part.exit_code == 0, part.output

    def lrs(result) -> list[float]:
        return [e["lr"] for e in map(json.loads, result.stdout.splitlines())
                if e["event"] == "step"]

    assert lrs(part) == lrs(whole)[:7]
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-000007.pt"]
    rest = cli("train", "--resume", tmp_path / "part", "--json")
    assert rest.exit_code == 0, rest.output
    assert lrs(rest) == lrs(whole)[7:]
    assert_bitwise_equal(parameters(tmp_path / "part"), parameters(tmp_path / "whole"))
    # The summary covers both parts: every sample, both parts' time, this part said apart.
    first = json.loads(part.stdout.splitlines()[-1])
    done = json.loads(rest.stdout.splitlines()[-1])
    assert done["samples_seen"] == json.loads(whole.stdout.splitlines()[-1])["samples_seen"]
    assert done["resumed_at_step"] == 7
    assert done["wall_seconds"] == pytest.approx(
        first["wall_seconds"] + done["resumed_wall_seconds"], rel=0.05)
    assert "this part, from step 12" in cli("train", "--resume", tmp_path / "part",
                                           "--set", "train.steps=13").output


def test_more_or_fewer_steps_on_resume_take_the_new_schedule_from_the_next_step(cli, tmp_path):
    """Stopped at step 3 of a 12-step cosine and resumed with train.steps=8: step 4 already has
    the 8-step schedule's learning rate (not one more step of the old one)."""
    recipe = dict(RECIPE, train={**RECIPE["train"], "steps": 12, "checkpoint_every": 0})
    path = write(tmp_path, recipe)
    eight = cli("train", path, "--out", tmp_path / "eight", "--json", "--set", "train.steps=8")
    part = cli("train", path, "--out", tmp_path / "part", "--json", "--max-steps", "3")
    rest = cli("train", "--resume", tmp_path / "part", "--json", "--set", "train.steps=8")
    assert eight.exit_code == part.exit_code == rest.exit_code == 0, rest.output

    def lrs(result) -> list[float]:
        return [e["lr"] for e in map(json.loads, result.stdout.splitlines())
                if e["event"] == "step"]

    assert lrs(rest) == pytest.approx(lrs(eight)[3:], rel=1e-12)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_result_files_follow_the_umask_as_any_tool_writes_them(tmp_path, umask):
    """Others on a shared filesystem read the results where the umask lets them: every file a
    run writes (checkpoints, the metrics rewritten by a resume included) takes 0666 less it."""
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    run = tmp_path / "run"

    def with_umask() -> None:
        os.umask(umask)

    first = mbp("train", recipe, "--out", run, "--quiet", "--max-steps", "2",
                preexec_fn=with_umask)
    assert first.returncode == 0, first.stderr
    resumed = mbp("train", "--resume", run, "--quiet", preexec_fn=with_umask)
    assert resumed.returncode == 0, resumed.stderr
    modes = {path.relative_to(run).as_posix(): path.stat().st_mode & 0o777
             for path in run.rglob("*") if path.is_file()}
    assert {"model.pt", "recipe.yaml", "summary.json", "metrics.jsonl",
            "checkpoints/step-000004.pt"} <= modes.keys()
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_a_run_racing_for_a_folder_with_overwrite_deletes_nothing_of_the_winner(tmp_path):
    """Two `--overwrite` runs into one folder, both past the start's check: the first to train
    a target batch takes the folder; the other finds it held before touching a file in it."""
    from mbp_cli.recipe.load import load_recipe
    from mbp_cli.run.folder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # an earlier run's results, to overwrite
    recipe = load_recipe(write(tmp_path, small_recipe()))
    winner = RunFolder(run, recipe, resume=False, overwrite=True)
    loser = RunFolder(run, recipe, resume=False, overwrite=True)
    winner.open()
    try:
        assert not (run / "summary.json").exists()  # the winner overwrote the earlier run
        written = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}
        assert {"recipe.yaml", "metrics.jsonl"} <= written.keys()
        with pytest.raises(UsageError, match="is in use by another mbp train"):
            loser.open()
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == written
    finally:
        winner.close()


def test_a_resume_whose_saved_recipe_no_longer_fits_the_checkpoint_changes_nothing(cli,
                                                                                  tmp_path):
    """recipe.yaml edited in the run folder (the model's width): one line naming the tensors
    that do not fit and the key that changed, exit 2, every file as it was."""
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "2").exit_code == 0
    saved = run / "recipe.yaml"
    saved.write_text(saved.read_text().replace("width: 8", "width: 16"))
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    result = cli("train", "--resume", run)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "size mismatch" not in result.output
    message = result.stderr.strip().splitlines()[0]
    assert message.startswith(f"error: checkpoint {run / 'checkpoints' / 'step-000002.pt'} "
                              "does not fit the model the recipe builds now: ")
    assert "(8×1×3×3 saved, 16×1×3×3 now)" in message
    assert "the recipe changed since it was written: model.args.width: 8 → 16" in message
    assert {path: path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file()} == before


def test_sigterm_during_the_start_is_said_and_leaves_nothing(tmp_path):
    """Before the first target batch (importing, building, probing) SIGTERM has no run to stop
    gently: one word, exit 143, no folder."""
    recipe = write(tmp_path, small_recipe(batch={"target": 64, "micro": "auto"},
                                          train={"steps": 400, "device": "cpu"}))
    process = start("train", recipe, "--out", tmp_path / "run")
    time.sleep(1.5)  # still importing torch or probing
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    if (tmp_path / "run").exists():  # a fast machine: it had begun, and stopped gently
        assert "Resume with:" in err
    else:
        assert err.strip().splitlines()[-1] == "stopped by SIGTERM", err
        assert "Traceback" not in err, err


@pytest.mark.parametrize("when", ["step", "done"])
def test_a_stop_signal_once_the_last_step_is_trained_changes_nothing(tmp_path, when):
    """Ctrl-C after the last target batch (as the summary is written, say): the run is done,
    its summary written, no stop reported."""
    from mbp_cli.commands.train import train
    from mbp_cli.recipe.load import load_recipe
    from mbp_cli.run.start import RunOptions

    def interrupt_at_the_end(event) -> None:
        if event.kind == when and (when == "done" or event.step == event.total_steps):
            os.kill(os.getpid(), signal.SIGINT)

    recipe = load_recipe(write(tmp_path, small_recipe(train={"steps": 3, "device": "cpu"})))
    summary = train(recipe, RunOptions(tmp_path / "run"), [interrupt_at_the_end])
    assert summary["steps"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert '"stopped"' not in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_resume_of_a_recipe_edited_in_its_folder_is_refused_as_a_set_would_be(cli, tmp_path):
    """recipe.yaml edited by hand (the learning rate): the checkpoint's own recipe shows the
    change; refused with the key, nothing changed — not trained on silently with either."""
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 2,
                                                 "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "2").exit_code == 0
    saved = run / "recipe.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.1", "lr: 0.3"))
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    result = cli("train", "--resume", run)
    assert result.exit_code == 2, result.output
    assert "was made with another recipe than the run folder's recipe.yaml now holds: " \
        "optim.args.lr: 0.1 → 0.3" in result.stderr
    assert {path: path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file()} == before
    saved.write_text(saved.read_text().replace("lr: 0.3", "lr: 0.1"))
    assert cli("train", "--resume", run, "--set", "train.steps=5").exit_code == 0


def test_overwrite_replaces_mbps_files_only_even_inside_its_folders(cli, tmp_path):
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet").exit_code == 0
    notes = run / "checkpoints" / "my-notes.txt"
    notes.write_text("mine")
    assert cli("train", recipe, "--out", run, "--quiet", "--overwrite").exit_code == 0
    assert notes.read_text() == "mine"
    assert (run / "checkpoints" / "step-000002.pt").exists()


def test_a_resume_with_no_checkpoint_left_keeps_the_earlier_results(cli, tmp_path):
    """Starting over would replace model.pt and summary.json: refused, nothing changed."""
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet").exit_code == 0
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.unlink()
    before = {path: path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}
    result = cli("train", "--resume", run, "--set", "train.steps=3")
    assert result.exit_code == 2
    assert f"no checkpoint of {run} to resume from, and it holds an earlier run's model.pt " \
        "and summary.json; nothing was changed" in result.stderr
    assert {path: path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file()} == before


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "a/b", "line\nbreak"])
def test_a_default_run_folder_stays_inside_runs_whatever_the_recipes_name(name):
    from mbp_cli.run.folder import default_run_dir

    folder = default_run_dir(name)
    assert folder.parent == Path("runs") and len(folder.parts) == 2
    assert "\n" not in str(folder) and not folder.name.startswith(".")


def test_weights_an_update_made_infinite_are_not_checkpointed_as_the_last_good_state(cli,
                                                                                     tmp_path):
    """A weight decay so large that the first update overflows the weights: the next loss is
    NaN, and what would be 'the last good state' is not good — said so, not checkpointed; an
    infinite learning rate is refused before training."""
    huge = {"name": "SGD", "args": {"lr": 1.0e30, "weight_decay": 1.0e30}}
    recipe = write(tmp_path, small_recipe(optim=huge, train={"steps": 3, "device": "cpu"}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 4, result.output
    assert "the loss at step 2 is nan" in result.stderr
    assert "The weights themselves are no longer finite" in result.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("*.pt"))
    infinite = cli("validate", recipe, "--set", "optim.args.lr=.inf")
    assert infinite.exit_code == 2
    assert "optim.args.lr: inf is not a finite number" in infinite.stderr


DAMAGES = {
    "a record that is a list": ("metrics.jsonl", "[1, 2]\n"),
    "a step that is a word": ("metrics.jsonl", '{"event": "step", "step": "x"}\n'),
    "a loss that is a word": ("metrics.jsonl", '{"event": "eval", "step": 2, '
                                               '"eval_loss": "abc"}\n'),
    "bytes that are not UTF-8": ("metrics.jsonl", b"\xff\xfe\n"),
    "a summary of words": ("summary.json", '{"steps": "two", "wall_seconds": "x"}'),
    "a summary cut short": ("summary.json", '{"steps": 2, "micro'),
    "a summary that is a list": ("summary.json", "[1]"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_run_files_are_passed_over_or_named_never_a_traceback(cli, tmp_path, damage):
    """A metrics line or a summary damaged by hand or by a disk: runs, report, eval and a
    resume pass the record over or name the file; the in-process CLI raises on a traceback."""
    recipe = write(tmp_path, small_recipe(train={"steps": 2, "device": "cpu"}))
    run = tmp_path / "runs" / "run"
    assert cli("train", recipe, "--out", run, "--quiet").exit_code == 0
    name, text = DAMAGES[damage]
    data = text if isinstance(text, bytes) else text.encode()
    if name == "metrics.jsonl":
        data = (run / name).read_bytes() + data
    (run / name).write_bytes(data)
    for command in (["runs", tmp_path / "runs"], ["report", run, "--json"], ["eval", run],
                    ["train", "--resume", run, "--set", "train.steps=3", "--quiet"]):
        result = cli(*command)
        assert result.exit_code in (0, 2), (command, result.output)
        assert result.exit_code == 0 or result.stderr.startswith("error: "), result.output


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only for everyone, root included (a read-only bind mount of it)."""
    mounted = []

    def make(folder: Path) -> None:
        for options in (["--bind", folder, folder], ["-o", "remount,bind,ro", folder]):
            done = subprocess.run(["mount", *map(str, options)], capture_output=True)
            if done.returncode:
                pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")
            mounted.append(folder)

    yield make
    for folder in mounted[:1]:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_run_folder_is_refused_for_a_resume_as_for_a_new_run(cli, tmp_path,
                                                                           read_only):
    """Exit 2 and one line naming the folder, nothing changed, whether resumed or new."""
    recipe = write(tmp_path, small_recipe(train={"steps": 4, "checkpoint_every": 1,
                                                 "device": "cpu"}))
    run = tmp_path / "run"
    assert cli("train", recipe, "--out", run, "--quiet", "--max-steps", "2").exit_code == 0
    before = sorted(p.name for p in run.rglob("*"))
    read_only(run)
    resumed = cli("train", "--resume", run)
    assert resumed.exit_code == 2, resumed.output
    assert "Read-only file system" in resumed.stderr and "MBP_DEBUG" not in resumed.stderr
    new = cli("train", recipe, "--out", run / "inside", "--quiet")
    assert new.exit_code == 2 and "Read-only file system" in new.stderr
    assert sorted(p.name for p in run.rglob("*")) == before
