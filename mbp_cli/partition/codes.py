"""Synthetic intermediate labels: one fixed random code per class at each cut, and the
datasets each part trains on (inputs → code, code + noise → next code, code + noise → class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from mbp_cli.catalog.datasets import ReadableDataset, TensorPairs
from mbp_cli.engine.micro_step import TARGET_KEYS, split_batch
from mbp_cli.errors import UsageError, describe


def make_codes(kind: str, shapes: Sequence[torch.Size], num_classes: int,
               seed: int) -> list[Tensor]:
    """One code per class for each cut, shaped like the activation there (float32): standard
    normal (gaussian) or uniform in [0, 1) (for a cut after a ReLU), fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn if kind == "gaussian" else torch.rand
    return [draw(num_classes, *shape, generator=generator) for shape in shapes]


def class_labels(dataset: Dataset, target_key: str | None = None) -> Tensor:
    """Each sample's class index, read without the inputs where the dataset keeps them apart
    (torchvision's `targets`, tensors), else sample by sample."""
    while isinstance(dataset, ReadableDataset):
        dataset = dataset.dataset
    if isinstance(dataset, TensorPairs):
        labels = dataset.targets
    elif isinstance(dataset, TensorDataset):
        labels = dataset.tensors[-1]
    elif isinstance(dataset, Subset):
        labels = class_labels(dataset.dataset, target_key)[torch.as_tensor(dataset.indices,
                                                                           dtype=torch.long)]
    elif isinstance(getattr(dataset, "targets", None), Sequence | Tensor) \
            and len(dataset.targets) == len(dataset):
        labels = torch.as_tensor(dataset.targets)
    else:
        labels = torch.stack([torch.as_tensor(split_batch(dataset[i], target_key)[2])
                              for i in range(len(dataset))]) if len(dataset) else torch.zeros(0)
    return check_class_indices(labels)


def check_class_indices(labels: Tensor) -> Tensor:
    """The targets as class indices (one per sample, none below 0), or a one-line refusal."""
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise UsageError("train.partition gives each class a code, so each sample's target must "
                         f"be one class index; the targets are {describe(labels)}")
    if len(labels) and labels.min() < 0:
        raise UsageError(f"train.partition gives each class a code, but some targets are "
                         f"{int(labels.min())} (ignored items?), which name no class")
    return labels.long()


def with_target(sample: Any, target: Tensor, target_key: str | None) -> Any:
    """The sample with its target replaced."""
    if isinstance(sample, Mapping):
        key = next(k for k in ((target_key,) if target_key else TARGET_KEYS) if k in sample)
        return {**sample, key: target}
    return (*sample[:-1], target)


IN_MEMORY_VALUES = 2**26  # a later part's inputs are made up front up to this many (256 MiB)


def first_part_data(dataset: Dataset, labels: Tensor, code: Tensor,
                    target_key: str | None) -> Dataset:
    """The first part's data; tensors in memory stay tensors (micro-batches by one gather)."""
    if isinstance(dataset, TensorPairs):
        return TensorPairs(dataset.inputs, code[labels])
    return CodeTargets(dataset, labels, code, target_key)


def later_part_data(labels: Tensor, code: Tensor, noise: float, seed: int,
                    next_code: Tensor | None = None) -> Dataset:
    """A later part's data (see NoisyCodes), made up front where it is small enough, else
    sample by sample; the same noise either way."""
    lazy = NoisyCodes(labels, code, noise, seed, next_code)
    if len(labels) * code[0].numel() > IN_MEMORY_VALUES:
        return lazy
    if not len(labels):
        return TensorPairs(code[:0], labels if next_code is None else next_code[:0])
    inputs, targets = zip(*(lazy[i] for i in range(len(labels))), strict=True)
    return TensorPairs(torch.stack(inputs), torch.stack(targets))


class CodeTargets(Dataset):
    """The first part's data: the samples as they are, each target replaced by its class's
    code at the first cut."""

    def __init__(self, dataset: Dataset, labels: Tensor, code: Tensor,
                 target_key: str | None) -> None:
        self.dataset, self.labels, self.code, self.target_key = dataset, labels, code, target_key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        return with_target(self.dataset[index], self.code[self.labels[index]], self.target_key)


class NoisyCodes(Dataset):
    """A later part's data, made from the labels alone: its class's code at the cut before it
    plus Gaussian noise (fixed per sample by the seed), and as the target the code at the cut
    after it, or the class itself for the last part."""

    def __init__(self, labels: Tensor, code: Tensor, noise: float, seed: int,
                 next_code: Tensor | None = None) -> None:
        self.labels, self.code, self.next_code = labels, code, next_code
        self.noise, self.seed = noise, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        label = self.labels[index]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)
        noisy = self.code[label] + self.noise * torch.randn(self.code.shape[1:],
                                                            generator=generator)
        return noisy, (label if self.next_code is None else self.next_code[label])
