"""Target batches drawn by a seeded sampler, each split into micro-batches for a DataLoader."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from mbp_cli.catalog.datasets import TensorPairs, is_stream
from mbp_cli.distributed.shares import share_bounds
from mbp_cli.errors import UsageError, describe

Collate = Callable[[list[Any]], Any]


def steps_per_epoch(num_samples: int, target_batch: int, drop_last: bool) -> int:
    """Optimizer steps in one pass over `num_samples`."""
    if drop_last:
        return num_samples // target_batch
    return math.ceil(num_samples / target_batch)


def epoch_target_batches(num_samples: int, target_batch: int, seed: int, epoch: int,
                         drop_last: bool) -> list[list[int]]:
    """The target batches of one epoch: a seeded permutation cut into pieces of `target_batch`.

    The last piece is smaller unless `drop_last`; it is normalized by its own counts.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    count = steps_per_epoch(num_samples, target_batch, drop_last)
    return [order[i * target_batch:(i + 1) * target_batch] for i in range(count)]


def split_micro(indices: list[int], micro_batch: int) -> list[list[int]]:
    """Cut one target batch into micro-batches; the last may be smaller."""
    return [indices[i:i + micro_batch] for i in range(0, len(indices), micro_batch)]


class MicroBatchPlan(torch.utils.data.Sampler):
    """Yields the micro-batch index lists of steps `start_step` … `stop_step - 1`, in order.

    With several ranks, each streams its own share of every target batch (`shares`: samples
    per rank of a full target batch); the target batches are the ones a single process draws.
    """

    def __init__(self, num_samples: int, target_batch: int, micro_batch: int, seed: int,
                 drop_last: bool, start_step: int, stop_step: int,
                 shares: Sequence[int] = (), rank: int = 0) -> None:
        self.num_samples, self.target_batch = num_samples, target_batch
        self.micro_batch = micro_batch
        self.seed, self.drop_last = seed, drop_last
        self.start_step, self.stop_step = start_step, stop_step
        self.shares, self.rank = shares, rank
        self.steps_per_epoch = steps_per_epoch(num_samples, target_batch, drop_last)

    def _own_share(self, indices: list[int]) -> list[int]:
        if not self.shares:
            return indices
        start, stop = share_bounds(len(indices), self.shares, self.rank)
        return indices[start:stop]

    def share_at(self, step: int) -> int:
        """How many samples of step `step`'s target batch this rank streams."""
        position = step % self.steps_per_epoch
        size = min(self.target_batch, self.num_samples - position * self.target_batch)
        if not self.shares:
            return size
        start, stop = share_bounds(size, self.shares, self.rank)
        return stop - start

    def target_batch_at(self, step: int) -> list[int]:
        """Sample indices of the target batch that optimizer step `step` (0-based) trains on."""
        epoch, position = divmod(step, self.steps_per_epoch)
        batches = epoch_target_batches(self.num_samples, self.target_batch, self.seed, epoch,
                                       self.drop_last)
        return batches[position]

    def micro_batches_per_step(self, step: int) -> int:
        """How many micro-batches step `step` streams."""
        return accumulation_steps(self.share_at(step), self.micro_batch)

    def _target_batches(self) -> Iterator[list[int]]:
        epoch, batches = None, []
        for step in range(self.start_step, self.stop_step):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch = step_epoch
                batches = epoch_target_batches(self.num_samples, self.target_batch, self.seed,
                                               epoch, self.drop_last)
            yield self._own_share(batches[position])

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self._target_batches():
            yield from split_micro(indices, self.micro_batch)

    def index_tensors(self) -> Iterator[Tensor]:
        """The same micro-batches as index tensors, for data already in memory: one conversion
        per target batch, views after that. The indices are host bookkeeping, like the list
        they come from, so they are not made as torch storage that would count as memory
        growing with the target batch."""
        for indices in self._target_batches():
            order = numpy.asarray(indices, dtype=numpy.int64)
            for start in range(0, len(order), self.micro_batch):
                yield torch.from_numpy(order[start:start + self.micro_batch])

    def __len__(self) -> int:
        return sum(self.micro_batches_per_step(s) for s in range(self.start_step, self.stop_step))


def _as_batch(batch: object) -> object:
    return batch


def _tensor_stream(dataset: TensorPairs, batch_sampler: Iterable[list[int]],
                   pin_memory: bool) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(batch_sampler, MicroBatchPlan):
        batch_sampler = batch_sampler.index_tensors()
    for indices in batch_sampler:
        inputs, targets = dataset.__getitems__(indices)
        yield (inputs.pin_memory(), targets.pin_memory()) if pin_memory else (inputs, targets)


