"""A Hugging Face user's code: transformers models built from small configs (the hub is not
reachable), padded texts with labels as HF's collators make them, and a model of one's own that
returns a mean loss. Tests copy this file beside their recipes and name its parts by import path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB, LENGTH = 40, 12


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=2,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama() -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=LENGTH))


def bert_tagger() -> nn.Module:
    """A token classifier with as many tags as positions: its logits (N, L, C) have C == L."""
    return BertForTokenClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=LENGTH,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def bert_classifier(num_labels: int = 3) -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


class Texts(Dataset):
    """Token sequences of 3 to 12 tokens, padded to 12, as dicts: input_ids, attention_mask and
    labels — the input_ids with -100 on the padding (a causal LM's, shifted inside its loss) or,
    with `classes`, one class per text."""

    def __init__(self, train: bool = True, n: int = 37, classes: int | None = None,
                 multi_label: bool = False, tags: bool = False) -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g) * self.mask
        self.labels = self.ids.masked_fill(self.mask == 0, -100) if classes is None else \
            torch.randint(2, (n, classes), generator=g).float() if multi_label else \
            torch.randint(classes, (n,), generator=g)
        if tags:  # a tag per token, padding ignored
            self.labels = torch.randint(LENGTH, (n, LENGTH), generator=g).masked_fill(
                self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


class MeanLossLM(nn.Module):
    """A model of one's own, HF-style: it takes labels and returns {"loss", "logits"}, the loss
    the mean cross-entropy over its non-padding next tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(torch.tanh(self.embed(input_ids)))
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def mean_loss_lm() -> nn.Module:
    return MeanLossLM()


class AuxLossLM(MeanLossLM):
    """Its loss adds an auxiliary term to the mean cross-entropy (as a router's balancing loss
    does): no mean over items, so not normalizable exactly."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        output = super().forward(input_ids, attention_mask, labels)
        if labels is not None:
            output["loss"] = output["loss"] + 0.1 * output["logits"].pow(2).mean()
        return output


def aux_loss_lm() -> nn.Module:
    return AuxLossLM()


def texts_table(train: bool = True, n: int = 37):
    """The same texts as a Hugging Face `datasets.Dataset` (made offline with from_dict), in
    torch format."""
    from datasets import Dataset as Table

    texts = Texts(train=train, n=n)
    return Table.from_dict({"input_ids": texts.ids.tolist(), "attention_mask": texts.mask.tolist(),
                            "labels": texts.labels.tolist()}).with_format("torch")


def texts_stream(train: bool = True, n: int = 37):
    """The texts as a stream: the table's `to_iterable_dataset()`."""
    return texts_table(train, n).to_iterable_dataset()


class TextStream(torch.utils.data.IterableDataset):
    """The texts as a stream of torch's kind: no length, no indexing, read in order."""

    def __init__(self, train: bool = True, n: int = 37) -> None:
        self.texts = Texts(train=train, n=n)

    def __iter__(self):
        return (self.texts[i] for i in range(len(self.texts.ids)))
