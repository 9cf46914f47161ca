"""Recipes load into dataclasses, and every problem in a bad one is reported at once."""

from __future__ import annotations

import pytest

from mbp_cli.errors import RecipeError, UsageError
from mbp_cli.recipe.load import bundled_recipes, load_recipe
from mbp_cli.recipe.spec import dump_recipe
from tests.conftest import REPO, small_recipe


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return caught.value.problems


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_bundled_recipe_is_valid(path):
    recipe = load_recipe(path)  # builder arguments checked too, nothing downloaded
    assert recipe.batch.micro == "auto" or recipe.batch.micro <= recipe.batch.target


def test_bundled_recipes_are_listed_with_a_description():
    listed = {str(name): text for name, text in bundled_recipes()}
    assert {"digits", "tiny-lm", "cifar10-resnet18", "examples/tagger"} <= set(listed)
    assert all(listed.values())


def test_a_bundled_recipe_is_used_by_name(cli):
    assert load_recipe("digits").name == "digits-cnn"
    assert cli("validate", "examples/tagger").exit_code == 0
    missing = cli("validate", "digit")
    assert missing.exit_code == 2 and "did you mean digits?" in missing.output


def test_the_resolved_recipe_loads_back_unchanged(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(small_recipe()), ["optim.args.lr=0.5", "train.steps=9"])
    assert recipe.optim.args["lr"] == 0.5 and recipe.train.steps == 9
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_recipe(recipe))
    assert load_recipe(resolved) == recipe


def test_unknown_key_names_the_nearest_valid_one(write_recipe):
    path = write_recipe(small_recipe(batch={"target": 64, "mirco": 8}))
    assert problems_of(path) == ["batch.mirco: unknown key; did you mean batch.micro?",
                                 "batch.micro: missing"]


def test_every_problem_is_reported_at_once(write_recipe):
    text = """
model: {name: small_cnn, args: {num_clases: 10}}
data: digits
batch: {target: 0, micro: 8}
optim: {name: SGDD, args: {lr: fast}, clip_grad_norm: 0}
loss: [cross_entropy]
train: {steps: 3, dtype: float16, eval_every: -1}
memory: {offload_blocks: 3}
trian: {}
"""
    problems = problems_of(write_recipe(text))
    assert problems == [
        "trian: unknown key; did you mean train?",
        "batch.target: must be at least 1, got 0",
        "optim.clip_grad_norm: must be more than 0, got 0.0",  # would zero every gradient
        "loss: expected a mapping, got a list",
        "train.eval_every: must be at least 0, got -1",
        "train.dtype: 'float16' is not one of float32, float64; did you mean float64?",
        "memory.offload_blocks: counts blocks to offload, but memory.offload is off; set "
        "memory.offload: on (or auto)",
        "model.args.num_clases: small_cnn() has no argument 'num_clases'; "
        "did you mean num_classes?",
        "optim.name: unknown optimizer 'SGDD'; did you mean SGD?",
    ]


def test_pyyaml_traps_are_handled(write_recipe):
    text = """
model: {name: small_cnn}
data: {name: synthetic, args: {num_samples: 64}}
batch: {target: 16, micro: 4, drop_last: on}
optim: {name: Adam, args: {lr: 1e-3, weight_decay: 5E-4}}
train: {steps: 2}
train: {epochs: 1}
"""
    problems = problems_of(write_recipe(text))
    assert "batch.drop_last: expected true or false, got 'on' (a string)" in problems
    assert any("key 'train' appears twice" in p and "line 7" in p for p in problems)
    # `1e-3` is a number, not the string PyYAML would make of it: no complaint about lr
    assert not any("lr" in p or "weight_decay" in p for p in problems)


def test_scientific_notation_loads_as_float(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(optim={"name": "Adam", "args": {}})),
                         ["optim.args.lr=1e-3"])
    assert recipe.optim.args["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize(("text", "expected"), [
    ("", "the file is empty"),
    ("- a\n- b\n", "the top level must be a mapping of sections, got a list"),
    ("model: {name: [unclosed\n", "invalid YAML"),
])
def test_not_a_recipe_at_all(write_recipe, text, expected):
    problems = problems_of(write_recipe(text))
    assert problems[0].startswith(expected)
    assert len(problems) == 1  # not YAML: no made-up "missing section" lines after it


def test_missing_sections_and_a_bad_step_count(write_recipe):
    problems = problems_of(write_recipe("name: x\ntrain: {steps: 2, epochs: 3}\n"))
    assert problems == ["model: missing section", "data: missing section",
                        "batch: missing section", "optim: missing section",
                        "train: give exactly one of train.steps and train.epochs"]


def test_overrides_are_checked_like_the_file(write_recipe):
    path = write_recipe(small_recipe())
    problems = problems_of(path, ["batch.micro=500", "model.name=resnet81", "nonsense"])
    assert problems == [
        "--set 'nonsense': expected KEY.PATH=VALUE",
        "batch.micro: 500 is larger than batch.target 50",
        "model.name: unknown model 'resnet81'; did you mean resnet18?",
    ]


def test_shorthand_names_expand_and_take_overrides(write_recipe):
    recipe = load_recipe(write_recipe(small_recipe(loss="nll")),
                                 ["loss.args.ignore_index=3"])
    assert (recipe.loss.name, recipe.loss.args) == ("nll", {"ignore_index": 3})


def test_torchvision_model_arguments_are_checked_without_building(write_recipe):
    path = write_recipe(small_recipe(model={"name": "resnet18", "args": {"num_clases": 3}}))
    assert problems_of(path) == ["model.args.num_clases: torchvision model resnet18 has no "
                                 "argument 'num_clases'; did you mean num_classes?"]


def test_dataset_arguments_are_checked_before_any_download(write_recipe, tmp_path):
    data = {"name": "CIFAR10", "args": {"root": str(tmp_path), "downlaod": True}}
    assert problems_of(write_recipe(small_recipe(data=data))) == [
        "data.args.downlaod: torchvision dataset CIFAR10 has no argument 'downlaod'; "
        "did you mean download?"]
    assert list(tmp_path.iterdir()) == [tmp_path / "recipe.yaml"]


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UsageError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