def micro_batch_loader(dataset: Dataset, batch_sampler: Iterable[list[int]], num_workers: int,
                       pin_memory: bool, seed: int = 0,
                       collate: Collate | None = None) -> Iterable[Any]:
    """Stream micro-batches: a DataLoader, pinning host memory when the device is CUDA.

    Tensors already in memory with no workers asked for are indexed directly: the DataLoader
    would add ~30 µs of bookkeeping per micro-batch and nothing else.
    """
    if isinstance(dataset, TensorPairs) and num_workers == 0:
        return _tensor_stream(dataset, batch_sampler, pin_memory)
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
        # TensorPairs hands back a whole micro-batch already stacked.
        collate_fn=_as_batch if isinstance(dataset, TensorPairs) else collate_samples(collate),
        # Its own generator for worker seeds: the global RNG stays as a resumed run needs it.
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(dataset: Dataset, micro_batch: int, num_workers: int, pin_memory: bool,
                collate: Collate | None = None) -> Iterable[Any]:
    """Sequential micro-batches over a held-out split (a stream's, in its order)."""
    if is_stream(dataset):
        return DataLoader(dataset, batch_size=micro_batch, collate_fn=collate_samples(collate),
                          pin_memory=pin_memory)
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.SequentialSampler(dataset), micro_batch, drop_last=False)
    return micro_batch_loader(dataset, sampler, num_workers, pin_memory, collate=collate)


def collate_samples(collate: Collate | None) -> Collate:
    """The recipe's collate, or torch's default with a message for samples it cannot stack."""
    return collate or _default_collate


def _default_collate(samples: list[Any], *, which: str = "the samples",
                     fix: str = "Return tensors of one shape from the dataset (data.transforms "
                                "for images)") -> Any:
    """torch's default collate; samples it cannot stack are one message, naming `fix`."""
    try:
        return default_collate(samples)
    except (TypeError, RuntimeError) as exc:
        raise UsageError(f"cannot make a batch of {which} ({exc}); a sample is "
                         f"{describe(samples[0])}. {fix}, or pad them with data.collate") from exc


# What shapes the held-out samples: data.transforms are the training split's alone
HELD_OUT_KEYS = ("data.eval_transforms (the held-out split's own transforms; data.transforms "
                 "apply to training alone) or data.resize (both splits)")


def stack_held_out(samples: list[Any]) -> Any:
    """The default collate for held-out samples: its message names the keys that shape them."""
    return _default_collate(samples, which="held-out samples",
                            fix=f"Give them one shape with {HELD_OUT_KEYS}")


def accumulation_steps(target_batch: int, micro_batch: int) -> int:
    """Micro-batches in a full target batch (the last one may be smaller)."""
    return math.ceil(target_batch / micro_batch)


class MicroBatchStream:
    """The micro-batches of every step in order; restarts at a step with a new micro-batch size.

    Each step's target batch is a function of the step number alone, so restarting at step s
    with another size replays exactly the samples of step s: none lost, none counted twice.
    """

    def __init__(self, dataset: Dataset, target_batch: int, micro_batch: int, seed: int,
                 drop_last: bool, total_steps: int, num_workers: int, pin_memory: bool,
                 start_step: int = 0, collate: Collate | None = None,
                 shares: Sequence[int] = (), rank: int = 0) -> None:
        self.dataset, self.target_batch, self.seed = dataset, target_batch, seed
        self.drop_last, self.total_steps = drop_last, total_steps
        self.num_workers, self.pin_memory, self.collate = num_workers, pin_memory, collate
        self.shares, self.rank = shares, rank
        self.restart(start_step, micro_batch)

    @property
    def micro_batch(self) -> int:
        """The micro-batch size streamed now."""
        return self.plan.micro_batch

    def restart(self, step: int, micro_batch: int, shares: Sequence[int] | None = None) -> None:
        """Stream from the start of `step` in micro-batches of `micro_batch` (and new shares,
        where given)."""
        if shares is not None:
            self.shares = shares
        self.plan = MicroBatchPlan(len(self.dataset), self.target_batch, micro_batch, self.seed,
                                   self.drop_last, step, self.total_steps, self.shares, self.rank)
        self._stream = iter(micro_batch_loader(self.dataset, self.plan, self.num_workers,
                                               self.pin_memory, seed=self.seed + step,
                                               collate=self.collate))

    def share_at(self, step: int) -> int:
        """How many samples of step `step`'s target batch this rank streams."""
        return self.plan.share_at(step)

    def pieces(self, step: int) -> Iterator[Any]:
        """The micro-batches of `step`, streamed (call once per step, in order)."""
        return itertools.islice(self._stream, self.plan.micro_batches_per_step(step))
