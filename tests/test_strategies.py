"""Memory strategies through the real `mbp train`: activation checkpointing gives the very same
model (dropout and BatchNorm included), BatchNorm's running statistics move once per target
batch as the full batch moves them, bf16 stays within its rounding of the full-batch gradient,
and an fp16 overflow skips its whole target batch once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mbp_cli.data.batching import epoch_target_batches
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.run.target_batch import target_batch_step
from mbp_cli.strategies.blocks import BlockStrategies, find_blocks
from mbp_cli.strategies.precision import Precision
from tests import user_blocks
from tests.conftest import small_recipe

USER = Path(user_blocks.__file__)


def _recipe(model: dict, data: dict, *, target: int = 12, micro: int = 4, steps: int = 2,
            **sections: dict) -> dict:
    train = {"steps": steps, "eval_every": 0, "device": "cpu", "dtype": "float64",
             **sections.pop("train", {})}
    return small_recipe(model=model, data=data, batch={"target": target, "micro": micro},
                        train=train, **sections)


def _train(cli, write_recipe, tmp_path: Path, recipe: dict, name: str) -> dict:
    shutil.copy(USER, tmp_path / "user_blocks.py")
    run = tmp_path / name
    result = cli("train", write_recipe(recipe, f"{name}.yaml"), "--out", run, "--json")
    assert result.exit_code == 0, result.output
    return torch.load(run / "model.pt", weights_only=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


VIT = {"name": "torchvision.models.vision_transformer:VisionTransformer",
       "args": {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2,
                "hidden_dim": 16, "mlp_dim": 32, "dropout": 0.1, "attention_dropout": 0.1,
                "num_classes": 10}}
CHECKPOINTED = {
    "ResNet-18 (BatchNorm)": ({"name": "resnet18", "args": {"num_classes": 10}}, None),
    "ViT (dropout)": (VIT, None),
    "own blocks named (dropout, BatchNorm)": ({"name": "user_blocks:SmallNet"}, ["Residual"]),
}


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_checkpointing_trains_the_same_model(cli, write_recipe, tmp_path, case):
    model, classes = CHECKPOINTED[case]
    data = {"name": "user_blocks:Images"}
    plain = _train(cli, write_recipe, tmp_path, _recipe(model, data), "plain")
    memory = {"checkpointing": "on", "checkpoint_modules": classes}
    checkpointed = _train(cli, write_recipe, tmp_path, _recipe(model, data, memory=memory),
                          "checkpointed")
    moved = [k for k in plain if plain[k].is_floating_point()
             and _relative(plain[k], torch.zeros_like(plain[k])) > 0]
    assert moved
    for key, value in plain.items():  # parameters and BatchNorm's running statistics
        assert _relative(checkpointed[key], value) <= 1e-12, key


def test_blocks_are_found_in_torchvision_models_and_module_lists():
    def names(model: nn.Module) -> list[str]:
        return [name for name, _ in find_blocks(model)]

    resnet = torchvision.models.resnet18()
    assert names(resnet) == ["maxpool"] + [f"layer{i}.{j}" for i in range(1, 5)
                                           for j in range(2)]
    vit = torchvision.models.vit_b_16()
    assert names(vit) == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    for name, block_class in (("convnext_tiny", "CNBlock"), ("efficientnet_b0", "MBConv"),
                              ("mobilenet_v3_small", "InvertedResidual")):
        model = torchvision.models.get_model(name)
        blocks = names(model)
        inside = [module for module, m in model.named_modules()
                  if type(m).__name__ == block_class]
        # every block of the stage sits in exactly one checkpointed piece (a single-block
        # stage is taken whole)
        assert all(sum(m == b or m.startswith(b + ".") for b in blocks) == 1 for m in inside)
        assert len(blocks) >= len(inside) / 2
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    assert names(nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)) == [
        "layers.0", "layers.1", "layers.2"]
    assert names(user_blocks.SmallNet()) == ["first", "second"]
    named = find_blocks(resnet, ["Sequential"])  # the user's choice: whole stages
    assert [name for name, _ in named] == ["layer1", "layer2", "layer3", "layer4"]


def test_batchnorm_running_statistics_move_once_per_target_batch(cli, write_recipe, tmp_path):
    target, micro = 20, 7  # 7 + 7 + 6
    recipe = _recipe({"name": "user_blocks:NormFirst"}, {"name": "user_blocks:Features"},
                     target=target, micro=micro, steps=1)
    got = _train(cli, write_recipe, tmp_path, recipe, "run")

    data = user_blocks.Features(train=True)
    batch = epoch_target_batches(len(data), target, seed=0, epoch=0, drop_last=False)[0]
    norm = nn.BatchNorm1d(4).double().train()
    norm(data.x[batch].double())  # the full batch, as torch updates the statistics
    assert int(got["norm.num_batches_tracked"]) == 1
    assert _relative(got["norm.running_mean"], norm.running_mean) <= 1e-10
    assert _relative(got["norm.running_var"], norm.running_var) <= 1e-10


def test_bf16_autocast_accumulates_the_full_batch_gradient_within_its_rounding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(29, 6), torch.randint(4, (29,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    step = MicroStep(model, lambda out, t: (F.cross_entropy(out, t, reduction="sum"),
                                            torch.tensor(t.numel())),
                     torch.device("cpu"), torch.float32,
                     precision=Precision("bf16", torch.device("cpu")))
    pieces = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 29, 8)]  # 8 + 8 + 8 + 5
    totals = target_batch_step(step, pieces).totals
    assert totals.items == 29
    for p, want in zip(model.parameters(), expected, strict=True):
        assert _relative(p.grad, want) <= 1e-2  # bf16 keeps 8 bits of mantissa


def outlier_regression(tmp_path, train: dict, **sections) -> dict:
    """A linear regression on features ten thousand times larger in sample 5 (fp16 overflows
    on its micro-batch), the tests' user_blocks copied beside it."""
    shutil.copy(USER, tmp_path / "user_blocks.py")
    return small_recipe(
        model={"name": "torch.nn:Linear", "args": {"in_features": 4, "out_features": 1}},
        data={"name": "user_blocks:Features", "args": {"n": 16, "outlier": True},
              "eval_fraction": 0.0},
        batch={"target": 8, "micro": 4}, loss={"name": "mse"},
        train={"eval_every": 0, "device": "cpu", **train}, **sections)


