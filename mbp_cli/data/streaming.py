"""Target batches taken in order from a stream (an IterableDataset: no length, no indexing):
an epoch is a pass over it, each rank keeps its share, and a position resumes it exactly."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from mbp_cli.data.batching import Collate, accumulation_steps, collate_samples, split_micro
from mbp_cli.distributed.shares import share_bounds
from mbp_cli.errors import UsageError
from mbp_cli.recipe.spec import Recipe


def check_stream_recipe(recipe: Recipe) -> None:
    """Refuse what a stream cannot give: a length (train.epochs, per-epoch rebalancing) or
    workers that would each read all of it."""
    if recipe.train.steps is None:
        raise UsageError("train.epochs: the training data is a stream, whose length is not known "
                         "before a pass; give train.steps (a pass ends where the stream does, "
                         "and the next one begins)")
    if recipe.train.num_workers:
        raise UsageError("train.num_workers: the training data is a stream, read in order by the "
                         "training process (each worker would read all of it); set 0")
    if recipe.train.partition is not None:
        raise UsageError("train.partition: its parts are trained over the dataset again and "
                         "again by index; a stream has no indexing")
    if recipe.batch.balance == "dynamic" and not recipe.batch.rebalance_every:
        raise UsageError("batch.balance: dynamic rebalances each epoch by default, and a stream's "
                         "epoch has no known length; give batch.rebalance_every")


def first_samples(dataset: Any, count: int) -> list[Any]:
    """The stream's first `count` samples (fewer where it is shorter), from a fresh pass."""
    return list(itertools.islice(iter(dataset), count))


class StreamedBatches:
    """The micro-batches of every step, in order, as MicroBatchStream gives them for indexed
    data. Step after step takes the stream's next `target_batch` samples; where a pass ends
    first, that step's target batch is the smaller rest (dropped with `drop_last`) and the next
    step starts a new pass (`set_epoch(epoch)` where the dataset has it, as Hugging Face's
    shuffled streams need). Every rank reads every sample and keeps its share, so each sample is
    used once per target batch. A step's samples are held until the next step, so a step redone
    with another micro-batch (out of memory, new shares) is cut from the same samples.

    `position` — the pass, the samples of it consumed before the next step, and the dataset's
    own `state_dict()` where it has one — is what a checkpoint keeps; a resumed stream loads
    that state (Hugging Face's streams resume from it without reading again), else skips that
    many samples of that pass.
    """

    def __init__(self, dataset: Any, target_batch: int, micro_batch: int, drop_last: bool,
                 collate: Collate | None = None, shares: Sequence[int] = (), rank: int = 0,
                 position: dict[str, Any] | None = None) -> None:
        self.dataset, self.target_batch, self.drop_last = dataset, target_batch, drop_last
        self.collate, self.shares, self.rank = collate_samples(collate), shares, rank
        self.micro_batch = micro_batch
        position = position or {}
        # where the next target batch starts
        self.epoch, self.offset = position.get("epoch", 0), position.get("offset", 0)
        self._saved_state = position.get("state")  # the dataset's own, to load on resuming
        self._samples: Iterator[Any] | None = None
        self._held: list[Any] = []
        self._held_step: int | None = None
        self.held_epoch = self.epoch  # the pass the held step's samples came from
        self.short_pass: int | None = None  # a pass's length, where one was under the target

    @property
    def position(self) -> dict[str, Any]:
        """Where the steps taken so far leave the stream: the pass, the samples of it taken and
        (mid-pass) the dataset's own state, where it keeps one."""
        is_mid_pass = self._samples is not None and hasattr(self.dataset, "state_dict")
        state = self.dataset.state_dict() if is_mid_pass else None
        return {"epoch": self.epoch, "offset": self.offset, "state": state}

    def restart(self, step: int, micro_batch: int, shares: Sequence[int] | None = None) -> None:
        """Cut `step`'s samples (the held ones, where it is the step held) in micro-batches of
        `micro_batch` (and new shares, where given)."""
        self.micro_batch = micro_batch
        if shares is not None:
            self.shares = shares

    def share_at(self, step: int) -> int:
        """How many samples of step `step`'s target batch this rank streams."""
        held = self._hold(step)
        if not self.shares:
            return len(held)
        start, stop = share_bounds(len(held), self.shares, self.rank)
        return stop - start

    def pieces(self, step: int) -> Iterator[Any]:
        """The micro-batches of `step` (call in step order)."""
        held = self._hold(step)
        if self.shares:
            start, stop = share_bounds(len(held), self.shares, self.rank)
            held = held[start:stop]
        return (self.collate(piece) for piece in split_micro(held, self.micro_batch))

    def micro_batches_per_step(self, step: int) -> int:
        """How many micro-batches step `step` streams."""
        return accumulation_steps(self.share_at(step), self.micro_batch)

    def _hold(self, step: int) -> list[Any]:
        if step != self._held_step:
            self._held, self._held_step = self._next_target_batch(), step
        return self._held

    def _open(self) -> Iterator[Any]:
        """A pass from the start, or from a resumed position: the dataset's state loaded, else
        the pass's first `offset` samples skipped."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        state, self._saved_state = self._saved_state, None
        if state is not None and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state)
            return iter(self.dataset)
        return itertools.islice(iter(self.dataset), self.offset, None)

    def _next_target_batch(self) -> list[Any]:
        for _ in range(2):  # the rest of this pass, else the start of the next
            if self._samples is None:
                self._samples = self._open()
            taken = list(itertools.islice(self._samples, self.target_batch))
            is_whole = len(taken) == self.target_batch
            if taken and (is_whole or not self.drop_last):
                self.held_epoch = self.epoch
                if not is_whole and self.offset == 0:  # a whole pass short of a target batch
                    self.short_pass = len(taken)
                self.offset += len(taken)
                if not is_whole:  # the pass ended inside this target batch
                    self._next_pass()
                return taken
            self._next_pass()
        raise UsageError("the training stream yields no samples (or fewer than batch.target "
                         "with batch.drop_last)")

    def _next_pass(self) -> None:
        self.epoch, self.offset, self._samples = self.epoch + 1, 0, None
