"""The real training loop: same model as full-batch training, micro-batches only on the device."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mbp_cli.catalog.datasets import synthetic_tokens
from mbp_cli.catalog.models import mlp, tiny_lm
from mbp_cli.commands.train import train
from mbp_cli.data.batching import epoch_target_batches
from mbp_cli.engine.setup import build, resolve_device
from mbp_cli.recipe.load import load_recipe
from mbp_cli.run.start import RunOptions
from tests.conftest import REPO, collect, small_recipe

TOKENS = {"name": "synthetic_tokens",
          "args": {"num_samples": 50, "vocab_size": 12, "min_len": 2, "max_len": 10}}
LM = {"name": "tiny_lm", "args": {"vocab_size": 12, "dim": 8}}


def lm_recipe(micro: int, **train_args) -> dict:
    return small_recipe(model=LM, data=TOKENS, batch={"target": 20, "micro": micro},
                        optim={"name": "SGD", "args": {"lr": 0.5}},
                        train={"epochs": 2, "eval_every": 0, "device": "cpu",
                               "dtype": "float64", **train_args})


def run(write_recipe, tmp_path, recipe: dict, name: str = "run") -> dict[str, torch.Tensor]:
    loaded = load_recipe(write_recipe(recipe, f"{name}.yaml"))
    out = tmp_path / name
    out.mkdir()
    train(loaded, RunOptions(out), sinks=[])
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("micro", [1, 3, 7, 20])
def test_a_run_equals_full_batch_sgd_done_by_hand(write_recipe, tmp_path, micro):
    """Two epochs of 50 sequences at target 20: batches of 20, 20 and a smaller 10, each sequence
    with its own number of tokens. The reference takes torch's mean loss over each whole batch."""
    got = run(write_recipe, tmp_path, lm_recipe(micro))

    torch.manual_seed(0)  # the recipe's seed: same initial weights
    model = tiny_lm(vocab_size=12, dim=8).double()
    data = synthetic_tokens(train=True, **TOKENS["args"])
    for epoch in range(2):
        for batch in epoch_target_batches(50, 20, seed=0, epoch=epoch, drop_last=False):
            logits = model(data.inputs[batch])
            loss = F.cross_entropy(logits.reshape(-1, 12), data.targets[batch].reshape(-1))
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
    for name, expected in model.state_dict().items():
        assert torch.allclose(got[name], expected, rtol=1e-10, atol=1e-12), name


def test_drop_last_skips_the_smaller_batch(write_recipe, tmp_path):
    recipe = lm_recipe(7)
    recipe["batch"]["drop_last"] = True
    loaded = load_recipe(write_recipe(recipe))
    events = []
    train(loaded, RunOptions(tmp_path / "run"), sinks=collect(events))
    assert [e["samples"] for e in events if e["event"] == "step"] == [20, 20, 20, 20]


def test_only_micro_batches_reach_the_model(write_recipe, tmp_path, monkeypatch):
    """The full target batch is never on the device: every forward sees at most `micro`."""
    loaded = load_recipe(write_recipe(small_recipe(batch={"target": 300, "micro": 16})))
    setup = build(loaded, resolve_device("cpu"))
    sizes: list[int] = []
    setup.model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    monkeypatch.setattr("mbp_cli.run.start.build", lambda recipe, device: setup)
    train(loaded, RunOptions(tmp_path / "run"), sinks=[])
    assert max(sizes) == 16 and sum(sizes[:19]) == 300  # 18 × 16 + 12, then the next batch


def test_epochs_count_steps_over_the_training_split(write_recipe, tmp_path):
    loaded = load_recipe(write_recipe(small_recipe(train={"epochs": 1, "eval_every": 0,
                                                          "device": "cpu"})))
    events = []
    summary = train(loaded, RunOptions(tmp_path / "run"), sinks=collect(events))
    assert summary["samples_seen"] == 1438 and summary["steps"] == 29  # ⌈1438 / 50⌉


