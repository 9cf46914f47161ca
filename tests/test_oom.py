"""Out of memory mid-run: the target batch is redone smaller, nothing lost or counted twice."""

from __future__ import annotations

import json

import pytest
import torch

from mbp_cli.commands.train import train
from mbp_cli.memory.tracker import StorageTracker
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions
from tests.conftest import small_recipe


def fp64_recipe(micro: int | str, steps: int = 6) -> dict:
    return small_recipe(batch={"target": 64, "micro": micro},
                        optim={"name": "SGD", "args": {"lr": 0.1, "momentum": 0.9}},
                        train={"steps": steps, "eval_every": 0, "device": "cpu",
                               "dtype": "float64"})


def run(write_recipe, tmp_path, name, recipe, tracker=None, on_event=None):
    out = tmp_path / name
    out.mkdir()
    events = []

    def emit(event):
        events.append(event.to_dict())
        if on_event:
            on_event(events[-1])

    summary = train(load_recipe(write_recipe(recipe, f"{name}.yaml")),
                    RunOptions(out, simulated_memory=tracker), [emit])
    return summary, events, torch.load(out / "model.pt", weights_only=True), out


def test_memory_shrinking_mid_run_is_survived_exactly(write_recipe, tmp_path):
    """After step 2 the device has room for micro-batches of 8 only (32 and 16 fail)."""
    tracker = StorageTracker()

    def shrink_device(event):
        if event["event"] == "step" and event["step"] == 2:
            tracker.capacity_bytes = 500_000

    summary, events, params, out = run(write_recipe, tmp_path, "oom", fp64_recipe(32), tracker,
                                       shrink_device)
    ooms = [e for e in events if e["event"] == "oom"]
    assert [(e["step"], e["micro_batch_before"], e["micro_batch"]) for e in ooms] == [
        (3, 32, 16), (3, 16, 8)]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]  # one optimizer step per batch
    assert all(e["samples"] == 64 for e in steps) and summary["samples_seen"] == 6 * 64
    assert [e["micro_batches"] for e in steps] == [2, 2, 8, 8, 8, 8]
    assert summary["oom_retries"] == 2 and summary["micro_batch"] == 8
    assert '"event": "oom"' in (out / "metrics.jsonl").read_text()

    _, _, expected, _ = run(write_recipe, tmp_path, "fixed", fp64_recipe(8))
    for name, value in expected.items():
        assert torch.allclose(params[name], value, rtol=1e-10, atol=1e-12), name


def test_a_non_memory_error_is_raised_not_retried(write_recipe, tmp_path, monkeypatch):
    (tmp_path / "flaky.py").write_text(
        "import torch\nfrom mbp_cli.catalog.models import small_cnn\n"
        "class Flaky(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.net, self.calls = small_cnn(width=8), 0\n"
        "    def forward(self, x):\n        self.calls += 1\n"
        "        if self.calls == 5:\n            raise RuntimeError('a bug in the model')\n"
        "        return self.net(x)\n"
        "CALLS = []\n"
        "def flaky():\n    model = Flaky()\n    CALLS.append(model)\n    return model\n")
    monkeypatch.chdir(tmp_path)
    recipe = fp64_recipe(32)
    recipe["model"] = {"name": "flaky:flaky"}
    with pytest.raises(RuntimeError, match="a bug in the model"):
        run(write_recipe, tmp_path, "flaky", recipe, StorageTracker())
    import flaky

    assert flaky.CALLS[0].calls == 5  # step 3's first micro-batch, and no second try


def test_out_of_memory_at_micro_batch_1_is_exit_3(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(fp64_recipe(32)), "--out", tmp_path / "run",
                 "--simulate-memory", "40KiB")
    assert result.exit_code == 3
    assert "out of memory during training even with a micro-batch of 1" in result.stderr
    assert result.stderr.count("out of memory at step 1") == 5  # 32 → 16 → 8 → 4 → 2 → 1


