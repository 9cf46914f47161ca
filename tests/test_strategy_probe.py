"""The probe weighs the strategies: measured under a tracked budget on the CPU, estimated on
fake tensors for a GPU we don't have, chosen for `auto` and kept for a resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tests import user_blocks
from tests.conftest import REPO

USER = Path(user_blocks.__file__)


def _probe(cli, recipe: Path, *args: str) -> dict:
    result = cli("probe", recipe, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _user_recipe(write_recipe, tmp_path: Path, recipe: dict) -> Path:
    shutil.copy(USER, tmp_path / "user_blocks.py")
    return write_recipe(recipe)


@pytest.mark.slow
def test_checkpointing_lets_resnet18_take_half_again_as_many_samples(cli, write_recipe,
                                                                       tmp_path):
    recipe = _user_recipe(write_recipe, tmp_path, {
        "model": {"name": "resnet18", "args": {"num_classes": 10}},
        "data": {"name": "user_blocks:Images", "args": {"n": 512, "size": 64}},
        "batch": {"target": 512, "micro": "auto"},
        "optim": {"name": "SGD", "args": {"lr": 0.1}}, "train": {"steps": 1, "device": "cpu"}})
    plain = _probe(cli, recipe, "--budget", "400MiB")
    checkpointed = _probe(cli, recipe, "--budget", "400MiB", "--set", "memory.checkpointing=on")
    assert plain["backend"] == checkpointed["backend"] == "tracked"
    assert checkpointed["largest_micro_batch"] >= 1.5 * plain["largest_micro_batch"]


@pytest.mark.slow
def test_estimate_offload_and_checkpointing_each_raise_resnet50_for_a_24gib_gpu(cli):
    recipe = REPO / "recipes" / "imagefolder-resnet50.yaml"  # 224×224; no images needed
    args = ("--estimate", "--device-memory", "24GiB", "--set", "batch.target=4096")
    plain = _probe(cli, recipe, *args)["largest_micro_batch"]
    for strategy in ("memory.offload=on", "memory.checkpointing=on"):
        assert _probe(cli, recipe, *args, "--set", strategy)["largest_micro_batch"] > 1.3 * plain
    # auto: offload only as many of the first blocks as the chosen micro-batch needs
    answer = _probe(cli, recipe, *args, "--set", "memory.offload=auto")
    chosen = answer["choice"]["offload_blocks"]
    assert 0 < chosen < 17 and answer["micro_batch"] > plain  # 16 bottlenecks and the max-pool
    assert answer["verified_peak_bytes"] <= answer["usable_bytes"]


def test_probe_strategies_shows_each_combination_and_the_fastest_that_fits(cli, write_recipe,
                                                                             tmp_path):
    recipe = _user_recipe(write_recipe, tmp_path, {
        "model": {"name": "user_blocks:SmallNet"},
        "data": {"name": "user_blocks:Images", "args": {"n": 64}},
        "batch": {"target": 64, "micro": "auto"},
        "optim": {"name": "SGD", "args": {"lr": 0.1}}, "train": {"steps": 1, "device": "cpu"}})
    answer = _probe(cli, recipe, "--budget", "64MiB", "--strategies")
    labels = [row["label"] for row in answer["strategies"]]
    assert labels == ["fp32", "fp32 + checkpointing", "bf16", "bf16 + checkpointing"]
    assert answer["choice_label"] in labels  # offload is not offered on a CPU
    chosen = next(r for r in answer["strategies"] if r["label"] == answer["choice_label"])
    fitting = [r for r in answer["strategies"] if r["fits"]]
    assert chosen["seconds_per_target_batch"] == min(r["seconds_per_target_batch"]
                                                      for r in fitting)
    assert answer["micro_batch"] == chosen["micro_batch"]

    shown = cli("probe", recipe, "--budget", "64MiB", "--strategies")
    assert shown.exit_code == 0 and "← chosen" in shown.output
    keys = answer["choice_keys"].split()  # what to set to train with the choice
    on = "on" if answer["choice"]["checkpointing"] else "off"
    assert keys == [f"train.precision={answer['choice']['precision']}",
                    f"memory.checkpointing={on}", "memory.offload=off"]
    # the second probe times its own steps and may choose another: its line has the same form
    assert re.search(r"to train with them: --set train\.precision=\w+ --set "
                     r"memory\.checkpointing=(on|off) --set memory\.offload=off",
                     " ".join(shown.output.split()))


def test_probe_strategies_weighs_the_recipes_own_fp16_too(write_recipe):
    from mbp_cli.recipe.load import load_recipe
    from mbp_cli.strategies.choice import candidates
    from tests.conftest import small_recipe

    recipe = load_recipe(write_recipe(small_recipe(train={"steps": 1, "precision": "fp16"})))
    labels = [c.label for c in candidates(recipe, torch.device("cpu"), 2, estimate=False,
                                          every=True)]
    assert labels == ["fp32", "fp32 + checkpointing", "bf16", "bf16 + checkpointing", "fp16",
                      "fp16 + checkpointing"]


def test_auto_strategies_are_probed_saved_and_reused_on_resume(cli, write_recipe, tmp_path):
    recipe = _user_recipe(write_recipe, tmp_path, {
        "model": {"name": "user_blocks:SmallNet"},
        "data": {"name": "user_blocks:Images", "args": {"n": 48}},
        "batch": {"target": 24, "micro": "auto", "memory_budget": "64MiB"},
        "optim": {"name": "SGD", "args": {"lr": 0.1}},
        "memory": {"checkpointing": "auto"},
        "train": {"steps": 2, "eval_every": 0, "device": "cpu", "precision": "auto"}})
    run = tmp_path / "run"
    first = cli("train", recipe, "--out", run, "--max-steps", "1", "--json")
    assert first.exit_code == 0, first.output
    saved = json.loads((run / "probe.json").read_text())
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["strategies"] == saved["choice_label"]
    assert len(saved["strategies"]) == 4

    resumed = cli("train", "--resume", run, "--json")
    assert resumed.exit_code == 0, resumed.output
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    probe = next(e for e in events if e["event"] == "probe")
    assert probe["reused"] and probe["strategies"] == saved["choice_label"]
    assert events[-1]["strategies"] == saved["choice_label"] and events[-1]["steps"] == 2


def test_auto_strategies_with_a_fixed_micro_batch_report_that_micro_batch(cli, write_recipe,
                                                                        tmp_path):
    """batch.micro: 4 with strategies auto: the probe weighs the strategies at 4, and what it
    says and saves is about the 4 × 6 that trains, not the largest micro-batch it found."""
    recipe = _user_recipe(write_recipe, tmp_path, {
        "model": {"name": "user_blocks:SmallNet"},
        "data": {"name": "user_blocks:Images", "args": {"n": 48}},
        "batch": {"target": 24, "micro": 4, "memory_budget": "64MiB"},
        "optim": {"name": "SGD", "args": {"lr": 0.1}},
        "memory": {"checkpointing": "auto"},
        "train": {"steps": 1, "eval_every": 0, "device": "cpu"}})
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    probe = next(e for e in events if e["event"] == "probe")
    saved = json.loads((tmp_path / "run" / "probe.json").read_text())
    assert (probe["micro_batch"], probe["accumulation_steps"]) == (4, 6)
    assert (saved["micro_batch"], saved["accumulation_steps"]) == (4, 6)
    assert saved["largest_micro_batch"] > 4  # what else would have fitted
    assert saved["verified_peak_bytes"] == probe["verified_peak_bytes"] <= saved["usable_bytes"]
    at_largest = max(m["peak_bytes"] for m in saved["measurements"] if m["peak_bytes"])
    assert saved["verified_peak_bytes"] < at_largest  # measured at 4, not at the largest


def test_more_blocks_to_offload_than_the_model_has_is_refused(cli, write_recipe, tmp_path):
    recipe = _user_recipe(write_recipe, tmp_path, {
        "model": {"name": "user_blocks:SmallNet"},
        "data": {"name": "user_blocks:Images", "args": {"n": 16}},
        "batch": {"target": 16, "micro": "auto"},
        "optim": {"name": "SGD", "args": {"lr": 0.1}},
        "memory": {"offload": "on", "offload_blocks": 3},
        "train": {"steps": 1, "device": "cpu"}})
    result = cli("probe", recipe, "--estimate", "--device-memory", "1GiB")
    assert result.exit_code == 2
    assert ("memory.offload_blocks: 3, but the model has 2 blocks to offload; leave it out to "
            "offload them all") in result.stderr
    assert _probe(cli, recipe, "--estimate", "--device-memory", "1GiB",
                  "--set", "memory.offload_blocks=2")["backend"] == "estimate"
