"""Datasets by name: embedded digits, generated tasks, torchvision classes and import paths."""

from __future__ import annotations

import gzip
import inspect
from collections.abc import Callable
from importlib import resources
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset

from mbp_cli.errors import REFUSALS, UsageError, users_code


class TensorPairs(Dataset):
    """(input, target) pairs held as two tensors; fetches a whole micro-batch in one indexing."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        # The DataLoader calls this with a micro-batch's indices; one gather beats N lookups.
        index = torch.as_tensor(indices)
        return self.inputs[index], self.targets[index]


def digits(*, train: bool = True) -> TensorPairs:
    """The 1,797 UCI 8×8 handwritten digits, embedded; fixed stratified split 1,438 / 359."""
    split = "train" if train else "test"
    with resources.files("mbp_cli").joinpath("embedded/digits.csv.gz").open("rb") as raw:
        lines = gzip.decompress(raw.read()).decode().splitlines()
    rows = [line.split(",") for line in lines if line.startswith(split + ",")]
    targets = torch.tensor([int(row[1]) for row in rows])
    pixels = torch.tensor([[int(v) for v in row[2:]] for row in rows], dtype=torch.float32)
    return TensorPairs((pixels / 16.0).reshape(-1, 1, 8, 8), targets)


def synthetic(*, train: bool = True, num_samples: int = 2048, num_classes: int = 10,
              shape: tuple[int, ...] | list[int] = (1, 8, 8), noise: float = 1.0,
              seed: int = 0) -> TensorPairs:
    """A learnable classification task: noisy copies of one random prototype per class."""
    prototypes = torch.randn(num_classes, *shape, generator=torch.Generator().manual_seed(seed))
    draw = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
    targets = torch.randint(num_classes, (num_samples,), generator=draw)
    inputs = prototypes[targets] + noise * torch.randn(num_samples, *shape, generator=draw)
    return TensorPairs(inputs, targets)


def synthetic_tokens(*, train: bool = True, num_samples: int = 1024, vocab_size: int = 32,
                     min_len: int = 4, max_len: int = 24, ignore_index: int = -100,
                     seed: int = 0) -> TensorPairs:
    """Variable-length sequences of a hidden affine rule, padded; padding targets are ignored.

    Token 0 is padding. Each sequence follows next = (a·prev + b) mod (vocab−1) + 1 from a
    random start, so the number of loss items differs from sample to sample.
    """
    if not 2 <= min_len <= max_len:
        raise UsageError("synthetic_tokens: need 2 <= min_len <= max_len, "
                         f"got {min_len} and {max_len}")
    draw = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
    lengths = torch.randint(min_len, max_len + 1, (num_samples,), generator=draw)
    tokens = torch.zeros(num_samples, max_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(1, vocab_size, (num_samples,), generator=draw)
    for t in range(1, max_len + 1):
        tokens[:, t] = (5 * tokens[:, t - 1] + 3) % (vocab_size - 1) + 1
    position = torch.arange(max_len + 1)
    tokens[position >= lengths[:, None]] = 0
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    targets[position[1:] >= lengths[:, None]] = ignore_index
    return TensorPairs(inputs, targets)


BUILTIN_DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits, "synthetic": synthetic, "synthetic_tokens": synthetic_tokens,
}
# Arguments mbp passes itself, so a recipe does not give them.
INJECTED_DATASET_ARGS = ("train", "split", "transform")


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transform_steps(specs: list[Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """`[RandomHorizontalFlip, {RandomResizedCrop: {size: 224}}]` as (name, args) pairs."""
    steps = []
    for spec in specs or []:
        if isinstance(spec, str):
            steps.append((spec, {}))
        elif isinstance(spec, dict) and len(spec) == 1:
            name, args = next(iter(spec.items()))
            steps.append((str(name), args if isinstance(args, dict) else {}))
        else:
            raise UsageError(f"a transform is a name or {{Name: {{args}}}}, got {spec!r}")
    return steps


def make_transform(name: str, args: dict[str, Any]) -> Any:
    """One torchvision transforms.v2 step; `dtype: float32` names a torch dtype."""
    from torchvision.transforms import v2

    if isinstance(args.get("dtype"), str) and isinstance(getattr(torch, args["dtype"], None),
                                                         torch.dtype):
        args = {**args, "dtype": getattr(torch, args["dtype"])}
    try:
        return getattr(v2, name)(**args)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name} refuses {args}: {exc}") from exc


def image_transform(steps: list[Any] | None, *, resize: int | None,
                    normalize: str | None) -> Callable[[Any], Tensor]:
    """PIL images (or tensors) to float tensors: resized to a square side when asked, then the
    recipe's torchvision `transforms.v2` steps, then normalized when asked."""
    from torchvision.transforms import v2

    pipeline = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    pipeline += [v2.Resize((resize, resize))] if resize else []
    pipeline += [make_transform(name, args) for name, args in transform_steps(steps)]
    if normalize == "imagenet":
        pipeline.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(pipeline)


class ReadableDataset(Dataset):
    """A dataset whose unreadable samples (a corrupt image, a missing file) stop the run with
    a message naming the sample, not a traceback from deep inside a loader."""

    def __init__(self, dataset: Dataset, name: str, is_users: bool) -> None:
        self.dataset, self.name, self.is_users = dataset, name, is_users

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        if self.is_users:
            with users_code(f"dataset {self.name}, sample {index},"):
                return self.dataset[index]
        try:
            return self.dataset[index]
        except (OSError, ValueError) as exc:
            where = getattr(self.dataset, "samples", None)
            path = f" ({where[index][0]})" if where and index < len(where) else ""
            raise UsageError(f"dataset {self.name}: cannot read sample {index}{path}: "
                             f"{exc}") from exc


def is_stream(dataset: Any) -> bool:
    """Whether a dataset is read in order only: an IterableDataset, or nothing to index."""
    return isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")


def build_split(builder: Callable[..., Dataset], args: dict[str, Any], *, train: bool,
                transform: Callable[[Any], Any] | None, is_users: bool) -> Dataset | None:
    """One split of a dataset, or None when the builder has no notion of splits."""
    params = inspect.signature(builder).parameters
    kwargs = dict(args)
    if transform is not None and "transform" in params:
        kwargs["transform"] = transform
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        kwargs["split"] = "train" if train else "test"
    elif not train:
        return None
    name = getattr(builder, "__name__", str(builder))
    if is_users:
        with users_code(f"dataset {name}"):
            dataset = builder(**kwargs)
    else:
        try:
            dataset = builder(**kwargs)
        except (OSError, *REFUSALS) as exc:
            raise UsageError(f"dataset {name} could not be loaded: {exc}") from exc
    if isinstance(dataset, TensorPairs) or is_stream(dataset):
        return dataset  # streams are read in order (mbp_cli.data.streaming)
    return ReadableDataset(dataset, name, is_users)


def hold_out(dataset: Dataset, fraction: float, seed: int,
             eval_source: Dataset | None = None) -> tuple[Dataset, Dataset | None]:
    """Split off a seeded `fraction` of a dataset that has no test split of its own (taken
    from `eval_source`, the same data with the held-out transforms, where given)."""
    count = int(len(dataset) * fraction)
    if count == 0:
        return dataset, None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    kept, held = order[count:], order[:count]
    if isinstance(dataset, TensorPairs):
        return (TensorPairs(dataset.inputs[kept], dataset.targets[kept]),
                TensorPairs(dataset.inputs[held], dataset.targets[held]))
    return Subset(dataset, kept.tolist()), Subset(eval_source or dataset, held.tolist())
