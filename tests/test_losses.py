"""Loss layouts as torch's cross_entropy takes them, and as language models write them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbp_cli.catalog.classification import class_dim_of, cross_entropy
from mbp_cli.errors import UsageError


def mean(loss, output, target) -> float:
    total, items = loss(output, target)
    return float(total / items)


@pytest.mark.parametrize(("output_shape", "target_shape", "class_dim"), [
    ((4, 3), (4,), 1), ((4, 3, 5), (4, 5), 1), ((4, 3, 5, 6), (4, 5, 6), 1),
    ((4, 5, 3), (4, 5), -1),  # (N, L, C), as Hugging Face language models write it
    ((4, 5, 5), (4, 5), 1),  # C == L: both readings fit; torch's is taken
])
def test_the_class_dimension_is_decided_by_shapes(output_shape, target_shape, class_dim):
    output = torch.randn(output_shape, dtype=torch.float64)
    target = torch.randint(3, target_shape)
    assert class_dim_of(output, target) == class_dim
    scores = output if class_dim == 1 else output.movedim(-1, 1)
    assert mean(cross_entropy(), output, target) == pytest.approx(
        float(F.cross_entropy(scores, target)), rel=1e-12)


def test_class_dim_forces_the_reading_where_both_fit():
    output = torch.randn(4, 5, 5, dtype=torch.float64)
    target = torch.randint(5, (4, 5))
    forced = mean(cross_entropy(class_dim=-1), output, target)
    assert forced == pytest.approx(float(F.cross_entropy(output.movedim(-1, 1), target)),
                                   rel=1e-12)
    assert forced != pytest.approx(mean(cross_entropy(), output, target))


def test_a_target_that_fits_neither_layout_says_what_both_expect():
    with pytest.raises(UsageError) as caught:
        cross_entropy()(torch.randn(4, 3, 5), torch.randint(3, (4, 7)))
    assert str(caught.value) == (
        "the model output (4, 3, 5) does not fit the target (4, 7) of class indices: expected "
        "a target of shape (4, 5) with classes in dim 1 (as torch's cross_entropy), or (4, 3) "
        "with classes last")


def test_soft_targets_follow_torch_and_weights_from_a_file(tmp_path):
    output = torch.randn(6, 4, 3, dtype=torch.float64)
    probabilities = torch.softmax(torch.randn(6, 4, 3, dtype=torch.float64), 1)
    weight = torch.tensor([1.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    torch.save(weight, tmp_path / "weight.pt")
    loss = cross_entropy(weight=str(tmp_path / "weight.pt"), label_smoothing=0.2)
    assert mean(loss, output, probabilities) == pytest.approx(float(F.cross_entropy(
        output, probabilities, weight=weight, label_smoothing=0.2)), rel=1e-12)


@pytest.mark.parametrize(("weight", "message"), [
    ([1.0, -1.0], "one finite, non-negative weight per class"),
    ("missing.pt", "loss.args.weight: cannot load missing.pt"),
])
def test_bad_class_weights_are_one_line(weight, message):
    with pytest.raises(UsageError, match=message):
        cross_entropy(weight=weight)


def test_the_layout_is_kept_when_a_padded_length_equals_the_number_of_classes():
    """(N, L, C) with L varying by micro-batch: where L == C both readings fit, and the run's
    own reading (classes last, known from an earlier micro-batch) is kept, as in one piece."""
    torch.manual_seed(0)
    long, square = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(2, 4, 4,
                                                                        dtype=torch.float64)
    long_target, square_target = torch.randint(4, (3, 6)), torch.randint(4, (2, 4))
    loss = cross_entropy()
    loss(long, long_target)
    total, items = loss(square, square_target)
    expected = F.cross_entropy(square.reshape(-1, 4), square_target.reshape(-1), reduction="sum")
    assert float(total) == pytest.approx(float(expected), rel=1e-12) and int(items) == 8
    guessed_first = cross_entropy()
    guessed_first(square, square_target)  # torch's reading, nothing known yet
    with pytest.raises(UsageError, match="set loss.args.class_dim: -1"):
        guessed_first(long, long_target)


def test_an_own_loss_counts_with_its_default_ignore_index():
    from mbp_cli.catalog.losses import ItemLoss

    def per_token(output, target, ignore_index: int = -100):
        return F.cross_entropy(output, target, ignore_index=ignore_index, reduction="none")

    output = torch.randn(4, 3, 5, dtype=torch.float64)
    target = torch.randint(3, (4, 5))
    target[:, 3:] = -100
    total, items = ItemLoss(per_token, "mine:per_token")(output, target)
    assert int(items) == 12  # 4 × 3 tokens; the padding is not counted
    assert float(total / items) == pytest.approx(float(F.cross_entropy(output, target)),
                                                 rel=1e-12)


@pytest.mark.parametrize(("fn", "message"), [
    (lambda out, y: (F.cross_entropy(out, y, reduction="none"), len(y)),
     "returned \\(sum, count\\) whose sum is torch.Size\\(\\[4\\]\\)"),
    (lambda out, y: F.cross_entropy(out, y), "returned one number \\(a mean\\?\\)"),
])
def test_own_losses_that_break_the_contract_are_one_line(fn, message):
    from mbp_cli.catalog.losses import ItemLoss

    with pytest.raises(UsageError, match=message):
        ItemLoss(fn, "mine:loss")(torch.randn(4, 3), torch.randint(3, (4,)))


class FocalLoss(torch.nn.Module):
    """A focal loss written as torch's losses are: `reduction` defaults to "mean"."""

    def __init__(self, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction

    def forward(self, output, target):
        ce = F.cross_entropy(output, target, ignore_index=self.ignore_index, reduction="none")
        loss = (1 - torch.exp(-ce)) ** self.gamma * ce
        return loss.mean() if self.reduction == "mean" else loss


def test_an_own_loss_taking_reduction_is_given_none_as_torchs_are():
    from mbp_cli.catalog.losses import ItemLoss

    output = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, -100, 1, 2, -100])
    per_item = FocalLoss(reduction="none")(output, target)
    for loss in (ItemLoss(FocalLoss, "mine:FocalLoss", gamma=2.0),
                 ItemLoss(lambda out, y, reduction="mean": FocalLoss(reduction=reduction)(out, y),
                          "mine:focal")):
        total, items = loss(output, target)
        assert float(total) == pytest.approx(float(per_item.sum()), rel=1e-12)
        assert int(items) == (4 if loss.ignore_index == -100 else 6)


@pytest.mark.parametrize(("class_dim", "is_warned"), [(None, True), (-1, False)])
def test_a_guessed_class_dimension_is_said(cli, write_recipe, tmp_path, class_dim, is_warned):
    """24 classes over sequences of 24: both readings fit every micro-batch, so it is a guess."""
    from conftest import small_recipe

    loss = {"name": "cross_entropy", "args": {} if class_dim is None else {"class_dim": -1}}
    recipe = write_recipe(small_recipe(
        model={"name": "tiny_lm", "args": {"vocab_size": 24, "dim": 8}},
        data={"name": "synthetic_tokens", "args": {"num_samples": 64, "vocab_size": 24,
                                                   "max_len": 24}},
        loss=loss, train={"steps": 1, "eval_every": 0, "device": "cpu"}))
    result = cli("train", recipe, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert ("read in dim 1" in result.output and "class_dim: -1" in result.output) == is_warned
