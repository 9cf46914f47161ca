"""Datasets and the sampler: real digits, variable token counts, exact target-batch partitions."""

from __future__ import annotations

import torch

from mbp_cli.catalog.datasets import digits, synthetic, synthetic_tokens
from mbp_cli.data.batching import MicroBatchPlan, epoch_target_batches, split_micro


def test_embedded_digits_are_real_and_split():
    train, test = digits(train=True), digits(train=False)
    assert (len(train), len(test)) == (1438, 359)
    assert train.inputs.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(train.inputs.min()) and float(train.inputs.max()) == 1.0
    assert torch.bincount(test.targets).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    # handwriting, not noise: the mean image of each class is closest to its own class' test mean
    train_means = torch.stack([train.inputs[train.targets == c].mean(0) for c in range(10)])
    test_means = torch.stack([test.inputs[test.targets == c].mean(0) for c in range(10)])
    distances = torch.cdist(test_means.flatten(1), train_means.flatten(1))
    assert distances.argmin(1).tolist() == list(range(10))


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = synthetic(seed=3, num_samples=20), synthetic(seed=3, num_samples=20)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, synthetic(seed=3, num_samples=20, train=False).inputs)


def test_synthetic_tokens_vary_in_length_and_ignore_padding():
    data = synthetic_tokens(num_samples=200, vocab_size=16, min_len=3, max_len=9)
    items = (data.targets != -100).sum(1)
    assert items.min() == 2 and items.max() == 8  # length − 1 predicted tokens
    inputs, targets = data.inputs, data.targets
    follows_rule = targets == (5 * inputs + 3) % 15 + 1
    assert bool(follows_rule[targets != -100].all())
    lengths = items + 1
    is_padding = torch.arange(9)[None, :] >= lengths[:, None]
    assert bool((inputs[is_padding] == 0).all()) and bool((inputs[~is_padding] > 0).all())


def test_target_batches_partition_each_epoch():
    batches = epoch_target_batches(103, 25, seed=1, epoch=0, drop_last=False)
    assert [len(b) for b in batches] == [25, 25, 25, 25, 3]
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert batches != epoch_target_batches(103, 25, seed=1, epoch=1, drop_last=False)
    assert batches == epoch_target_batches(103, 25, seed=1, epoch=0, drop_last=False)
    assert len(epoch_target_batches(103, 25, seed=1, epoch=0, drop_last=True)) == 4


def test_micro_batches_cover_the_target_batch_once():
    assert split_micro(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_plan_yields_each_steps_micro_batches_in_order():
    plan = MicroBatchPlan(23, 10, 4, seed=0, drop_last=False, start_step=2, stop_step=5)
    micro = list(plan)
    assert [plan.micro_batches_per_step(s) for s in range(2, 5)] == [1, 3, 3]
    assert len(micro) == len(plan) == 7
    assert [i for m in micro[:1] for i in m] == plan.target_batch_at(2)  # epoch 0's last 3
    assert [i for m in micro[1:4] for i in m] == plan.target_batch_at(3)  # epoch 1 begins
