"""Your own model, data and loss, written the PyTorch way, through the real `mbp train`: one SGD
step on an uneven split equals the full-batch step computed here with torch's own loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import default_collate

from mbp_cli.data.batching import epoch_target_batches
from tests import byo

BYO = Path(byo.__file__)
WEIGHT = [1.0, 2.0, 0.5, 3.0]
TARGET, MICRO, LR = 20, 7, 0.5  # 7 + 7 + 6


def _kept(y):
    return y != -100


CASES = {
    "classes in dim 1, weighted, ignored, smoothed": (
        {"name": "byo:classifier"}, {"name": "byo:Features"},
        {"name": "cross_entropy", "args": {"weight": WEIGHT, "label_smoothing": 0.1}},
        lambda out, y: F.cross_entropy(out, y, weight=torch.tensor(WEIGHT).double(),
                                       label_smoothing=0.1)),
    "nll, weighted": (
        {"name": "byo:classifier"}, {"name": "byo:Features"},
        {"name": "nll", "args": {"weight": WEIGHT}},
        lambda out, y: F.nll_loss(out, y, weight=torch.tensor(WEIGHT).double())),
    "(N, C, L) sequence tagger": (
        {"name": "byo:Tagger"}, {"name": "byo:Tagging"}, {"name": "cross_entropy"},
        F.cross_entropy),
    "(N, C, H, W) segmentation, dict output": (
        {"name": "byo:TinySegmenter"}, {"name": "byo:Shapes"}, {"name": "cross_entropy"},
        lambda out, y: F.cross_entropy(out["out"], y)),
    "(N, L, C) .logits output, dict batch": (
        {"name": "byo:DictLM"}, {"name": "byo:DictTokens"}, {"name": "cross_entropy"},
        lambda out, y: F.cross_entropy(out.logits.reshape(-1, 16), y.reshape(-1))),
    "(x1, x2, y) tuple batch": (
        {"name": "byo:TwoInputs"}, {"name": "byo:Pairs"}, {"name": "cross_entropy"},
        F.cross_entropy),
    "padding collate, tokens counted": (
        {"name": "byo:GRUTagger"}, {"name": "byo:Ragged", "collate": "byo:pad_collate"},
        {"name": "cross_entropy"}, F.cross_entropy),
    "own loss, per-item losses": (
        {"name": "byo:classifier"}, {"name": "byo:Features"},
        {"name": "byo:per_item_cross_entropy", "args": {"smoothing": 0.1}},
        lambda out, y: F.cross_entropy(out[_kept(y)], y[_kept(y)], label_smoothing=0.1)),
    "own loss, (sum, count)": (
        {"name": "byo:classifier"}, {"name": "byo:Features"}, {"name": "byo:sum_and_count"},
        lambda out, y: ((out[_kept(y)].gather(1, y[_kept(y), None]) - 1) ** 2).mean()),
    "own loss reading the whole output: out + 0.4·aux": (
        {"name": "byo:TinySegmenter", "output": "all"}, {"name": "byo:Shapes"},
        {"name": "byo:out_and_aux"},
        lambda out, y: F.cross_entropy(out["out"], y) + 0.4 * F.cross_entropy(out["aux"], y)),
    "torch loss class, ignore_index honoured": (
        {"name": "byo:classifier"}, {"name": "byo:Features"},
        {"name": "torch.nn:CrossEntropyLoss"}, F.cross_entropy),
}


def byo_recipe(model: dict, data: dict, loss: dict, **train) -> dict:
    return {"name": "byo", "seed": 0, "model": model, "data": data, "loss": loss,
            "batch": {"target": TARGET, "micro": MICRO},
            "optim": {"name": "SGD", "args": {"lr": LR}},
            "train": {"steps": 1, "eval_every": 0, "device": "cpu", "dtype": "float64",
                      **train}}


def write_beside_byo(folder: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    """The recipe with the user's module beside it, as a user keeps them."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BYO, folder / "byo.py")
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def full_batch_step(model_spec: dict, data_spec: dict, reference) -> dict[str, torch.Tensor]:
    """The first target batch in one piece, torch's own mean loss, one SGD step."""
    torch.manual_seed(0)
    dataset = getattr(byo, data_spec["name"].split(":")[1])(train=True)
    model = getattr(byo, model_spec["name"].split(":")[1])().double()
    indices = epoch_target_batches(len(dataset), TARGET, seed=0, epoch=0, drop_last=False)[0]
    collate = byo.pad_collate if "collate" in data_spec else default_collate
    batch = collate([dataset[i] for i in indices])
    if isinstance(batch, dict):
        target = batch.pop("labels")
        output = model(**batch)
    else:
        *inputs, target = [t.double() if t.is_floating_point() else t for t in batch]
        output = model(*inputs)
    reference(output, target).backward()
    with torch.no_grad():
        return {name: p.detach() if p.grad is None else (p - LR * p.grad).detach()  # aux: none
                for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_own_model_data_and_loss_equal_the_full_batch_step(cli, tmp_path, case):
    model, data, loss, reference = CASES[case]
    recipe = write_beside_byo(tmp_path / "project", byo_recipe(model, data, loss))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, expected in full_batch_step(model, data, reference).items():
        error = float((got[name] - expected).norm() / expected.norm())
        assert error <= 1e-10, (name, error)


def test_eval_counts_accuracy_the_same_way(cli, tmp_path):
    """Segmentation accuracy is over pixels; the eval split goes through the same micro-step."""
    model, data, loss, _ = CASES["(N, C, H, W) segmentation, dict output"]
    recipe = write_beside_byo(tmp_path / "p", byo_recipe(model, data, loss))
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    summary = yaml.safe_load(result.stdout.splitlines()[-1])
    torch.manual_seed(0)
    segmenter = byo.TinySegmenter().double()
    segmenter.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    held_out = byo.Shapes(train=False)
    with torch.no_grad():
        out = segmenter(held_out.images.double())["out"]
    expected = float((out.argmax(1) == held_out.masks).double().mean())
    assert summary["eval_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert summary["eval_loss"] == pytest.approx(float(F.cross_entropy(out, held_out.masks)),
                                                 rel=1e-10)


def test_frozen_batchnorm_trains_exactly_and_keeps_its_statistics(cli, tmp_path):
    """batch.batchnorm: frozen keeps BatchNorm in eval mode: the split equals the full batch in
    eval-mode BatchNorm, the running statistics stay, and there is no inexactness warning."""
    recipe = byo_recipe({"name": "byo:bn_classifier"}, {"name": "byo:Features"},
                        {"name": "cross_entropy"})
    recipe["batch"]["batchnorm"] = "frozen"
    result = cli("train", write_beside_byo(tmp_path / "p", recipe), "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "BatchNorm" not in result.stderr
    torch.manual_seed(0)
    model = byo.bn_classifier().double()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model[1].eval()
    dataset = byo.Features(train=True)
    indices = epoch_target_batches(len(dataset), TARGET, seed=0, epoch=0, drop_last=False)[0]
    inputs, target = default_collate([dataset[i] for i in indices])
    F.cross_entropy(model(inputs.double()), target).backward()
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected = p - LR * p.grad
            assert float((got[name] - expected).norm() / expected.norm()) <= 1e-10, name
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(got[name], initial[name]), name
