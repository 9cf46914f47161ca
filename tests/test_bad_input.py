"""Whatever a user gives, mbp answers with a message and an exit code, never a traceback."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import small_recipe

VALID = small_recipe(train={"steps": 1, "eval_every": 0, "device": "cpu"})
KEY_PATHS = [(section, key) for section, body in VALID.items() if isinstance(body, dict)
             for key in body] + [(section, None) for section in VALID]
WRONG_VALUES = st.one_of(
    st.text(max_size=8).filter(lambda s: s not in ("auto",)), st.lists(st.integers(), max_size=3),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer()),
    st.booleans(), st.none(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
# Out-of-range values for each numeric key: huge, negative, zero where zero is refused, NaN.
EXTREME_NUMBERS = {
    ("batch", "target"): [0, -1, -(10**12), 1e308, float("nan")],
    ("batch", "micro"): [0, -1, 10**30, 1e308, float("nan")],
    ("train", "steps"): [0, -1, 10**30 + 0.5, float("nan")],
    ("train", "eval_every"): [-1, -(10**12), 1e308, float("inf")],
    ("train", "keep_checkpoints"): [0, -1, 1e308],
    ("seed", None): [-1, 10**30, 1e308, float("nan")],
    ("batch", "memory_fraction"): [0, -1, 10**30, float("nan")],
    ("data", "eval_fraction"): [-1, 10**30, 1e308, float("nan")],
}


@st.composite
def broken_recipe_text(draw) -> str:
    """Valid YAML for an invalid recipe, or text that is not valid YAML at all."""
    kind = draw(st.sampled_from(["wrong type", "unknown key", "missing section",
                                 "extreme number", "not a mapping", "invalid yaml"]))
    recipe = copy.deepcopy(VALID)
    if kind == "wrong type":
        section, key = draw(st.sampled_from([kp for kp in KEY_PATHS if kp[1] is not None
                                             and kp[1] not in ("args",)]))
        recipe[section][key] = draw(WRONG_VALUES)
    elif kind == "unknown key":
        section = draw(st.sampled_from(list(VALID)))
        key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
        target = recipe if not isinstance(recipe[section], dict) else recipe[section]
        if key in target:
            key += "_x"
        target[key] = 1
    elif kind == "missing section":
        del recipe[draw(st.sampled_from(["model", "data", "batch", "optim"]))]
    elif kind == "extreme number":
        section, key = draw(st.sampled_from(list(EXTREME_NUMBERS)))
        value = draw(st.sampled_from(EXTREME_NUMBERS[section, key]))
        if key is None:
            recipe[section] = value
        else:
            recipe[section][key] = value
    elif kind == "not a mapping":
        return yaml.safe_dump(draw(st.one_of(st.lists(st.integers(), min_size=1),
                                             st.integers(), st.text(min_size=1))))
    else:
        return draw(st.sampled_from(["model: {name: [unclosed\n", "a: b: c\n", "\tx: 1\n",
                                     "batch: {target: 1\n", "- [\n", "{{{"]))
    return yaml.safe_dump(recipe)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(text=broken_recipe_text(), command=st.sampled_from(["train", "probe"]))
def test_broken_recipes_exit_2_with_a_message(cli, tmp_path, text, command):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # one per example
    path = folder / "broken.yaml"
    path.write_text(text)
    result = cli(command, path, "--out", folder / "run") if command == "train" else cli(
        command, path, "--budget", "64MiB")
    assert result.exit_code == 2, (text, result.output)
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert not (folder / "run").exists()  # refused before anything was written


def test_a_missing_dataset_root_without_download(cli, write_recipe, tmp_path):
    data = {"name": "MNIST", "args": {"root": str(tmp_path / "nowhere")}}
    result = cli("train", write_recipe(small_recipe(data=data)), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "dataset MNIST could not be loaded: Dataset not found" in result.stderr
    assert "download=True" in result.stderr


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named(cli, write_recipe, tmp_path, workers):
    folder = tmp_path / "images" / "cats"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), "white").save(folder / f"{i}.png")
    (folder / "4.png").write_bytes(b"this is not a png")
    recipe = small_recipe(model={"name": "small_cnn", "args": {"in_channels": 3,
                                                                "num_classes": 2}},
                          data={"name": "ImageFolder", "args": {"root": str(tmp_path / "images")},
                                "eval_fraction": 0.0},
                          batch={"target": 5, "micro": 5},
                          train={"steps": 1, "num_workers": workers, "device": "cpu"})
    result = cli("train", write_recipe(recipe), "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "error: dataset ImageFolder: cannot read sample 4" in result.stderr
    assert "4.png" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(("section", "name", "message"), [
    ("model", "resnet19", "model.name: unknown model 'resnet19'; did you mean resnet18?"),
    ("data", "digit", "data.name: unknown dataset 'digit'; did you mean digits?"),
    ("optim", "adamw", "optim.name: unknown optimizer 'adamw'; did you mean AdamW?"),
    ("loss", "cross_entropie", "loss.name: unknown loss 'cross_entropie'; "
                               "did you mean cross_entropy?"),
    ("model", "nomodule:thing", "model.name: cannot import 'nomodule'"),
])
def test_unknown_names_suggest_the_nearest(cli, write_recipe, tmp_path, section, name, message):
    result = cli("train", write_recipe(small_recipe()), "--set", f"{section}.name={name}",
                 "--out", tmp_path / "run")
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize(("optimizer", "setting", "message"), [
    ("SGD", "optim.args.lr=-1", "optim.args.lr=-1: SGD refuses it (Invalid learning rate: -1)"),
    ("AdamW", "optim.args.betas=[2, 0.9]", "optim.args.betas=[2, 0.9]: AdamW refuses it "
                                           "(Invalid beta parameter at index 0: 2)"),
])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_an_optimizer_argument_torch_refuses_is_named_with_its_value(
        cli, write_recipe, tmp_path, optimizer, setting, message, command):
    recipe = write_recipe(small_recipe(optim={"name": optimizer, "args": {"lr": 0.01}}))
    out = ["--out", tmp_path / "run"] if command == "train" else []
    result = cli(command, recipe, "--set", setting, *out)
    assert result.exit_code == 2
    assert result.stderr == f"error: {message}\n"
    together = cli(command, recipe, "--set", "optim.name=SGD", "--set", "optim.args.nesterov=true",
                   "--set", "optim.args.momentum=0.9", "--set", "optim.args.dampening=0.5", *out)
    assert together.exit_code == 2  # refused together: all are named
    assert together.stderr.startswith("error: optim.args {'lr': 0.01, 'nesterov': True, "
                                      "'momentum': 0.9, 'dampening': 0.5}: SGD refused them: ")
    assert not (tmp_path / "run").exists()


OUTPUTS = ["tensor", "string", "dict without scores", "one score", "list"]
SAMPLES = ["ok", "string target", "not tensors", "wrong shape", "one element", "float target",
           "dict without target", "class out of range"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(returns=st.sampled_from(OUTPUTS), kind=st.sampled_from(SAMPLES),
       loss=st.sampled_from(["cross_entropy", "nll", "mse", "mistakes:mean_loss"]),
       command=st.sampled_from(["train", "validate"]))
def test_wrong_outputs_batches_and_samples_never_show_a_traceback(cli, tmp_path, returns, kind,
                                                                  loss, command):
    from tests.test_byo_errors import mistake_recipe

    if returns == "tensor" and kind == "ok" and loss != "mistakes:mean_loss":
        return  # nothing wrong: trained elsewhere
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    recipe = mistake_recipe(folder, {"returns": returns}, {"kind": kind}, loss)
    extra = ["--out", folder / "run"] if command == "train" else []
    result = cli(command, recipe, *extra)
    if result.exit_code == 0:  # mse broadcasts some shapes as torch does; then it trained
        assert loss == "mse", (returns, kind, result.output)
        return
    assert result.exit_code == 2, (returns, kind, loss, result.output)
    assert "\nerror: " in "\n" + result.stderr and "Traceback" not in result.output
    assert not (folder / "run").exists()
