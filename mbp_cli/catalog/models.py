"""Built-in models: small, exact (no BatchNorm; dropout only if asked) and quick on a CPU."""

from __future__ import annotations

from torch import Tensor, nn


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two 3×3 convolutions, a pooled 4×4 map and two linear layers; any input image size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(4), nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )


def mlp(in_features: int = 64, hidden: int = 64, out_features: int = 10, depth: int = 2,
        dropout: float = 0.0) -> nn.Module:
    """A multilayer perceptron on flattened inputs, `depth` hidden layers of `hidden` units."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout else []
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class TinyLM(nn.Module):
    """Embedding, a GRU and a linear head: next-token scores of shape (batch, time, vocab)."""

    def __init__(self, vocab_size: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden)


def tiny_lm(vocab_size: int = 32, dim: int = 64, layers: int = 1) -> nn.Module:
    """A tiny recurrent language model for `synthetic_tokens`."""
    return TinyLM(vocab_size, dim, layers)


MODELS = {"small_cnn": small_cnn, "mlp": mlp, "tiny_lm": tiny_lm}
