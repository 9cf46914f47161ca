"""A trained run put to use: `mbp eval` (held-out loss and accuracy) and `mbp predict` (top-k
classes of image or tensor inputs). Weights are loaded weights-only: a file never runs code."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mbp_cli.catalog.classification import ClassificationLoss
from mbp_cli.catalog.datasets import is_stream
from mbp_cli.catalog.losses import ItemLoss, LossFn
from mbp_cli.catalog.model_loss import ModelLoss
from mbp_cli.engine.micro_step import TARGET_KEYS, pick_output, to_device
from mbp_cli.engine.setup import Setup, build, resolve_device
from mbp_cli.engine.splits import held_out_words, split_transforms
from mbp_cli.errors import UsageError, describe
from mbp_cli.recipe.load import load_recipe
from mbp_cli.recipe.registry import find_dataset
from mbp_cli.recipe.spec import Recipe, recipe_folders
from mbp_cli.run.checkpoint import FORMAT as CHECKPOINT_FORMAT
from mbp_cli.run.evaluate import evaluate
from mbp_cli.run.records import is_sound, refuse_part
from mbp_cli.tensor_files import load_tensors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class LoadedRun:
    """A run's recipe, built again, with its trained weights."""

    recipe: Recipe
    setup: Setup
    micro_batch: int
    weights: Path


def load_run(run_dir: Path, overrides: list[str], checkpoint: Path | None = None) -> LoadedRun:
    """Build the run's recipe (with `overrides`, e.g. another dataset) and load its weights:
    model.pt, or a checkpoint's model."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise UsageError(f"{run_dir} is not a run folder: it has no recipe.yaml")
    refuse_part(run_dir, "use")
    recipe = load_recipe(saved, overrides)
    weights = checkpoint or run_dir / "model.pt"
    if checkpoint is not None and not checkpoint.is_file():
        raise UsageError(f"--checkpoint {checkpoint}: no such file")
    if recipe.train.partition is not None and not weights.is_file():
        raise UsageError(f"{weights} not found: the partitioned run has not trained all its "
                         "parts, and only the composed model can be evaluated; finish it with: "
                         f"mbp train --resume {run_dir}")
    if not weights.is_file():
        raise UsageError(f"{weights} not found: the run has not finished (give --checkpoint "
                         f"{run_dir}/checkpoints/step-….pt)")
    state = _weights(weights)
    setup = build(recipe, resolve_device(recipe.train.device), with_weights=False)
    try:
        setup.model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{weights} does not fit the run's model: {str(exc)[:300]}") from exc
    return LoadedRun(recipe, setup, _micro_batch(run_dir, recipe), weights)


def _weights(path: Path) -> dict[str, Any]:
    """A state dict: model.pt as it is, or a checkpoint's model (loaded weights-only)."""
    try:
        state = load_tensors(path)
    except ValueError as exc:
        raise UsageError(f"cannot load {path}: {exc}") from exc
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds {type(state).__name__}, not a state dict")
    return state


EVAL_MICRO_BATCH = 32  # where neither the run's files nor the recipe fix one


def _micro_batch(run_dir: Path, recipe: Recipe) -> int:
    """The micro-batch the run trained with (its summary or probe), else the recipe's, else 32."""
    for name in ("summary.json", "probe.json"):
        with contextlib.suppress(OSError, ValueError):  # none, or damaged: the next source
            found = json.loads((run_dir / name).read_text(encoding="utf-8"))
            if is_sound(found) and isinstance(found.get("micro_batch"), int):
                return found["micro_batch"]
    return recipe.batch.fixed_micro or EVAL_MICRO_BATCH


def evaluate_run(run: LoadedRun) -> dict[str, Any]:
    """Held-out loss and accuracy of the run's weights, as training's evaluation computes them."""
    held_out = run.setup.eval_set
    is_streamed = held_out is not None and is_stream(held_out)
    if held_out is None or not is_streamed and len(held_out) == 0:
        raise UsageError("the run's data has no held-out split to evaluate on")
    result = evaluate(run.setup, run.micro_batch, run.recipe.train.num_workers)
    return {**result, "samples": None if is_streamed else len(held_out),
            "split": held_out_words(run.recipe), "weights": str(run.weights)}


Inputs = Tensor | dict[str, Tensor]  # one batch: positional, or keyword inputs by name


def read_inputs(run: LoadedRun, paths: list[Path]) -> list[Inputs]:
    """Each input as a batch for the model: images through the run's held-out transform (or,
    for tensor datasets, to its samples' shape in [0, 1]), tensor files as they are (one sample
    or a batch); a file holding a dict of tensors gives the model keyword inputs, as a dict
    batch does in training (its target key, where it has one, left out)."""
    sample = _first_input(run.setup)
    transform = _eval_transform(run.recipe)
    batches = []
    for path in paths:
        if not path.is_file():
            raise UsageError(f"input not found: {path}")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            inputs = _image(path, transform, sample)
        else:
            try:
                inputs = load_tensors(path)
            except ValueError as exc:
                raise UsageError(f"{path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor "
                                 f"a tensor file saved with torch.save: {exc}") from exc
            if isinstance(inputs, dict):
                inputs = _keyword_inputs(path, inputs, run.setup.micro_step.target_key)
            elif not isinstance(inputs, Tensor):
                raise UsageError(f"{path} holds {type(inputs).__name__}, not a tensor or a "
                                 "dict of tensors")
        batches.append(_as_batch(inputs, sample))
    return batches


