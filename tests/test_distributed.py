"""Several ranks as real processes (gloo on CPU), started by `mbp train --nproc N` through
torch's elastic launcher: the same parameters as one process, failures handled together, DBS."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_byo import byo_recipe, full_batch_step, write_beside_byo

from mbp_cli.distributed.shares import split_shares

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def mbp(*args: object, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, as a user types it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_mbp(*args: object, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "mbp_cli", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)).item()
               for k in a if a[k].is_floating_point())


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def digits_recipe(folder: Path, **batch) -> Path:
    """The embedded digits in float64, a few steps; the last target batch of the epoch is
    smaller (1,438 = 28 × 50 + 38), so steps 29–30 cross it."""
    recipe = {"name": "ranks", "seed": 0,
              "model": {"name": "small_cnn", "args": {"num_classes": 10, "width": 8}},
              "data": {"name": "digits"}, "batch": {"target": 50, "micro": 7, **batch},
              "optim": {"name": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
              "train": {"steps": 3, "eval_every": 0, "device": "cpu", "dtype": "float64"}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ranked_recipe(folder: Path, data_args: dict, **sections) -> Path:
    """A small MLP on tests/ranked_data.py's points, whose behaviour depends on the rank."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "ranked_data.py", folder / "ranked_data.py")
    recipe = {"name": "points", "seed": 0,
              "model": {"name": "mlp", "args": {"in_features": 6, "out_features": 3}},
              "data": {"name": "ranked_data:Points", "args": data_args},
              "batch": {"target": 40, "micro": 4},
              "optim": {"name": "SGD", "args": {"lr": 0.1}},
              "train": {"steps": 12, "eval_every": 0, "device": "cpu"}, **sections}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_shares_sum_to_the_target_batch_in_proportion():
    assert split_shares(50, [1, 1]) == [25, 25]
    assert split_shares(50, [2, 1, 0]) == [33, 17, 0]
    assert split_shares(7, [1, 1, 1]) == [3, 2, 2]
    assert split_shares(100, [3000.0, 10.0], floors=[8, 8]) == [92, 8]  # one micro-batch each
    assert sum(split_shares(1000, [1.7, 2.2, 0.4])) == 1000


