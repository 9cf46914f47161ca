"""Hugging Face models the Hugging Face way, through the real `mbp train` and `mbp validate`:
labels among the inputs and the model's own loss (`loss: model`, the default where the model
takes labels). One SGD step on an uneven split equals the step of the model's own full-batch
`.loss`, computed here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import default_collate

from mbp_cli.data.batching import epoch_target_batches
from tests import hf_parts

HF_PARTS = Path(hf_parts.__file__)
TARGET, MICRO, LR = 13, 4, 0.5  # 4 + 4 + 4 + 1


def hf_recipe(model: str, loss: dict | None = None, data: dict | None = None, **train) -> dict:
    recipe = {"name": "hf", "seed": 0, "model": {"name": f"hf_parts:{model}"},
              "data": data or {"name": "hf_parts:Texts"},
              "batch": {"target": TARGET, "micro": MICRO},
              "optim": {"name": "SGD", "args": {"lr": LR}},
              "train": {"steps": 1, "eval_every": 0, "device": "cpu", "dtype": "float64",
                        **train}}
    if loss is not None:
        recipe["loss"] = loss
    return recipe


def write_beside(folder: Path, recipe: dict) -> Path:
    """The recipe with the user's module beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HF_PARTS, folder / "hf_parts.py")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def own_full_batch_step(model_name: str, data: dict | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first target batch in one piece through the model with its labels, its own `.loss`
    (or `loss` key) backpropagated: (parameters before, gradients), each one flat vector."""
    torch.manual_seed(0)
    model = getattr(hf_parts, model_name)().double()
    names = [name for name, _ in model.named_parameters()]
    dataset = hf_parts.Texts(train=True, **(data or {}).get("args", {}))
    indices = epoch_target_batches(len(dataset), TARGET, seed=0, epoch=0, drop_last=False)[0]
    output = model(**default_collate([dataset[i] for i in indices]))
    loss = output["loss"] if isinstance(output, dict) else output.loss
    loss.backward()
    parameters = dict(model.named_parameters())
    return names, torch.cat([parameters[n].detach().flatten() for n in names]), torch.cat(
        [torch.zeros_like(parameters[n]).flatten() if parameters[n].grad is None
         else parameters[n].grad.flatten() for n in names])


def assert_equal_to_own_step(run: Path, model: str, tolerance: float,
                             data: dict | None = None) -> None:
    """The update the run made against the full batch's, as one vector (BERT's zero-initialized
    key biases get no gradient: alone, their relative error would be noise over nothing)."""
    saved = torch.load(run / "model.pt", weights_only=True)
    names, before, gradient = own_full_batch_step(model, data)
    update = torch.cat([saved[name].flatten() for name in names]) - before
    error = float((update + LR * gradient).norm() / (LR * gradient).norm())
    assert error <= tolerance, error


CASES = {  # model, loss section, data section, tolerance (HF computes its loss in float32)
    "GPT-2, HF labels, loss: model": ("gpt2", {"name": "model"}, None, 1e-5),
    "Llama, HF labels, the default loss": ("llama", None, None, 1e-5),
    "BERT sequence classification, loss: model": (
        "bert_classifier", {"name": "model"}, {"name": "hf_parts:Texts", "args": {"classes": 3}},
        1e-5),
    "BERT multi-label classification (float labels), the default loss": (
        "bert_classifier", None,
        {"name": "hf_parts:Texts", "args": {"classes": 3, "multi_label": True}}, 1e-5),
    "BERT token classification, as many tags as positions, cross_entropy": (
        "bert_tagger", {"name": "cross_entropy"}, {"name": "hf_parts:Texts", "args": {
            "tags": True}}, 1e-5),
    # a model of one's own in float64: the normalization itself, isolated
    "own model's mean loss, items: next_tokens": (
        "mean_loss_lm", {"name": "model", "args": {"items": "next_tokens"}}, None, 1e-10),
}


@pytest.mark.parametrize("case", CASES)
def test_the_models_own_loss_equals_its_full_batch_step(cli, tmp_path, case):
    model, loss, data, tolerance = CASES[case]
    recipe = write_beside(tmp_path / "project", hf_recipe(model, loss, data))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert_equal_to_own_step(tmp_path / "run", model, tolerance, data)


def test_checkpointing_a_causal_lm_trains_the_same_step(cli, tmp_path):
    """Its KV cache would be refilled on the recompute: training runs without it."""
    recipe = write_beside(tmp_path / "project", {**hf_recipe("gpt2", {"name": "model"}),
                                                 "memory": {"checkpointing": "on"}})
    assert cli("validate", recipe).exit_code == 0
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert_equal_to_own_step(tmp_path / "run", "gpt2", 1e-5)


@pytest.mark.parametrize("command", ["train", "validate"])
def test_cross_entropy_on_causal_lm_labels_is_refused_as_a_copy_task(cli, tmp_path, command):
    recipe = write_beside(tmp_path / "project", hf_recipe("gpt2", {"name": "cross_entropy"}))
    args = ("--out", tmp_path / "run") if command == "train" else ()
    result = cli(command, recipe, *args)
    assert result.exit_code == 2
    assert "copy" in result.output and "loss: model" in result.output
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_mean_loss_over_unknown_items_is_refused(cli, tmp_path):
    recipe = write_beside(tmp_path / "project", hf_recipe("mean_loss_lm", {"name": "model"}))
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "loss.args.items" in result.output, result.output


def test_items_that_are_not_what_the_model_averages_are_refused(cli, tmp_path):
    """Checked on the first micro-batch, declared or not: GPT-2's mean is over next tokens, and
    the refusal names them; a mean with an auxiliary term is no such mean at all."""
    recipe = write_beside(tmp_path / "gpt2", hf_recipe(
        "gpt2", {"name": "model", "args": {"items": "tokens"}}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "loss.args.items: next_tokens" in result.output
    recipe = write_beside(tmp_path / "other", hf_recipe("bert_classifier", {"name": "model"}))
    result = cli("validate", recipe)  # causal-LM labels for a classifier: the scores do not fit
    assert result.exit_code == 2, result.output
    aux = {"name": "model", "args": {"items": "next_tokens"}}
    recipe = write_beside(tmp_path / "aux", hf_recipe("aux_loss_lm", aux))
    result = cli("train", recipe, "--out", tmp_path / "aux-run")
    assert result.exit_code == 2 and "auxiliary term" in result.output, result.output


def test_the_check_can_be_turned_off_and_then_a_wrong_count_shows(cli, tmp_path):
    """loss.args.check: false takes the user's word; the comparison with the model's own step
    sees that counting every token of GPT-2 is not exact (the comparison can fail)."""
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", {"name": "model", "args": {"items": "tokens", "check": False}}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    with pytest.raises(AssertionError):
        assert_equal_to_own_step(tmp_path / "run", "gpt2", 1e-3)


def trained_gpt2_on(run: Path, batch: dict[str, torch.Tensor]):
    """The run's GPT-2 (model.pt), in eval mode, on one batch: its output, loss included."""
    model = hf_parts.gpt2().double()
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        return model(**batch)


