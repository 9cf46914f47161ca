"""The micro-step's reading of batches and model outputs, as torch and Hugging Face write them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mbp_cli.engine.micro_step import pick_output, split_batch
from mbp_cli.errors import UsageError

SCORES, FEATURES = torch.randn(2, 3), torch.randn(2, 8)


@pytest.mark.parametrize(("output", "key", "expected"), [
    (SCORES, None, SCORES),
    ({"out": SCORES, "aux": FEATURES}, None, SCORES),  # torchvision segmentation
    ({"loss": FEATURES, "logits": SCORES}, None, SCORES),  # a Hugging Face dict
    (SimpleNamespace(logits=SCORES, hidden_states=FEATURES), None, SCORES),
    ((SCORES, FEATURES), None, SCORES),
    ([SCORES], None, SCORES),
    ((FEATURES, SCORES), 1, SCORES),  # (features, logits): model.output: 1
    ({"scores": SCORES}, "scores", SCORES),
])
def test_outputs_are_read_as_documented(output, key, expected):
    assert pick_output(output, key) is expected


@pytest.mark.parametrize(("output", "key", "message"), [
    ((FEATURES, SCORES), 2, "expected a tensor at 2"),
    ({"hidden": "text"}, None, "the model returned a dict with keys ['hidden']"),
    ("scores", None, "the model returned a str"),
])
def test_outputs_that_hold_no_scores_are_one_line(output, key, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pick_output(output, key)


def test_batches_split_into_inputs_and_target():
    x, y, z = torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)
    assert split_batch((x, z)) == ((x,), {}, z)
    assert split_batch([x, y, z]) == ([x, y], {}, z)
    args, kwargs, target = split_batch({"input_ids": x, "attention_mask": y, "labels": z})
    assert (args, list(kwargs), target) == ((), ["input_ids", "attention_mask"], z)
    assert split_batch({"x": x, "y": z}, target_key="y")[2] is z
