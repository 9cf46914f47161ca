"""Torchvision models with pretrained weights: the weights checked by name, downloaded or taken
from torch's cache, and the classifier head replaced for another number of classes."""

from __future__ import annotations

from typing import Any
from urllib.error import URLError

import torch
from torch import nn

from mbp_cli.errors import UsageError, suggest


def weights_enum(model_name: str) -> Any:
    """The torchvision weights enum of a model (ResNet18_Weights for resnet18)."""
    import torchvision.models

    return torchvision.models.get_model_weights(model_name)


def find_weights(model_name: str, value: str) -> Any:
    """The weights named `value` (DEFAULT, IMAGENET1K_V1 or ResNet18_Weights.IMAGENET1K_V1)."""
    enum = weights_enum(model_name)
    names = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
    short = value.split(".", 1)[1] if value.startswith(enum.__name__ + ".") else value
    if short not in names:
        raise UsageError(f"{model_name} has no weights {value!r}" + suggest(short, names)
                         + f" (choose from {', '.join(names)})")
    return enum[short]


def find_head(model: nn.Module, classes: int, path: str | None) -> str:
    """The path of the classifier to replace: `path` (model.head), else the last Linear layer
    with `classes` outputs (fc in ResNets, heads.head in ViTs, classifier.N elsewhere)."""
    if path is not None:
        try:
            layer = model.get_submodule(path)
        except AttributeError as exc:
            raise UsageError(f"model.head: the model has no module {path!r}") from exc
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"model.head: {path} is a {type(layer).__name__}, not a Linear layer")
        return path
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == classes]
    if not found:
        raise UsageError(f"model.args.num_classes: no Linear layer with {classes} outputs to "
                         "replace; name the classifier with model.head")
    return found[-1]


def replace_head(model: nn.Module, path: str, num_classes: int) -> None:
    """Put a new Linear layer of `num_classes` outputs (freshly initialized) at `path`."""
    old = model.get_submodule(path)
    parent_path, _, attr = path.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    setattr(model.get_submodule(parent_path), attr, new)


def build_pretrained(model_name: str, args: dict[str, Any], head: str | None, *,
                     load: bool = True) -> nn.Module:
    """A torchvision model with `args["weights"]` loaded; `num_classes` replaces its head.
    Without `load`, the same model with fresh weights (for a run's model.pt to fill; nothing
    downloaded)."""
    import torchvision.models

    args = dict(args)
    weights = find_weights(model_name, args.pop("weights"))
    num_classes = args.pop("num_classes", None)
    classes = len(weights.meta["categories"])
    try:
        model = torchvision.models.get_model(model_name, **(
            {"weights": weights} if load else {"num_classes": classes}), **args)
    except (URLError, OSError, RuntimeError) as exc:
        cache = f"{torch.hub.get_dir()}/checkpoints"
        file = weights.url.rsplit("/", 1)[-1]
        raise UsageError(f"cannot get the weights {weights} for {model_name} ({exc}); torch "
                         f"caches them in {cache}: put {file} there, or drop model.args.weights"
                         ) from exc
    if num_classes is not None and num_classes != classes:
        replace_head(model, find_head(model, classes, head), num_classes)
    return model


def pretrained_problems(model_name: str, args: dict[str, Any], head: str | None) -> list[str]:
    """What is wrong with `weights` (and num_classes, model.head) before anything downloads:
    the weights' name, and a head to replace, found on a model built on the meta device."""
    import torchvision.models

    try:
        weights = find_weights(model_name, str(args["weights"]))
    except (UsageError, ValueError) as exc:
        return [f"model.args.weights: {exc}"]
    rest = {k: v for k, v in args.items() if k not in ("weights", "num_classes")}
    classes = len(weights.meta["categories"])
    try:
        with torch.device("meta"):
            model = torchvision.models.get_model(model_name, num_classes=classes, **rest)
        if args.get("num_classes", classes) != classes:
            find_head(model, classes, head)
    except UsageError as exc:
        return [str(exc)]
    except (TypeError, ValueError, AssertionError) as exc:
        return [f"model.args: {model_name} refuses these arguments: {exc}"]
    return []


def weights_transforms(model_name: str, args: dict[str, Any]) -> Any | None:
    """The preprocessing the weights were trained with, or None without weights."""
    if not isinstance(args.get("weights"), str):
        return None
    return find_weights(model_name, args["weights"]).transforms()