def test_eval_reports_the_models_loss_and_next_token_accuracy(cli, tmp_path):
    recipe = write_beside(tmp_path / "project", hf_recipe("gpt2", eval_every=1))
    result = cli("train", recipe, "--out", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    summary = yaml.safe_load(result.stdout.splitlines()[-1])
    held_out = default_collate([hf_parts.Texts(train=False)[i] for i in range(37)])
    output = trained_gpt2_on(tmp_path / "run", held_out)
    assert summary["eval_loss"] == pytest.approx(float(output.loss), rel=1e-6)
    predicted, labels = output.logits[:, :-1].argmax(-1), held_out["labels"][:, 1:]
    counted = labels != -100
    expected = float(((predicted == labels) & counted).sum()) / float(counted.sum())
    assert summary["eval_accuracy"] == pytest.approx(expected, abs=1e-12)


def test_a_datasets_table_trains_like_the_same_texts(cli, tmp_path):
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", data={"name": "hf_parts:texts_table"}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert_equal_to_own_step(tmp_path / "run", "gpt2", 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt2", "bert_classifier"])
def test_the_models_own_loss_over_two_ranks_equals_its_full_batch_step(tmp_path, model):
    """Uneven shares and micro-batches: each rank's sums, one global count."""
    from test_distributed import mbp

    data = {"name": "hf_parts:Texts", "args": {"classes": 3}} if model != "gpt2" else None
    recipe = write_beside(tmp_path, hf_recipe(model, {"name": "model"}, data))
    run = mbp("train", recipe, "--out", "run", "--nproc", 2, "--set", "batch.shares=[3, 1]",
              "--set", "batch.micro=[4, 2]", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert_equal_to_own_step(tmp_path / "run", model, 1e-5, data)


def readme_block(marker: str) -> str:
    """The fenced block after `<!-- marker -->` in the README."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->\n", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_the_readme_example_trains_as_it_is(cli, tmp_path):
    (tmp_path / "hf_lm.py").write_text(readme_block("hf_lm.py"))
    recipe = tmp_path / "hf-lm.yaml"
    recipe.write_text(readme_block("hf-lm.yaml"))
    checked = cli("validate", recipe)
    assert checked.exit_code == 0 and "the model's own, a mean over next_tokens" in checked.output
    result = cli("train", recipe, "--out", tmp_path / "run", "--set", "train.steps=2",
                 "--set", "batch.target=16", "--json")
    assert result.exit_code == 0, result.output
    summary = yaml.safe_load(result.stdout.splitlines()[-1])
    assert summary["strategies"].endswith("checkpointing") and summary["eval_accuracy"] > 0


def test_a_sequence_classifier_predicts_its_top_classes(cli, tmp_path):
    data = {"name": "hf_parts:Texts", "args": {"classes": 3}}
    recipe = write_beside(tmp_path / "project", hf_recipe("bert_classifier", None, data))
    assert cli("train", recipe, "--out", tmp_path / "run").exit_code == 0
    sample = hf_parts.Texts(train=False, classes=3)[0]
    torch.save({k: v for k, v in sample.items() if k != "labels"}, tmp_path / "text.pt")
    result = cli("predict", tmp_path / "run", tmp_path / "text.pt", "--top", 2, "--json")
    assert result.exit_code == 0, result.output
    assert len(yaml.safe_load(result.stdout)[0]["top"][0]) == 2  # one sample, its top 2


def test_items_without_the_models_loss_named_say_so(cli, tmp_path):
    recipe = write_beside(tmp_path / "project", hf_recipe(
        "gpt2", {"args": {"items": "next_tokens"}}))
    result = cli("validate", recipe)
    assert result.exit_code == 2 and "loss.name: model" in result.output, result.output


def test_mbp_imports_neither_transformers_nor_datasets_unless_a_recipe_does(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from mbp_cli.cli import app; "
            "result = CliRunner().invoke(app, ['train', 'digits', '--set', 'train.steps=1', "
            f"'--out', r'{tmp_path / 'run'}', '-q']); assert result.exit_code == 0, "
            "result.output; print(sorted({'transformers', 'datasets'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