def test_fp16_overflow_in_one_micro_batch_skips_its_target_batch_once(cli, write_recipe,
                                                                      tmp_path):
    recipe = outlier_regression(tmp_path, {"steps": 2, "precision": "fp16"}, optim={
        "name": "SGD", "args": {"lr": 0.1}, "clip_grad_norm": 1.0})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output

    def strict(line: str) -> dict:  # as JavaScript's JSON.parse reads it: no NaN, no Infinity
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))

    events = [strict(line) for line in result.stdout.splitlines()]
    overflows = [e for e in events if e["event"] == "overflow"]
    summary = events[-1]
    assert summary["overflow_skips"] == 1 and len(overflows) == 1
    steps = [e for e in events if e["event"] == "step"]  # the overflow's norm is infinite
    assert [e["grad_norm"] is None for e in steps] == [e["step"] == overflows[0]["step"]
                                                       for e in steps]
    assert [strict(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("fp16 on the CPU runs slowly" in message for message in warnings)
    shown = cli("train", write_recipe(recipe), "--out", tmp_path / "shown")
    assert "fp16 loss scale" in shown.stdout and "1 target batches skipped" in shown.stdout
    first_scale = 2.0 ** 14  # 2**16 for a micro-batch of 4 whose loss is a sum of 4 items
    assert overflows[0]["loss_scale"] == first_scale / 2  # dropped once, not per micro-batch
    assert summary["strategies"] == "fp16"


def test_offload_on_a_cpu_device_is_refused_with_the_reason(cli, write_recipe, tmp_path):
    recipe = small_recipe(memory={"offload": "on"})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "nothing to offload" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_checkpointing_a_model_without_blocks_names_the_classes_to_choose(cli, write_recipe,
                                                                         tmp_path):
    recipe = small_recipe(memory={"checkpointing": "on", "checkpoint_modules": ["Blok"]})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "Blok" in result.output and "Sequential" in result.output


@pytest.mark.slow
def test_bf16_digits_recipe_reaches_94_percent(tmp_path):
    """The first command's recipe under bf16 autocast, its first 50 steps (this CPU has no
    native bf16, so autocast is slower than fp32; on a GPU it is the fast path)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mbp_cli", "train",
                           str(REPO / "recipes" / "digits.yaml"), "--set",
                           "train.precision=bf16", "--set", "train.device=cpu", "--set",
                           "train.steps=50", "--out",
                           str(run), "--quiet"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategies"] == "bf16" and summary["eval_accuracy"] >= 0.94


def test_offloaded_activations_give_the_same_gradients():
    """The offload hooks themselves (host copies on the way in, back on the way out), run on
    the CPU where `memory.offload` is refused for meaning nothing: gradients unchanged."""
    torch.manual_seed(0)
    model = user_blocks.SmallNet().double()
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(10, (6,))

    def gradients() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    offloaded = BlockStrategies(find_blocks(model), offload_blocks=1).apply()
    got = gradients()
    offloaded.remove()
    assert all(_relative(g, p) <= 1e-15 for g, p in zip(got, plain, strict=True))
    # the estimate's hooks keep shapes only: the block's activations really pass through them
    shapes_only = BlockStrategies(find_blocks(model), offload_blocks=1, estimate=True).apply()
    garbled = gradients()
    shapes_only.remove()
    assert not all(torch.equal(g, p) for g, p in zip(garbled, plain, strict=True))


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one_checkpointed_or_not(
        cli, write_recipe, tmp_path):
    train = {"steps": 2, "eval_every": 0, "device": "cpu"}
    recipe = small_recipe(batch={"target": 64, "micro": 32}, train=train)
    eager = _train(cli, write_recipe, tmp_path, recipe, "eager")
    compiled_recipe = small_recipe(batch={"target": 64, "micro": 32},
                                   train={**train, "compile": True})
    compiled = _train(cli, write_recipe, tmp_path, compiled_recipe, "compiled")
    assert compiled.keys() == eager.keys()  # the state dict keeps its keys
    for key, value in eager.items():
        assert _relative(compiled[key], value) <= 1e-4, key
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0
    checkpointed_recipe = {**compiled_recipe, "memory": {"checkpointing": "on",
                                                         "checkpoint_modules": ["Conv2d"]}}
    checkpointed = _train(cli, write_recipe, tmp_path, checkpointed_recipe, "checkpointed")
    for key, value in eager.items():
        assert _relative(checkpointed[key], value) <= 1e-4, key


def test_fp16_resume_continues_with_the_saved_loss_scale(cli, write_recipe, tmp_path):
    recipe = write_recipe(outlier_regression(tmp_path, {"steps": 4, "checkpoint_every": 1,
                                                        "precision": "fp16"}))
    straight = cli("train", recipe, "--out", tmp_path / "straight", "--json")
    first = cli("train", recipe, "--out", tmp_path / "resumed", "--max-steps", "2", "--json")
    resumed = cli("train", "--resume", tmp_path / "resumed", "--json")
    assert straight.exit_code == first.exit_code == resumed.exit_code == 0, resumed.output
    ends = [json.loads(r.stdout.splitlines()[-1]) for r in (straight, resumed)]
    assert ends[0]["overflow_skips"] == ends[1]["overflow_skips"] == 2  # the outlier, twice
    assert ends[0]["loss_scale"] == ends[1]["loss_scale"] == 2.0 ** 12
    got = [torch.load(tmp_path / run / "model.pt", weights_only=True)
           for run in ("straight", "resumed")]
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])


@pytest.mark.parametrize(("memory", "said"), [
    ({"offload": "on"}, "nothing to offload"),
    ({"checkpointing": "on", "checkpoint_modules": ["NoSuchBlock"]}, "NoSuchBlock"),
    ({"checkpoint_modules": ["Residual"]}, "memory.checkpointing: on"),
])
def test_validate_refuses_the_strategies_training_would_refuse(cli, write_recipe, memory, said):
    result = cli("validate", write_recipe(small_recipe(memory=memory)))
    assert result.exit_code == 2 and said in result.output


def test_resuming_a_finished_run_changes_nothing(cli, write_recipe, tmp_path):
    run = tmp_path / "run"
    assert cli("train", write_recipe(small_recipe()), "--out", run).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run / "summary.json", run / "metrics.jsonl")}
    again = cli("train", "--resume", run)
    assert again.exit_code == 2 and "already trained all 3 steps" in again.output
    assert before == {p.name: p.read_bytes() for p in (run / "summary.json",
                                                        run / "metrics.jsonl")}


def test_the_start_says_which_blocks_are_checkpointed(cli, write_recipe, tmp_path):
    shutil.copy(USER, tmp_path / "user_blocks.py")
    recipe = _recipe({"name": "user_blocks:SmallNet"}, {"name": "user_blocks:Images"},
                     steps=1, memory={"checkpointing": "on"})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run", "--json")
    start = next(json.loads(line) for line in result.stdout.splitlines()
                 if json.loads(line)["event"] == "start")
    assert start["strategies"] == "fp32 + checkpointing on first … second"


def test_a_model_without_repeated_blocks_is_told_which_classes_to_name(cli, write_recipe,
                                                                       tmp_path):
    """The classes suggested are ones that work: the model's own class is not among them."""
    model = {"name": "mlp", "args": {"in_features": 64, "depth": 2}}  # a Sequential of layers
    train = {"steps": 1, "eval_every": 0, "device": "cpu"}
    result = cli("train", write_recipe(small_recipe(
        model=model, train=train, memory={"checkpointing": "on"})), "--out", tmp_path / "a")
    assert result.exit_code == 2
    assert ("memory.checkpointing: no repeated blocks found in Sequential; name its blocks' "
            "classes with memory.checkpoint_modules (one of: Linear)") in result.stderr
    named_root = cli("train", write_recipe(small_recipe(model=model, train=train, memory={
        "checkpointing": "on", "checkpoint_modules": ["Sequential"]})), "--out", tmp_path / "b")
    assert named_root.exit_code == 2
    assert "its modules' classes are: Linear" in named_root.stderr
    suggested = cli("train", write_recipe(small_recipe(model=model, train=train, memory={
        "checkpointing": "on", "checkpoint_modules": ["Linear"]})), "--out", tmp_path / "c")
    assert suggested.exit_code == 0, suggested.output


def test_predict_saves_outputs_that_are_not_class_scores_and_overwrites_only_when_asked(
        cli, write_recipe, tmp_path):
    recipe = write_recipe(outlier_regression(tmp_path, {"steps": 1}))
    assert cli("train", recipe, "--out", tmp_path / "run").exit_code == 0
    torch.save(torch.ones(4), tmp_path / "x.pt")
    out = tmp_path / "mine.pt"
    out.write_bytes(b"the user's own file")
    refused = cli("predict", tmp_path / "run", tmp_path / "x.pt", "--out", out)
    assert refused.exit_code == 2
    assert f"{out} exists: give --overwrite to replace it" in refused.stderr
    assert out.read_bytes() == b"the user's own file"
    done = cli("predict", tmp_path / "run", tmp_path / "x.pt", "--out", out, "--overwrite")
    assert done.exit_code == 0, done.output
    saved = torch.load(out, weights_only=True)
    assert saved[str(tmp_path / "x.pt")].shape == (1, 1)  # a batch of one: (N, 1), no softmax