def _keyword_inputs(path: Path, inputs: dict[Any, Any], target_key: str | None
                    ) -> dict[str, Tensor]:
    """A saved dict's tensors by name, without the target (data.target, else labels, label or
    target): the model's keyword inputs."""
    kept = _without_target(inputs, target_key)
    wrong = [f"{k!r} is {describe(v)}" for k, v in kept.items()
             if not (isinstance(k, str) and isinstance(v, Tensor))]
    if wrong or not kept:
        why = "; ".join(wrong) if wrong else "it has no inputs besides the target"
        raise UsageError(f"{path} holds a dict, but not of named tensors ({why}); save the "
                         "model's keyword inputs as {name: tensor}")
    return kept


def _without_target(sample: dict[Any, Any], target_key: str | None) -> dict[Any, Any]:
    """A dict sample or batch without its target, found as training finds it (data.target,
    else labels, label or target)."""
    keys = (target_key,) if target_key else TARGET_KEYS
    target = next((k for k in keys if k in sample), None)
    return {k: v for k, v in sample.items() if k != target}


def _as_batch(inputs: Inputs, sample: Inputs | None) -> Inputs:
    """One sample (the shape of the run's samples) as a batch of one; a batch as it is."""
    if isinstance(inputs, Tensor):
        is_one = isinstance(sample, Tensor) and inputs.shape == sample.shape
        return inputs.unsqueeze(0) if is_one else inputs
    is_one = isinstance(sample, dict) and all(
        k in sample and v.shape == sample[k].shape for k, v in inputs.items())
    return {k: v.unsqueeze(0) for k, v in inputs.items()} if is_one else inputs


def _first_input(setup: Setup) -> Inputs | None:
    """The inputs of the run's first sample: a tensor, or a dict sample's tensors by name."""
    data = setup.eval_set if setup.eval_set is not None else setup.train_set
    first = data[0]
    if isinstance(first, dict):
        inputs = _without_target(first, setup.micro_step.target_key)
        return {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
    value = first[0] if isinstance(first, tuple | list) else None
    return value if isinstance(value, Tensor) else None


def _eval_transform(recipe: Recipe) -> Any:
    data = find_dataset(recipe.data.name, recipe_folders(recipe))
    return split_transforms(recipe, data.is_torchvision)[1]


def _image(path: Path, transform: Any, sample: Inputs | None) -> Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read image {path}: {exc}") from exc
    if transform is not None:
        return transform(image.convert("RGB"))
    if not isinstance(sample, Tensor) or sample.dim() != 3:
        raise UsageError(f"{path}: the run's data are not images; give a tensor file")
    channels, height, width = sample.shape
    image = image.convert("L" if channels == 1 else "RGB").resize((width, height))
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])(image)


def _shapes(inputs: Inputs) -> str:
    """(3, 8, 8), or {input_ids: (2, 9), attention_mask: (2, 9)}, for messages."""
    if isinstance(inputs, Tensor):
        return str(tuple(inputs.shape))
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items()) + "}"


def _classes(dataset: Any) -> list[str] | None:
    """The class names a dataset (or one it wraps: a held-out subset, mbp's reader) has."""
    while dataset is not None:
        names = getattr(dataset, "classes", None)
        if names:
            return list(names)
        dataset = getattr(dataset, "dataset", None)
    return None


def is_scores(output: Tensor, loss_fn: LossFn) -> bool:
    """Whether an output is (N, classes) scores: two classes or more, from a run trained with a
    classification loss (or one of your own, or a classifier's own); a regression's (N, 1) or
    a multi-label output is not."""
    is_classes = isinstance(loss_fn, ClassificationLoss | ItemLoss) or \
        isinstance(loss_fn, ModelLoss) and loss_fn.items == "samples"  # a sequence classifier
    return output.dim() == 2 and output.shape[1] > 1 and is_classes


def predict(run: LoadedRun, inputs: list[Inputs], top: int) -> list[dict[str, Any]]:
    """Each input's top-k classes with probabilities (softmax of the scores), or, where the
    output is not (N, classes) scores, the raw output. A dict gives keyword inputs."""
    setup = run.setup
    classes = _classes(setup.eval_set) or _classes(setup.train_set)
    setup.model.eval()
    answers = []
    with torch.no_grad():
        for given in inputs:
            device, dtype = setup.device, setup.micro_step.dtype
            try:
                if isinstance(given, dict):
                    raw = setup.model(**{k: to_device(v, device, dtype) for k, v in given.items()})
                else:
                    raw = setup.model(to_device(given, device, dtype))
                output = pick_output(raw, run.recipe.model.output).float().cpu()
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                sample = _first_input(setup)
                expected = f" (a sample of the run's data is {_shapes(sample)})" \
                    if sample is not None else ""
                raise UsageError(f"the model cannot take an input of shape {_shapes(given)}"
                                 f"{expected}: {str(exc).splitlines()[0][:200]}") from exc
            if not is_scores(output, setup.loss_fn):
                answers.append({"output": output})
                continue
            probabilities = output.softmax(dim=1)
            k = min(top, probabilities.shape[1])
            values, indices = probabilities.topk(k, dim=1)
            # A row with a NaN or infinite score has no probabilities: None, not NaN percents
            answers.append({"top": [[{"class": int(i), "name": classes[i] if classes else None,
                                      "probability": float(p)}
                                     for p, i in zip(row_p, row_i, strict=True)]
                                    if is_finite else None for row_p, row_i, is_finite
                                    in zip(values, indices, output.isfinite().all(dim=1),
                                           strict=True)]})
    return answers