def test_the_peak_recorded_after_a_refused_allocation_is_within_the_device(cli, write_recipe,
                                                                          tmp_path):
    """The allocation a simulated device refuses never was, as on a GPU: the run's peak stays
    within the capacity it trained under."""
    run_dir = tmp_path / "run"
    result = cli("train", write_recipe(fp64_recipe(32, steps=2)), "--out", run_dir,
                 "--simulate-memory", "488KiB")
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["oom_retries"] >= 1
    assert 0 < summary["peak_memory_bytes"] <= 488 * 1024


def test_optimizer_state_that_does_not_fit_is_exit_3_and_leaves_nothing(cli, write_recipe,
                                                                          tmp_path):
    """AdamW's two moments per parameter are made at the first step, after the micro-batches
    went through: no smaller micro-batch makes room, so the run ends at once, with no folder."""
    recipe = small_recipe(optim={"name": "AdamW", "args": {"lr": 0.001}},
                          train={"steps": 3, "eval_every": 0, "device": "cpu"})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run",
                 "--simulate-memory", "210KiB")
    assert result.exit_code == 3, result.output
    assert "out of memory in the optimizer's step: its state does not fit" in result.stderr
    assert "out of memory at step 1" not in result.stderr  # no smaller micro-batch was tried
    assert not (tmp_path / "run").exists()
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run",
                 "--simulate-memory", "300KiB")
    assert result.exit_code == 0, result.output


def test_a_model_too_big_for_the_machine_is_exit_3_naming_it(cli, write_recipe, tmp_path):
    """1.6 million units wide: a 10 TB weight matrix, which the CPU allocator refuses at once
    (nothing near the machine's memory is touched)."""
    model = {"name": "mlp", "args": {"in_features": 1, "hidden": 1_600_000}}
    recipe = write_recipe(small_recipe(model=model))
    for command in (["train", recipe, "--out", tmp_path / "run"], ["probe", recipe]):
        result = cli(*command)
        assert result.exit_code == 3, result.output
        assert result.stderr.startswith(
            "error: model mlp with model.args {'hidden': 1600000, 'in_features': 1} on cpu does "
            "not fit in memory: it asked for 9.3 TiB at once, more than the machine can give\n"
        ), result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_auto_micro_batch_probes_first_and_saves_the_choice(cli, write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", write_recipe(fp64_recipe("auto", steps=2)), "--out", run_dir,
                 "--simulate-memory", "600KiB", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events][:2] == ["probe", "start"]
    probe = json.loads((run_dir / "probe.json").read_text())
    assert probe["backend"] == "simulated" and probe["budget_bytes"] == int(600 * 1024 * 0.9)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["micro_batch"] == probe["micro_batch"] < 64
    assert summary["oom_retries"] == 0 and summary["peak_memory_bytes"] <= 600 * 1024
    assert "probe (simulated): micro-batch" in result.stderr


def test_a_resumed_auto_run_reuses_its_probe(cli, write_recipe, tmp_path):
    """Even a run killed before its first checkpoint does not probe again on resume."""
    run_dir = tmp_path / "run"
    first = cli("train", write_recipe(fp64_recipe("auto", steps=2)), "--out", run_dir,
                "--simulate-memory", "600KiB", "--quiet")
    assert first.exit_code == 0
    chosen = json.loads((run_dir / "probe.json").read_text())["micro_batch"]
    for path in [*(run_dir / "checkpoints").iterdir(), run_dir / "model.pt",
                 run_dir / "summary.json"]:
        path.unlink()  # as if killed before the first checkpoint (and so before the end)
    resumed = cli("train", "--resume", run_dir, "--json")
    assert resumed.exit_code == 0, resumed.output
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    probe = next(e for e in events if e["event"] == "probe")
    assert probe["reused"] == str(run_dir / "probe.json") and probe["micro_batch"] == chosen
    assert events[-1]["micro_batch"] == chosen
