"""BatchNorm's running statistics moved once per target batch, as one full batch would move them.

In training, each micro-batch is normalized by its own statistics (that is what micro-batching
changes), but the running mean and variance — what evaluation uses — are updated once per
target batch from the whole target batch's mean and unbiased variance, combined exactly from the
micro-batches' (Chan's parallel formula). Left alone, momentum would be applied once per
micro-batch: 16 micro-batches would move the statistics 16 times per optimizer step, towards the
noisier statistics of small pieces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mbp_cli.distributed.ranks import Ranks
from mbp_cli.strategies.blocks import Recompute

_BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass
class _Moments:
    """Values seen so far per channel: how many, their mean, and the sum of squared deviations."""

    count: int
    mean: Tensor
    m2: Tensor

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Add a group of `count` values with its own mean and sum of squared deviations."""
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2 + delta * delta * (self.count * count / total)
        self.count = total


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class TargetBatchStatistics:
    """Collects each BatchNorm layer's micro-batch statistics over one target batch and applies
    one running-statistics update at its end."""

    def __init__(self, model: nn.Module, recompute: Recompute | None = None) -> None:
        self.layers = batch_norm_layers(model)
        self.recompute = recompute
        self._moments: dict[_BatchNorm, _Moments] = {}

    @contextlib.contextmanager
    def target_batch(self, ranks: Ranks | None = None) -> Iterator[None]:
        """Around one target batch's micro-batches: update the running statistics once, at the
        end (from every rank's micro-batches, where there are several); leave them untouched if
        the target batch fails (out of memory, an error)."""
        layers = [m for m in self.layers if m.training]
        if not layers:
            yield
            return
        saved = {m: (m.momentum, m.running_mean.clone(), m.running_var.clone(),
                     m.num_batches_tracked.clone()) for m in layers}
        hooks = [m.register_forward_hook(self._collect) for m in layers]
        for m in layers:
            m.momentum = 1.0  # the running statistics become the micro-batch's: read them back
        self._moments = {}
        is_done = False
        try:
            yield
            is_done = True
            if ranks is not None and ranks.is_distributed:
                self._moments = self._merged_over_ranks(layers, ranks)
        finally:
            for hook in hooks:
                hook.remove()
            with torch.no_grad():
                for m, (momentum, mean, var, tracked) in saved.items():
                    m.momentum = momentum
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(tracked)
                    if is_done and m in self._moments:
                        self._update(m, self._moments[m])
            self._moments = {}

    def _collect(self, module: _BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self.recompute is not None and self.recompute.is_active:
            return  # activation checkpointing's second forward: already counted
        count = inputs[0].numel() // inputs[0].shape[1]
        with torch.no_grad():
            mean = module.running_mean.double()
            m2 = module.running_var.double() * (count - 1)  # momentum 1: the unbiased variance
            moments = self._moments.get(module)
            if moments is None:
                self._moments[module] = _Moments(count, mean.clone(), m2.clone())
            else:
                moments.merge(count, mean, m2)

    def _merged_over_ranks(self, layers: list[_BatchNorm], ranks: Ranks
                           ) -> dict[_BatchNorm, _Moments]:
        """Every rank's moments of each layer combined, in rank order (one gather); a rank
        with an empty share adds none."""
        parts = []
        for m in layers:
            moments = self._moments.get(m)
            if moments is None:
                channels = m.running_mean.numel()
                parts.append(torch.zeros(1 + 2 * channels, dtype=torch.float64))
            else:
                parts.append(torch.cat([torch.tensor([float(moments.count)]),
                                        moments.mean.cpu(), moments.m2.cpu()]))
        rows = ranks.gather_rows(torch.cat(parts))
        merged: dict[_BatchNorm, _Moments] = {}
        offset = 0
        for m, part in zip(layers, parts, strict=True):
            channels = (part.numel() - 1) // 2
            device = m.running_mean.device
            for row in rows[:, offset:offset + part.numel()]:
                count = int(row[0])
                if not count:
                    continue
                mean = row[1:1 + channels].to(device)
                m2 = row[1 + channels:].to(device)
                if m in merged:
                    merged[m].merge(count, mean, m2)
                else:
                    merged[m] = _Moments(count, mean.clone(), m2.clone())
            offset += part.numel()
        return merged

    @staticmethod
    def _update(module: _BatchNorm, moments: _Moments) -> None:
        """One update with the target batch's mean and unbiased variance, as torch makes it."""
        module.num_batches_tracked += 1
        factor = module.momentum
        if factor is None:  # a cumulative average
            factor = 1.0 / float(module.num_batches_tracked)
        variance = moments.m2 / max(1, moments.count - 1)
        dtype = module.running_mean.dtype
        module.running_mean.mul_(1 - factor).add_(moments.mean.to(dtype), alpha=factor)
        module.running_var.mul_(1 - factor).add_(variance.to(dtype), alpha=factor)