def test_image_folder_and_import_paths(write_recipe, tmp_path, monkeypatch):
    """A small ImageFolder written here, a model and a dataset named by import path."""
    for label, colour in enumerate(["red", "blue"]):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12 + i, 10), colour).save(folder / f"{i}.png")
    (tmp_path / "my_models.py").write_text(
        "from mbp_cli.catalog.models import small_cnn\n"
        "def colour_net(classes):\n    return small_cnn(num_classes=classes, in_channels=3)\n")
    monkeypatch.chdir(tmp_path)
    recipe = small_recipe(model={"name": "my_models:colour_net", "args": {"classes": 2}},
                          data={"name": "ImageFolder", "args": {"root": "images"},
                                "resize": 16, "eval_fraction": 0.25},
                          batch={"target": 9, "micro": 4}, train={"steps": 2, "device": "cpu"})
    loaded = load_recipe(write_recipe(recipe))
    summary = train(loaded, RunOptions(tmp_path / "run"), sinks=[])
    assert summary["samples_seen"] == 18 and summary["eval_accuracy"] is not None


DATA_WITH_IGNORED_HELD_OUT = """
import torch
from mbp_cli.catalog.datasets import TensorPairs

def pairs(train: bool = True):
    draw = torch.Generator().manual_seed(1 if train else 2)
    inputs = torch.randn(40, 6, generator=draw, dtype=torch.float64)
    targets = torch.randint(3, (40,), generator=draw)
    if not train:
        targets[::3] = -100  # held-out items to leave out, as a masked split has
    return TensorPairs(inputs, targets)
"""


def test_items_are_counted_where_the_data_may_hold_ignored_targets(write_recipe, tmp_path,
                                                                   monkeypatch):
    """Training targets without ignore_index are counted as they are (no op per micro-batch),
    yet the held-out split's ignored targets still are left out: both means equal torch's."""
    (tmp_path / "my_data.py").write_text(DATA_WITH_IGNORED_HELD_OUT)
    monkeypatch.chdir(tmp_path)
    model = {"name": "mlp", "args": {"in_features": 6, "hidden": 8, "out_features": 3}}
    got = run(write_recipe, tmp_path, small_recipe(
        model=model, data={"name": "my_data:pairs"}, batch={"target": 16, "micro": 5},
        train={"steps": 3, "eval_every": 3, "device": "cpu", "dtype": "float64"}))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())

    import my_data
    torch.manual_seed(0)
    reference = mlp(**model["args"]).double()
    train_set, held_out = my_data.pairs(train=True), my_data.pairs(train=False)
    for batch in epoch_target_batches(40, 16, seed=0, epoch=0, drop_last=False):  # 16, 16, 8
        reference.zero_grad()
        F.cross_entropy(reference(train_set.inputs[batch]), train_set.targets[batch]).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.1 * p.grad
    for name, expected in reference.state_dict().items():
        assert torch.allclose(got[name], expected, rtol=1e-10, atol=1e-12), name
    with torch.no_grad():
        expected_loss = F.cross_entropy(reference(held_out.inputs), held_out.targets)
    assert summary["eval_loss"] == pytest.approx(float(expected_loss), rel=1e-10)


@pytest.mark.slow
def test_the_readme_recipe_reaches_96_5_percent(tmp_path):
    """`mbp train recipes/digits.yaml`, the README's first command, as a user runs it."""
    summary = train(load_recipe(REPO / "recipes" / "digits.yaml"), RunOptions(tmp_path / "run"),
                    sinks=[])
    assert summary["eval_accuracy"] >= 0.965  # the README's promise (seeds 0–4: 98.3–99.2%)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 200


@pytest.mark.slow
def test_the_tiny_lm_recipe_learns(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "tiny-lm.yaml")
    events = []
    summary = train(recipe, RunOptions(tmp_path / "run", max_steps=60), sinks=collect(events))
    first_loss = next(e["loss"] for e in events if e["event"] == "step")
    assert summary["final_train_loss"] < first_loss / 4
