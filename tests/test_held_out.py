"""data.eval: a held-out dataset of its own (a folder of validation images, another stream),
through the real `mbp train` and `mbp validate`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_recipe
from test_after_run import write_images
from test_hugging_face import hf_recipe, trained_gpt2_on, write_beside

from tests import hf_parts


def folder_recipe(tmp_path, **data) -> dict:
    write_images(tmp_path / "train", lambda i: (8, 8))
    (tmp_path / "val").mkdir()
    write_images(tmp_path / "val" / "held", lambda i: (12, 12))  # another folder and size
    return small_recipe(
        model={"name": "small_cnn", "args": {"num_classes": 2, "in_channels": 3, "width": 4}},
        data={"name": "ImageFolder", "args": {"root": str(tmp_path / "train")}, "resize": 8,
              **data},
        batch={"target": 6, "micro": 4}, train={"steps": 2, "eval_every": 0, "device": "cpu"})


def test_a_folder_of_its_own_is_the_held_out_split(cli, write_recipe, tmp_path):
    """All 16 training images train (no fraction held out); the 16 of val/ are scored."""
    recipe = write_recipe(folder_recipe(
        tmp_path, eval={"args": {"root": str(tmp_path / "val" / "held")}}))
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    start = json.loads(result.stdout.splitlines()[0])
    assert (start["train_samples"], start["eval_samples"]) == (16, 16)


def test_without_it_a_fraction_is_held_out(cli, write_recipe, tmp_path):
    result = cli("train", write_recipe(folder_recipe(tmp_path)), "--out", tmp_path / "run",
                 "--json")
    start = json.loads(result.stdout.splitlines()[0])
    assert (start["train_samples"], start["eval_samples"]) == (15, 1)


@pytest.mark.parametrize(("held_out", "problem"), [
    ({"args": {"rooot": "x"}}, "data.eval.args.rooot"),
    ({"nam": "MNIST"}, "data.eval.nam"),
    ({"name": "NoSuchSet"}, "data.eval.name"),
])
def test_a_wrong_held_out_section_is_named(cli, write_recipe, tmp_path, held_out, problem):
    result = cli("validate", write_recipe(folder_recipe(tmp_path, eval=held_out)))
    assert result.exit_code == 2 and problem in result.output, result.output


def test_a_stream_is_scored_on_the_dataset_data_eval_names(cli, tmp_path):
    """A stream without a test split of its own, held out by another dataset of the user's."""
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", data={"name": "hf_parts:texts_stream",
                      "eval": {"name": "hf_parts:TextStream", "args": {"n": 9}}},
        eval_every=1))
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    texts = torch.utils.data.default_collate(list(hf_parts.TextStream(train=False, n=9)))
    expected = trained_gpt2_on(tmp_path / "run", texts).loss
    assert summary["eval_loss"] == pytest.approx(float(expected), rel=1e-6)


def test_eval_says_which_samples_it_scored(cli, write_recipe, tmp_path):
    recipe = write_recipe(folder_recipe(tmp_path))
    assert cli("train", recipe, "--out", tmp_path / "run").exit_code == 0
    default = cli("eval", tmp_path / "run")
    assert default.exit_code == 0 and "on 1 samples of 10% of ImageFolder, held out by seed" \
        in default.output, default.output
    held = tmp_path / "val" / "held"
    other = cli("eval", tmp_path / "run", "--set", f"data.eval={{args: {{root: {held}}}}}")
    assert other.exit_code == 0, other.output
    assert f"on 16 samples of ImageFolder(root={held}), data.eval's" in other.output


def test_eval_scores_a_held_out_stream(cli, tmp_path):
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", data={"name": "hf_parts:TextStream"}))
    assert cli("train", recipe, "--out", tmp_path / "run").exit_code == 0
    result = cli("eval", tmp_path / "run")
    assert result.exit_code == 0 and "on the samples of the test split of" in result.output, \
        result.output


def test_validate_makes_a_held_out_batch_too(cli, write_recipe, tmp_path):
    """Held-out images of mixed sizes, cropped for training but not resized for evaluation:
    validate says so before any training (the final evaluation would fail)."""
    write_images(tmp_path / "mixed", lambda i: (8 + i, 10 + i))
    recipe = folder_recipe(tmp_path / "x", eval={"args": {"root": str(tmp_path / "mixed")}})
    recipe["data"].pop("resize")
    recipe["data"]["transforms"] = [{"RandomResizedCrop": {"size": 8}}]
    result = cli("validate", write_recipe(recipe))
    assert result.exit_code == 2, result.output
    assert "held-out samples" in result.output and "data.eval_transforms" in result.output
