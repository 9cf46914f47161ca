"""`model.output: all`: a loss of your own reads the model's whole output (torchvision
segmentation's {"out", "aux"}), exactly, and what shows the scores (validate, evaluation,
predict, the probe) still finds them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from mbp_cli.data.batching import epoch_target_batches
from tests import byo
from tests.test_byo import write_beside_byo

TARGET, MICRO, LR = 5, 2, 0.1  # 2 + 2 + 1


def seg_recipe(model: str, data: dict, **train) -> dict:
    return {"name": "seg", "seed": 0, "model": {"name": model, "output": "all"},
            "data": data, "loss": {"name": "byo:out_and_aux"},
            "batch": {"target": TARGET, "micro": MICRO, "batchnorm": "frozen"},
            "optim": {"name": "SGD", "args": {"lr": LR}},
            "train": {"steps": 1, "eval_every": 0, "device": "cpu", "dtype": "float64",
                      **train}}


def torchs_loss(output: dict, target: torch.Tensor) -> torch.Tensor:
    """torchvision's reference training loss, with torch's own means (0.4 for the aux)."""
    return F.cross_entropy(output["out"], target, ignore_index=255) + \
        0.4 * F.cross_entropy(output["aux"], target, ignore_index=255)


@pytest.mark.slow
def test_torchvision_fcn_with_its_aux_head_equals_the_full_batch_step(cli, tmp_path):
    recipe = write_beside_byo(tmp_path / "p", seg_recipe("byo:fcn", {"name": "byo:Scenes"}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)
    model = byo.fcn().double().eval()  # batchnorm: frozen; dropout is off
    dataset = byo.Scenes(train=True)
    indices = epoch_target_batches(len(dataset), TARGET, seed=0, epoch=0, drop_last=False)[0]
    images, masks = default_collate([dataset[i] for i in indices])
    torchs_loss(model(images.double()), masks).backward()
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected = p - LR * p.grad
            assert float((got[name] - expected).norm() / expected.norm()) <= 1e-10, name


def test_validate_evaluation_probe_and_predict_read_the_scores(cli, tmp_path):
    data = {"name": "byo:Shapes"}
    recipe = write_beside_byo(tmp_path / "p", seg_recipe("byo:TinySegmenter", data))
    validated = cli("validate", recipe)
    assert validated.exit_code == 0, validated.output
    assert "output (2, 3, 6, 6)" in validated.stdout  # the out head's scores
    probed = cli("probe", recipe, "--budget", "64MiB", "--json")
    assert probed.exit_code == 0, probed.output
    assert json.loads(probed.stdout)["micro_batch"] >= 1
    run = tmp_path / "run"
    trained = cli("train", recipe, "--out", run, "--json")
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.stdout.splitlines()[-1])
    torch.manual_seed(0)
    model = byo.TinySegmenter().double()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    held_out = byo.Shapes(train=False)
    with torch.no_grad():
        output = model(held_out.images.double())
    assert summary["eval_loss"] == pytest.approx(float(torchs_loss(output, held_out.masks)),
                                                 rel=1e-10)
    assert summary["eval_accuracy"] is None  # a loss of your own: no accuracy
    torch.save(held_out.images[:2], tmp_path / "two.pt")
    predicted = cli("predict", run, tmp_path / "two.pt", "--out", tmp_path / "pred.pt")
    assert predicted.exit_code == 0, predicted.output
    saved = torch.load(tmp_path / "pred.pt", weights_only=True)[str(tmp_path / "two.pt")]
    assert torch.allclose(saved.double(), output["out"][:2], rtol=1e-5, atol=1e-6)


def test_a_built_in_loss_with_the_whole_output_is_one_line(cli, tmp_path):
    recipe = seg_recipe("byo:TinySegmenter", {"name": "byo:Shapes"})
    recipe["loss"] = {"name": "cross_entropy"}
    result = cli("validate", write_beside_byo(tmp_path / "p", recipe))
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        "error: model.output: all hands the model's whole output to a loss of your own "
        "(loss.name: module:callable); the built-in losses read one tensor: name it with "
        "model.output (a key, an attribute or an index)"]
