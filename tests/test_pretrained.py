"""Pretrained torchvision weights with a new head, torch's cache, offline errors, transforms."""

from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image

from mbp_cli.catalog.pretrained import find_head
from mbp_cli.engine.splits import split_transforms
from mbp_cli.recipe.load import load_recipe
from tests.conftest import small_recipe

WEIGHTS_FILE = "mobilenet_v3_small-047dcff4.pth"  # MobileNet_V3_Small_Weights.IMAGENET1K_V1


def pretrained_recipe(**model_args) -> dict:
    return small_recipe(
        model={"name": "mobilenet_v3_small", "args": {"weights": "DEFAULT", **model_args}},
        data={"name": "synthetic", "args": {"num_samples": 12, "num_classes": 3,
                                            "shape": [3, 32, 32]}},
        batch={"target": 6, "micro": 3}, optim={"name": "SGD", "args": {"lr": 0.0}},
        train={"steps": 1, "eval_every": 0, "device": "cpu"})


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """An empty torch cache of our own (TORCH_HOME), as on a machine that never downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def test_weights_from_the_cache_with_a_new_head(cli, write_recipe, tmp_path, torch_cache):
    """A weights file already in torch's cache is used (nothing downloads); num_classes: 3
    replaces the 1000-class head, and every other weight is the file's."""
    torch.manual_seed(123)
    cached = torchvision.models.mobilenet_v3_small().state_dict()
    torch_cache.mkdir(parents=True)
    torch.save(cached, torch_cache / WEIGHTS_FILE)
    result = cli("train", write_recipe(pretrained_recipe(num_classes=3)), "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    trained = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert trained["classifier.3.weight"].shape == (3, 1024)
    for name, value in cached.items():
        if name.startswith("features.") and name.endswith("weight"):  # lr 0: unchanged
            assert torch.equal(trained[name], value), name
    (torch_cache / WEIGHTS_FILE).unlink()  # offline, the run's model.pt is all eval needs
    evaluated = cli("eval", tmp_path / "r", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    torch.save(torch.randn(3, 32, 32), tmp_path / "x.pt")
    predicted = cli("predict", tmp_path / "r", tmp_path / "x.pt", "--out", tmp_path / "p.pt")
    assert predicted.exit_code == 0, predicted.output


def test_offline_without_the_file_is_one_line_naming_the_cache(cli, write_recipe, tmp_path,
                                                               torch_cache):
    result = cli("train", write_recipe(pretrained_recipe(num_classes=3)), "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "cannot get the weights MobileNet_V3_Small_Weights.IMAGENET1K_V1 for " \
           "mobilenet_v3_small" in result.stderr
    assert f"torch caches them in {torch_cache}: put {WEIGHTS_FILE} there" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize(("name", "args", "message"), [
    ("mobilenet_v3_small", {"weights": "IMAGENET1K_V9"},
     "model.args.weights: mobilenet_v3_small has no weights 'IMAGENET1K_V9'; did you mean "
     "IMAGENET1K_V1?"),
    ("resnet18", {"weights": "DEFAULT", "num_clases": 3},
     "model.args: resnet18 refuses these arguments: ResNet.__init__() got an unexpected "
     "keyword argument 'num_clases'"),
])
def test_validate_checks_weights_before_any_download(cli, write_recipe, name, args, message,
                                                     torch_cache):
    recipe = pretrained_recipe()
    recipe["model"] = {"name": name, "args": args}
    result = cli("validate", write_recipe(recipe))
    assert result.exit_code == 2 and message in result.stderr
    assert not torch_cache.exists()


def test_a_model_whose_head_cannot_be_found_is_refused_at_load(cli, write_recipe, torch_cache):
    """SqueezeNet classifies with a convolution: there is no Linear head to replace."""
    recipe = pretrained_recipe(num_classes=3)
    recipe["model"]["name"] = "squeezenet1_0"
    result = cli("validate", write_recipe(recipe))
    assert result.exit_code == 2
    assert "no Linear layer with 1000 outputs to replace; name the classifier with model.head" \
        in result.stderr


@pytest.mark.parametrize(("name", "head"), [
    ("resnet18", "fc"), ("vit_b_16", "heads.head"), ("convnext_tiny", "classifier.2"),
    ("efficientnet_b0", "classifier.1"), ("mobilenet_v2", "classifier.1"),
    ("mobilenet_v3_small", "classifier.3"),
])
def test_the_head_is_found_in_the_documented_models(name, head):
    with torch.device("meta"):
        model = torchvision.models.get_model(name)
    assert find_head(model, 1000, None) == head


def test_transforms_by_name_for_training_and_resize_normalize_for_eval(write_recipe, tmp_path):
    image = Image.new("RGB", (20, 16), "red")
    recipe = load_recipe(write_recipe(small_recipe(data={
        "name": "ImageFolder", "args": {"root": str(tmp_path)}, "resize": 12,
        "normalize": "imagenet",
        "transforms": [{"RandomResizedCrop": {"size": 8}}, "RandomHorizontalFlip"]})))
    train_tf, eval_tf = split_transforms(recipe, is_torchvision=True)
    assert train_tf(image).shape == (3, 8, 8)
    expected = (1.0 - 0.485) / 0.229  # red, normalized with ImageNet's mean and std
    evaluated = eval_tf(image)
    assert evaluated.shape == (3, 12, 12)
    assert torch.allclose(evaluated[0], torch.full((12, 12), expected), atol=1e-5)


def test_pretrained_models_get_their_weights_transforms(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(
        model={"name": "resnet18", "args": {"weights": "IMAGENET1K_V1", "num_classes": 2}},
        data={"name": "ImageFolder", "args": {"root": "images"}})))
    train_tf, eval_tf = split_transforms(recipe, is_torchvision=True)
    assert train_tf(Image.new("RGB", (300, 260))).shape == (3, 224, 224)  # resize 256, crop 224
    assert eval_tf is train_tf


def test_unknown_transforms_are_named_at_load(cli, write_recipe):
    recipe = small_recipe(data={"name": "digits", "transforms": ["RandomHorizontalFlop",
                                                                 {"Normalize": {"mena": [0]}}]})
    result = cli("validate", write_recipe(recipe))
    assert result.exit_code == 2
    assert "data.transforms: unknown transform 'RandomHorizontalFlop'; did you mean " \
           "RandomHorizontalFlip?" in result.stderr
    assert "data.transforms.Normalize.mena: Normalize has no argument 'mena'; did you mean " \
           "mean?" in result.stderr
