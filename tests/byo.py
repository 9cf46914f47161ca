"""A user's own code, written the way the PyTorch docs teach: datasets, models, a collate and
losses. Tests copy this file beside their recipes and name its parts by import path."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset


def _draw(train: bool) -> torch.Generator:
    return torch.Generator().manual_seed(1 if train else 2)


class Features(Dataset):
    """(features, class) pairs; every fifth class label is -100 (ignored)."""

    def __init__(self, train: bool = True, n: int = 37, classes: int = 4) -> None:
        g = _draw(train)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(classes, (n,), generator=g)
        self.y[::5] = -100

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def classifier(classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, classes))


class Tagging(Dataset):
    """Token sequences of length 7 with a tag per token, as (tokens, tags); some tags ignored."""

    def __init__(self, train: bool = True, n: int = 29) -> None:
        g = _draw(train)
        self.tokens = torch.randint(1, 20, (n, 7), generator=g)
        self.tags = self.tokens % 3
        self.tags[torch.rand(n, 7, generator=g) < 0.3] = -100

    def __len__(self) -> int:
        return len(self.tags)

    def __getitem__(self, i: int):
        return self.tokens[i], self.tags[i]


class Tagger(nn.Module):
    """Scores (N, C, L): classes in dim 1, as torch's cross_entropy takes them."""

    def __init__(self, tags: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, tags, 3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(self.embed(tokens).transpose(1, 2))


class Shapes(Dataset):
    """3×6×6 images with a per-pixel class mask (0 background, 1 and 2 two bright channels)."""

    def __init__(self, train: bool = True, n: int = 23) -> None:
        g = _draw(train)
        self.images = torch.rand(n, 3, 6, 6, generator=g)
        self.masks = self.images[:, :2].argmax(1) + (self.images[:, 2] > 0.5).long()

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]


class TinySegmenter(nn.Module):
    """Returns a dict, as torchvision's segmentation models do: {"out": (N, C, H, W), "aux": …}."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, classes, 1)
        self.aux = nn.Conv2d(8, classes, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.body(images))
        return {"out": self.out(features), "aux": self.aux(features)}


class DictTokens(Dataset):
    """Hugging Face style samples: {"input_ids", "attention_mask", "labels"}, padded to 9."""

    def __init__(self, train: bool = True, n: int = 31) -> None:
        g = _draw(train)
        lengths = torch.randint(2, 10, (n,), generator=g)
        self.mask = (torch.arange(9) < lengths[:, None]).long()
        self.ids = torch.randint(1, 16, (n, 9), generator=g) * self.mask
        self.labels = torch.where(self.mask.bool(), (self.ids * 3) % 16, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


@dataclass
class LMOutput:
    logits: torch.Tensor


class DictLM(nn.Module):
    """model(input_ids=…, attention_mask=…) → an object with .logits of shape (N, L, V)."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LMOutput:
        hidden = self.embed(input_ids) * attention_mask[..., None]
        return LMOutput(logits=self.head(hidden))


class Pairs(Dataset):
    """(x1, x2, y): two inputs and a class."""

    def __init__(self, train: bool = True, n: int = 26) -> None:
        g = _draw(train)
        self.a, self.b = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
        self.y = torch.randint(2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.a[i], self.b[i], self.y[i]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(3, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


class Ragged(Dataset):
    """Sequences of 1 to 8 tokens, each token tagged: items of different lengths."""

    def __init__(self, train: bool = True, n: int = 33) -> None:
        g = _draw(train)
        lengths = torch.randint(1, 9, (n,), generator=g).tolist()
        self.items = [torch.randint(1, 12, (k,), generator=g) for k in lengths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        tokens = self.items[i]
        return tokens, tokens % 4


def pad_collate(samples):
    """Pad tokens with 0 and tags with -100 (ignored) to the longest sequence of the batch."""
    tokens, tags = zip(*samples, strict=True)
    return (pad_sequence(tokens, batch_first=True),
            pad_sequence(tags, batch_first=True, padding_value=-100))


class GRUTagger(nn.Module):
    """A left-to-right GRU: padding at the end changes nothing before it. Scores (N, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden).transpose(1, 2)


def per_item_cross_entropy(output, target, smoothing: float = 0.0):
    """Per-item losses, as torch gives them with reduction="none"."""
    kept = target != -100
    return F.cross_entropy(output[kept], target[kept], reduction="none",
                           label_smoothing=smoothing)


def sum_and_count(output, target):
    """(sum, count) of the squared error of the true class's score from 1."""
    kept = target != -100
    scores = output[kept].gather(1, target[kept, None])
    return ((scores - 1) ** 2).sum(), int(kept.sum())


def bn_classifier(classes: int = 4) -> nn.Module:
    """A classifier with BatchNorm, as pretrained backbones have."""
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, classes))


class DictFeatures(Dataset):
    """{"input": features, "label": class} samples, read one by one (no tensors to gather)."""

    def __init__(self, train: bool = True, n: int = 80, classes: int = 3) -> None:
        g = _draw(train)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input": self.x[i], "label": int(self.y[i])}


def mlp() -> nn.Module:
    """A 4-layer MLP on DictFeatures (cut points as the digits MLP's: 2 and 4)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


class Scenes(Dataset):
    """size×size images with a per-pixel mask of 3 classes, its first row 255 (not a loss
    item), as torchvision's VOC masks mark object borders."""

    def __init__(self, train: bool = True, n: int = 7, size: int = 32) -> None:
        g = _draw(train)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.masks = self.images[:, :2].argmax(1) + (self.images[:, 2] > 0.5).long()
        self.masks[:, 0] = 255

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int):
        return self.images[i], self.masks[i]


def fcn(num_classes: int = 3) -> nn.Module:
    """torchvision's FCN-ResNet50 with its auxiliary head, untrained; dropout off (its masks
    differ with the split, as they would across runs)."""
    from torchvision.models.segmentation import fcn_resnet50

    model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                         aux_loss=True)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def out_and_aux(output, target, aux_weight: float = 0.4, ignore_index: int = 255):
    """torchvision segmentation's loss, per pixel: the main head's plus aux_weight × the
    auxiliary head's, ignored pixels 0 (not counted: ignore_index)."""
    def per_pixel(scores):
        return F.cross_entropy(scores, target, ignore_index=ignore_index, reduction="none")

    return per_pixel(output["out"]) + aux_weight * per_pixel(output["aux"])
