"""The accumulated gradient equals the real full-batch gradient, whatever the split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mbp_cli.catalog.classification import cross_entropy
from mbp_cli.catalog.datasets import digits, synthetic_tokens
from mbp_cli.catalog.losses import mse
from mbp_cli.catalog.models import mlp, small_cnn, tiny_lm
from mbp_cli.engine.micro_step import MicroStep
from mbp_cli.run.target_batch import target_batch_step

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def full_batch_grad(model, inputs, targets, reference_loss) -> torch.Tensor:
    """The gradient of torch's own mean-reduced loss over the whole batch in one piece."""
    model.zero_grad(set_to_none=True)
    reference_loss(model(inputs), targets).backward()
    grad = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    return grad


def pieces(inputs, targets, sizes):
    start = 0
    for size in sizes:
        yield inputs[start:start + size], targets[start:start + size]
        start += size


def accumulated_grad(model, inputs, targets, sizes, loss_fn, dtype) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    target_batch_step(MicroStep(model, loss_fn, CPU, dtype), pieces(inputs, targets, sizes))
    grad = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    return grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def even_sizes(total: int, micro: int) -> list[int]:
    return [min(micro, total - start) for start in range(0, total, micro)]


def token_case(dtype):
    torch.manual_seed(0)
    data = synthetic_tokens(num_samples=100, vocab_size=16, min_len=2, max_len=12)
    model = tiny_lm(vocab_size=16, dim=16).to(dtype)

    def reference(output, target):
        return F.cross_entropy(output.reshape(-1, 16), target.reshape(-1), ignore_index=-100)

    return model, data.inputs, data.targets, cross_entropy(), reference


def image_case(dtype):
    torch.manual_seed(0)
    data = digits()
    model = small_cnn(width=8).to(dtype)
    return model, data.inputs[:100].to(dtype), data.targets[:100], cross_entropy(), F.cross_entropy


def regression_case(dtype):
    torch.manual_seed(0)
    inputs = torch.randn(100, 12, dtype=dtype)
    targets = torch.randn(100, 3, dtype=dtype)
    return mlp(in_features=12, out_features=3).to(dtype), inputs, targets, mse(), F.mse_loss


CASES = {"tokens": token_case, "images": image_case, "regression": regression_case}
SPLITS = [(64, 16), (70, 16), (100, 16), (10, 4), (37, 1), (99, 98), (100, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("target", "micro"), SPLITS)
def test_accumulated_gradient_equals_full_batch(case, dtype, target, micro):
    model, inputs, targets, loss_fn, reference = CASES[case](dtype)
    inputs, targets = inputs[:target], targets[:target]
    expected = full_batch_grad(model, inputs, targets, reference)
    got = accumulated_grad(model, inputs, targets, even_sizes(target, micro), loss_fn, dtype)
    assert relative_error(got, expected) <= TOLERANCE[dtype]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12))
def test_any_uneven_split_of_a_token_batch_is_exact(sizes):
    """Arbitrary piece sizes, each holding a different number of non-ignored tokens."""
    model, inputs, targets, loss_fn, reference = token_case(torch.float64)
    total = min(sum(sizes), len(targets))
    inputs, targets = inputs[:total], targets[:total]
    expected = full_batch_grad(model, inputs, targets, reference)
    got = accumulated_grad(model, inputs, targets, sizes, loss_fn, torch.float64)
    assert relative_error(got, expected) <= 1e-10


def test_dividing_by_the_number_of_micro_batches_is_not_exact():
    """The common recipe, mean loss / number of micro-batches, misses on uneven token counts:
    this is the error the tests above would catch."""
    model, inputs, targets, _, reference = token_case(torch.float64)
    expected = full_batch_grad(model, inputs, targets, reference)
    sizes = even_sizes(100, 16)
    for x, y in pieces(inputs, targets, sizes):
        (reference(model(x), y) / len(sizes)).backward()
    assert relative_error(flat_grad(model), expected) > 1e-3


def test_step_totals_count_items_samples_and_micro_batches():
    model, inputs, targets, loss_fn, reference = token_case(torch.float64)
    totals = target_batch_step(MicroStep(model, loss_fn, CPU, torch.float64),
                               pieces(inputs, targets, [30, 30, 40])).totals
    assert totals.samples == 100
    assert totals.micro_batches == 3
    assert totals.items == int((targets != -100).sum())
    with torch.no_grad():
        assert totals.loss == pytest.approx(float(reference(model(inputs), targets)), rel=1e-12)
