"""Generated variable-length tagging: sequences, a padding collate and a GRU tagger."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

PAD_TOKEN, IGNORED_TAG = 0, -100  # -100: cross_entropy's default ignore_index


class Tagging(Dataset):
    """Token sequences of `min_len` to `max_len` tokens in 1..vocab_size-1, each token tagged
    `(token + 2·previous) mod num_tags`, the previous token being 0 at the start.

    Items are `(tokens (len,), tags (len,))` of differing lengths; `pad_collate` batches them.
    `n` sequences for training, `n_eval` held out.
    Generated once from its own generator, so a split is the same on every run.
    """

    def __init__(self, train: bool = True, n: int = 2000, n_eval: int = 400,
                 vocab_size: int = 16, num_tags: int = 4, min_len: int = 3, max_len: int = 30,
                 seed: int = 0) -> None:
        draw = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
        count = n if train else n_eval
        lengths = torch.randint(min_len, max_len + 1, (count,), generator=draw).tolist()
        self.tokens = [torch.randint(1, vocab_size, (length,), generator=draw)
                       for length in lengths]
        self.tags = [tag_rule(tokens, num_tags) for tokens in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.tokens[index], self.tags[index]


def tag_rule(tokens: Tensor, num_tags: int) -> Tensor:
    """The tag of each token: it depends on the token and the one before it."""
    previous = torch.cat([tokens.new_zeros(1), tokens[:-1]])
    return (tokens + 2 * previous) % num_tags


def pad_collate(samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Pad a micro-batch to its longest sequence: tokens (N, L) with 0, tags (N, L) with -100,
    so the loss counts only real tokens however the target batch is split."""
    tokens, tags = zip(*samples, strict=True)
    return (pad_sequence(list(tokens), batch_first=True, padding_value=PAD_TOKEN),
            pad_sequence(list(tags), batch_first=True, padding_value=IGNORED_TAG))


class GRUTagger(nn.Module):
    """Embedding, a one-way GRU and a linear head: tag scores (N, num_tags, L), classes in
    dim 1 as torch's cross_entropy takes them."""

    def __init__(self, vocab_size: int = 16, num_tags: int = 4, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_TOKEN)
        # One-way on purpose: a token's scores never see the padding after it, so they do
        # not depend on how long the rest of its micro-batch is.
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, num_tags)

    def forward(self, tokens: Tensor) -> Tensor:
        """Scores (N, num_tags, L) for tokens (N, L)."""
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden).transpose(1, 2)
