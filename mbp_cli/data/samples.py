"""Batches of a dataset's first samples (a stream's read once), as the probe, validate and the
checks before training make them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from mbp_cli.catalog.datasets import TensorPairs, is_stream
from mbp_cli.data.batching import Collate, collate_samples
from mbp_cli.data.streaming import first_samples
from mbp_cli.errors import UsageError

BatchMaker = Callable[[int], Any]


def batch_maker(dataset: Dataset, collate: Collate | None = None) -> BatchMaker:
    """Real micro-batches of any size from the start of a dataset (wrapping round if short);
    a stream's first samples, read once."""
    if is_stream(dataset):
        read: list[Any] = []

        def make_streamed(size: int) -> Any:
            if len(read) < size:
                read[:] = first_samples(dataset, size)
            if not read:
                raise UsageError("the training stream yields no samples")
            return collate_samples(collate)([read[i % len(read)] for i in range(size)])

        return make_streamed

    def make(size: int) -> Any:
        return batch_of(dataset, [i % len(dataset) for i in range(size)], collate)

    return make


def batch_of(dataset: Dataset, indices: list[int], collate: Collate | None = None) -> Any:
    """These samples of a dataset as one batch (tensors in memory: one gather)."""
    if isinstance(dataset, TensorPairs):
        return dataset.__getitems__(indices)
    return collate_samples(collate)([dataset[i] for i in indices])
