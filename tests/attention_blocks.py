"""Models that attend with torch's scaled_dot_product_attention, written the way the PyTorch docs
teach, and token data for them. Tests copy this file beside their recipes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset


class Tokens(Dataset):
    """(tokens (length,), class) pairs; with `padding`, the last tokens of every sample are
    padding (0) and samples are dicts with an attention mask, as tokenizers give them."""

    def __init__(self, train: bool = True, n: int = 48, length: int = 32, vocab_size: int = 50,
                 classes: int = 3, padding: int = 0, as_dict: bool = False) -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        self.tokens = torch.randint(1, vocab_size, (n, length), generator=g)
        self.mask = torch.ones(n, length, dtype=torch.long)
        if padding:
            self.tokens[:, -padding:] = 0
            self.mask[:, -padding:] = 0
        self.labels = torch.randint(classes, (n,), generator=g)
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.as_dict:
            return {"input_ids": self.tokens[index], "attention_mask": self.mask[index],
                    "labels": self.labels[index]}
        return self.tokens[index], self.labels[index]


class SelfAttention(nn.Module):
    """Multi-head self-attention on scaled_dot_product_attention, as torch's tutorial writes it."""

    def __init__(self, dim: int, heads: int, dropout: float, is_causal: bool) -> None:
        super().__init__()
        self.heads, self.dropout, self.is_causal = heads, dropout, is_causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0, is_causal=self.is_causal)
        return self.out(y.transpose(1, 2).reshape(n, length, dim))


class AttentionClassifier(nn.Module):
    """Embedding, pre-norm attention blocks and a mean-pooled linear head: (N, classes)."""

    def __init__(self, vocab_size: int = 50, classes: int = 3, dim: int = 32, heads: int = 2,
                 layers: int = 2, dropout: float = 0.0, is_causal: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.blocks = nn.ModuleList(SelfAttention(dim, heads, dropout, is_causal)
                                    for _ in range(layers))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for norm, block in zip(self.norms, self.blocks, strict=True):
            x = x + block(norm(x))
        return self.head(x.mean(1))


class EncoderClassifier(nn.Module):
    """The same on torch's own nn.TransformerEncoder (its attention: nn.MultiheadAttention)."""

    def __init__(self, vocab_size: int = 50, classes: int = 3, dim: int = 32, heads: int = 2,
                 layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def bert(vocab_size: int = 50, classes: int = 3, dropout: float = 0.0) -> nn.Module:
    """A small Hugging Face BERT for sequence classification (its attention: sdpa)."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=classes, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout))
