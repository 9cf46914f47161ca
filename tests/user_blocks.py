"""A user's own model with blocks of its own class, BatchNorm straight on the input, and data
(images, features, one outlier for fp16), written the way the PyTorch docs teach. Tests copy
this file beside their recipes and name its parts by import path."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class Images(Dataset):
    """3×size×size random images with one of 10 classes."""

    def __init__(self, train: bool = True, n: int = 40, size: int = 32) -> None:
        g = torch.Generator().manual_seed(1 if train else 2)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Features(Dataset):
    """4 features per sample, far from zero mean and unit variance (BatchNorm has work to do),
    and a class. With `outlier`: small features and a regression target of 0, but sample 5's
    features are ten thousand times larger than the rest."""

    def __init__(self, train: bool = True, n: int = 37, outlier: bool = False) -> None:
        g = torch.Generator().manual_seed(3 if train else 4)
        self.x = 3.0 + 2.0 * torch.randn(n, 4, generator=g)
        self.y = torch.randint(3, (n,), generator=g)
        if outlier:
            self.x = 0.1 * torch.randn(n, 4, generator=g)
            self.x[5] = 1000.0
            self.y = torch.zeros(n, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class NormFirst(nn.Module):
    """BatchNorm directly on the input, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class Residual(nn.Module):
    """conv → BatchNorm → ReLU → dropout → conv, plus the input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.drop(torch.relu(self.norm(self.conv1(x)))))


class SmallNet(nn.Module):
    """A stem, two residual blocks held as plain attributes (no container), a head."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.first = Residual(width)
        self.second = Residual(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.second(self.first(torch.relu(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))