@pytest.mark.slow
@pytest.mark.parametrize("nproc, batch", [
    (2, {}),  # even shares
    (3, {"shares": [2, 1, 0], "micro": [7, 3, 16]}),  # uneven, a micro-batch each, one empty
], ids=["even", "uneven-micro-per-rank-empty-share"])
def test_ranks_train_the_same_parameters_as_one_process(tmp_path, nproc, batch):
    recipe = digits_recipe(tmp_path, **batch)
    one = mbp("train", recipe, "--out", "one", "--set", "batch.micro=7", "--set",
              "batch.shares=null", "-q", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    ranks = mbp("train", recipe, "--out", "ranks", "--nproc", nproc, cwd=tmp_path)
    assert ranks.returncode == 0, ranks.stderr
    assert largest_relative_difference(parameters(tmp_path / "one"),
                                       parameters(tmp_path / "ranks")) <= 1e-10
    # Only rank 0 wrote; every rank's figures are in its metrics.
    step = events(tmp_path / "ranks", "step")[-1]
    assert [r["rank"] for r in step["ranks"]] == list(range(nproc))
    assert sum(r["share"] for r in step["ranks"]) == 50
    assert ranks.stderr.count("training ranks on cpu") == 1


@pytest.mark.slow
def test_padded_tokens_over_ranks_equal_the_full_batch_step(tmp_path):
    """Sequences padded per micro-batch, ignored tags: normalized by the global token count."""
    model, data = {"name": "byo:GRUTagger"}, {"name": "byo:Ragged", "collate": "byo:pad_collate"}
    recipe = write_beside_byo(tmp_path, byo_recipe(model, data, {"name": "cross_entropy"}))
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--set", "batch.shares=[3, 1]",
              "--set", "batch.micro=[4, 2]", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    import torch.nn.functional as F

    expected = full_batch_step(model, data, F.cross_entropy)
    got = parameters(tmp_path / "run")
    assert max(((got[k] - v).norm() / v.norm()).item() for k, v in expected.items()) <= 1e-10


@pytest.mark.slow
def test_batchnorm_statistics_merge_over_ranks(tmp_path):
    """BatchNorm on the input; the same micro-batch boundaries on one process and on two ranks,
    so the running statistics merged over ranks equal one process's (fp64)."""
    shutil.copy(HERE / "user_blocks.py", tmp_path / "user_blocks.py")
    recipe = {"name": "bn", "seed": 0, "model": {"name": "user_blocks:NormFirst"},
              "data": {"name": "user_blocks:Features", "args": {"n": 80}},
              "batch": {"target": 40, "micro": 10}, "optim": {"name": "SGD", "args": {"lr": 0.1}},
              "train": {"steps": 3, "eval_every": 0, "device": "cpu", "dtype": "float64"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    for out, nproc in (("one", 1), ("ranks", 2)):
        run = mbp("train", "recipe.yaml", "--out", out, "--nproc", nproc, "-q", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
    one, ranks = parameters(tmp_path / "one"), parameters(tmp_path / "ranks")
    assert largest_relative_difference(one, ranks) <= 1e-12
    assert not torch.equal(one["norm.running_mean"], torch.zeros(4))  # they did move


@pytest.mark.slow
def test_out_of_memory_on_one_rank_is_redone_by_all(tmp_path):
    recipe = digits_recipe(tmp_path, micro=25)
    one = mbp("train", recipe, "--out", "one", "-q", cwd=tmp_path)
    run = mbp("train", recipe, "--out", "ranks", "--nproc", 2,
              "--simulate-memory", "64MiB,700KiB", cwd=tmp_path)
    assert one.returncode == 0 and run.returncode == 0, run.stderr
    assert "out of memory on rank 1 at step 1 with micro-batch 25" in run.stderr
    (oom,) = events(tmp_path / "ranks", "oom")
    assert (oom["rank"], oom["micro_batch"]) == (1, 12)
    assert [r["micro_batch"] for r in events(tmp_path / "ranks", "step")[-1]["ranks"]] == [25, 12]
    assert largest_relative_difference(parameters(tmp_path / "one"),
                                       parameters(tmp_path / "ranks")) <= 1e-10


def wait_for(path_glob: str, folder: Path, process: subprocess.Popen, seconds: float = 120
             ) -> None:
    deadline = time.monotonic() + seconds
    while not list(folder.glob(path_glob)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {path_glob} in {folder}"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_of_the_launcher_then_resume_is_bitwise_equal(tmp_path):
    recipe = digits_recipe(tmp_path)
    steps = ["--set", "train.steps=150", "--set", "train.checkpoint_every=5"]
    whole = mbp("train", recipe, "--out", "whole", "--nproc", 2, "-q", *steps, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    launcher = start_mbp("train", recipe, "--out", "cut", "--nproc", 2, "-q", *steps,
                         cwd=tmp_path)
    wait_for("cut/checkpoints/step-*.pt", tmp_path, launcher)
    launcher.kill()  # SIGKILL: no handler runs; the ranks die with it
    launcher.wait()
    resumed = mbp("train", "--resume", "cut", "--nproc", 2, "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    whole_state, cut_state = parameters(tmp_path / "whole"), parameters(tmp_path / "cut")
    assert all(torch.equal(whole_state[k], cut_state[k]) for k in whole_state)


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_target_batch(tmp_path):
    recipe = digits_recipe(tmp_path)
    launcher = start_mbp("train", recipe, "--out", "run", "--nproc", 2, "--set",
                         "train.steps=2000", "--set", "train.checkpoint_every=0", cwd=tmp_path)
    wait_for("run/metrics.jsonl", tmp_path, launcher)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, err
    assert "Resume with: mbp train --resume run --nproc 2" in err
    (stopped,) = events(tmp_path / "run", "stopped")
    assert Path(tmp_path / stopped["checkpoint"]).name == f"step-{stopped['step']:06d}.pt"
    state = torch.load(tmp_path / stopped["checkpoint"], weights_only=True)
    assert len(state["ranks"]) == 2 and state["loop"]["shares"] == [25, 25]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_run_with_its_name(tmp_path):
    """One error, the launcher's, naming the rank and the checkpoint to continue from (rank
    0's lost contact is the same story, not told twice; no debug hint: nothing of ours)."""
    recipe = ranked_recipe(tmp_path, {"dying_rank": 1, "die_after": 100})
    started = time.monotonic()
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--set",
              "train.checkpoint_every=1", cwd=tmp_path, timeout=120)
    assert run.returncode == 1
    (error,) = [line for line in run.stderr.splitlines() if "error" in line]
    assert error.startswith("error: rank 1 died (SIGKILL); the other ranks stopped. Continue "
                            "from its last checkpoint, step-0000")
    assert error.endswith(".pt, with: mbp train --resume run --nproc 2")
    assert "Traceback" not in run.stderr and "MBP_DEBUG" not in run.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named_and_ended(tmp_path):
    """A rank stopped by SIGSTOP (alive, silent) ends the run within train.heartbeat_timeout,
    not train.collective_timeout: named as stopped, not as died, once, with the checkpoint to
    continue from; the launcher returns, so the stopped process was ended too."""
    recipe = ranked_recipe(tmp_path, {"dying_rank": 1, "die_after": 100, "signal": "SIGSTOP"})
    started = time.monotonic()
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--set",
              "train.checkpoint_every=1", "--set", "train.heartbeat_timeout=3", cwd=tmp_path,
              timeout=120)
    assert run.returncode == 1, run.stderr
    (error,) = [line for line in run.stderr.splitlines() if "error" in line]
    assert error.startswith("error: rank 1 stopped answering: no heartbeat for 3 s (its process "
                            "is stopped, as by SIGSTOP or Ctrl-Z); the other ranks stopped. "
                            "Continue from its last checkpoint, step-0000"), run.stderr
    assert error.endswith(".pt, with: mbp train --resume run --nproc 2")
    assert "died" not in run.stderr and "Traceback" not in run.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_a_slow_rank_is_not_a_stopped_one(tmp_path):
    """A rank whose target batches take several heartbeat timeouts (it works, and its heartbeat
    goes on) trains to the end; under torchrun, as under --nproc."""
    recipe = ranked_recipe(tmp_path, {"slow_rank": 1, "delay": 0.25})
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
         "mbp_cli", "train", str(recipe), "--out", "run", "--set", "train.steps=2", "--set",
         "train.heartbeat_timeout=1", "-q"], cwd=tmp_path, capture_output=True, text=True,
        timeout=180, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert [e["step"] for e in events(tmp_path / "run", "step")] == [1, 2]


@pytest.mark.slow
def test_machines_whose_run_folders_differ_refuse_to_resume_apart(tmp_path):
    """Two launchers as two machines without a shared filesystem: rank 0 finds the run's
    checkpoint, rank 1 (its own copy of the folder, no checkpoints) none. Refused before any
    step, once, naming what each rank found; rank 0's run folder trains nothing more."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    recipe = digits_recipe(node0)
    first = mbp("train", recipe, "--out", "run", "--max-steps", 2, "--set",
                "train.checkpoint_every=1", "-q", cwd=node0)
    assert first.returncode == 0, first.stderr
    (node1 / "run").mkdir(parents=True)
    shutil.copy(node0 / "run" / "recipe.yaml", node1 / "run" / "recipe.yaml")
    checkpoints = sorted(p.name for p in (node0 / "run" / "checkpoints").iterdir())
    with socket.socket() as probe:  # a free port for the static rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "mbp_cli", "train", "--resume", "run"], cwd=node, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for rank, node in enumerate((node0, node1))]
    errs = [launcher.communicate(timeout=180)[1] for launcher in launchers]
    assert all(launcher.returncode != 0 for launcher in launchers), errs
    said = "error: the ranks would not resume from the same point in run: rank 0 at step 2, " \
        "rank 1 finds no checkpoint. Every rank reads the run folder"
    assert errs[0].count(said) == 1 and said not in errs[1], errs
    assert sorted(p.name for p in (node0 / "run" / "checkpoints").iterdir()) == checkpoints
    assert [e["step"] for e in events(node0 / "run", "step")] == [1, 2]


@pytest.mark.slow
def test_a_signal_while_the_ranks_start_is_said_once(tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) to the whole process group before the first step:
    one word, the signal's exit code, nothing written."""
    recipe = digits_recipe(tmp_path)
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"),
                            (signal.SIGTERM, 143, "stopped by SIGTERM")):
        launcher = subprocess.Popen(
            [sys.executable, "-m", "mbp_cli", "train", str(recipe), "--out", "run", "--nproc",
             "2", "--set", "batch.micro=auto"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        time.sleep(4)  # the ranks are importing torch, building, probing
        os.killpg(launcher.pid, sig)
        _, err = launcher.communicate(timeout=120)
        assert launcher.returncode == code, err
        if not (tmp_path / "run").exists():  # it came during the start, as meant
            assert err.strip().splitlines()[-1] == word and err.count(word) == 1, err
            assert "error" not in err and "Traceback" not in err, err
        else:  # a fast machine: the run had begun, and stopped after a target batch
            assert err.count("Resume with:") == 1 and word not in err, err


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    recipe = ranked_recipe(tmp_path, {"failing_rank": 1, "die_after": 30})
    started = time.monotonic()
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--json", cwd=tmp_path)
    assert run.returncode == 2, run.stderr  # the user's code raised: exit 2, as one process
    assert run.stderr.count("rank 1: error: dataset Points, sample") == 1
    assert "OSError: cannot read sample" in run.stderr  # its traceback, once
    assert "lost contact" not in run.stderr
    errors = [e for e in map(json.loads, run.stdout.splitlines()) if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["exit_code"] == 2
    assert time.monotonic() - started < 60


@pytest.mark.slow
def test_resume_with_another_world_size_continues_exactly(tmp_path):
    recipe = digits_recipe(tmp_path)
    one = mbp("train", recipe, "--out", "one", "--set", "train.steps=4", "-q", cwd=tmp_path)
    first = mbp("train", recipe, "--out", "run", "--set", "train.steps=4", "--max-steps", 2,
                "--nproc", 2, "-q", cwd=tmp_path)
    assert one.returncode == 0 and first.returncode == 0, first.stderr
    rest = mbp("train", "--resume", "run", "--nproc", 3, cwd=tmp_path)
    assert rest.returncode == 0, rest.stderr
    assert "checkpoint was made by 2 rank(s) with batch.micro 7" in rest.stderr
    assert "this run has 3 with 7" in rest.stderr and "no longer bitwise" in rest.stderr
    assert largest_relative_difference(parameters(tmp_path / "one"),
                                       parameters(tmp_path / "run")) <= 1e-10
    assert events(tmp_path / "run", "step")[-1]["ranks"][2]["share"] == 16
    # Per-rank lists change with the number of ranks: allowed on resume, cut afresh.
    more = mbp("train", "--resume", "run", "--nproc", 2, "--set", "train.steps=6", "--set",
               "batch.shares=[3, 1]", "--set", "batch.micro=[9, 4]", "-q", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [r["share"] for r in events(tmp_path / "run", "step")[-1]["ranks"]] == [38, 12]


@pytest.mark.slow
def test_dynamic_balance_moves_shares_to_the_fast_rank(tmp_path):
    """Rank 1 reads each sample 2 ms slower: after a rebalance, rank 0 holds more of the target
    batch and a target batch takes less time than with even shares."""
    slow = {"slow_rank": 1, "delay": 0.002}
    recipe = ranked_recipe(tmp_path, slow)
    times = {}
    for balance in ("even", "dynamic"):
        run = mbp("train", recipe, "--out", balance, "--nproc", 2, "--set",
                  f"batch.balance={balance}", "--set", "batch.rebalance_every=2", "-q",
                  cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        steps = events(tmp_path / balance, "step")
        times[balance] = sum(s["step_seconds"] for s in steps[4:]) / len(steps[4:])
    rebalanced = events(tmp_path / "dynamic", "rebalance")
    assert rebalanced and rebalanced[0]["step"] == 2
    assert rebalanced[-1]["shares"][0] > rebalanced[-1]["shares"][1] >= 4  # one micro-batch
    assert times["dynamic"] < 0.8 * times["even"], times
    assert not events(tmp_path / "even", "rebalance")


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_stops_every_rank(tmp_path):
    recipe = ranked_recipe(tmp_path, {"nan_rank": 1})
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, cwd=tmp_path)
    assert run.returncode == 4, run.stderr
    assert run.stderr.count("the loss at step 1 is nan") == 1  # said once, by rank 0
    assert (tmp_path / "run/checkpoints/step-000000.pt").exists()


@pytest.mark.slow
def test_each_rank_probes_its_own_memory(tmp_path):
    recipe = digits_recipe(tmp_path, micro="auto")
    run = mbp("train", recipe, "--out", "run", "--nproc", 2,
              "--simulate-memory", "8MiB,1500KiB", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (start,) = events(tmp_path / "run", "start")
    big, small = start["micro_batches"]
    assert big > small >= 1
    assert json.loads((tmp_path / "run/probe.json").read_text())["micro_batches"] == [big, small]


@pytest.mark.slow
def test_torchrun_runs_the_same_training(tmp_path):
    """`torchrun --nproc-per-node 2 -m mbp_cli train RECIPE`, no --out: the ranks agree on rank
    0's run folder, and train what `mbp train --nproc 2` trains."""
    recipe = digits_recipe(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "mbp_cli", "train", str(recipe), "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert torchrun.returncode == 0, torchrun.stderr
    launched = mbp("train", recipe, "--out", "launched", "--nproc", 2, "-q", cwd=tmp_path)
    assert launched.returncode == 0, launched.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    a, b = parameters(folder), parameters(tmp_path / "launched")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_list_per_rank_must_match_the_ranks(cli, tmp_path):
    recipe = digits_recipe(tmp_path, shares=[1, 2, 3])
    result = cli("train", recipe, "--out", tmp_path / "run", "--nproc", "2")
    assert result.exit_code == 2
    assert "batch.shares gives 3 weights for 2 ranks" in result.output
    assert not (tmp_path / "run").exists()


def test_validate_takes_a_list_per_rank_as_train_does(cli, tmp_path):
    """A micro-batch per rank: refused alike on one rank (train and validate), taken for as
    many ranks as the list has (validate --nproc)."""
    recipe = digits_recipe(tmp_path, micro=[32, 16])
    for ranks in ("1", "3"):
        trained = cli("train", recipe, "--out", tmp_path / "run", "--nproc", ranks)
        validated = cli("validate", recipe, "--nproc", ranks)
        assert trained.exit_code == validated.exit_code == 2, validated.output
        assert trained.stderr == validated.stderr == (
            f"error: batch.micro gives 2 micro-batches for {ranks} rank{'s' * (ranks != '1')}; "
            "give one per rank (or one for all)\n")
    assert cli("validate", recipe).exit_code == 2  # one rank unless told
    validated = cli("validate", recipe, "--nproc", "2")
    assert validated.exit_code == 0, validated.output
    assert not (tmp_path / "run").exists()


def test_each_rank_runs_what_was_typed_less_nproc(cli, tmp_path, monkeypatch):
    """The ranks' command line is the launcher's as typed, whatever its flags, less --nproc in
    either form; a default run folder is chosen once, by the launcher, for every rank."""
    import mbp_cli.distributed.launch as launcher

    launched = []
    monkeypatch.setattr(launcher, "launch", lambda nproc, args, run_dir: launched.append(
        (nproc, args, run_dir)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = str(digits_recipe(tmp_path))
    typed = [recipe, "--max-steps", "1", "--set", "train.steps=2", "-q", "--device", "cpu"]
    assert cli("train", "--nproc=2", *typed).exit_code == 0
    assert cli("train", *typed, "--out", "run", "--nproc", "3", "--json").exit_code == 0
    (two, default, run_dir), (three, given, _) = launched
    assert (two, default[:-2], default[-2]) == (2, ["train", *typed], "--out")
    assert run_dir == Path(default[-1])  # the folder the launcher names in its messages
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("ranks-")
    assert (three, given) == (3, ["train", *typed, "--out", "run", "--json"])
