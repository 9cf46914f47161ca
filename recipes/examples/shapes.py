"""A generated segmentation task (coloured rectangles and discs) and a small U-Net for it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

CLASSES = ("background", "rectangle", "disc")


class Shapes(Dataset):
    """Images (3, size, size) holding 1 to `max_shapes` rectangles and discs of random colours,
    each with a mask (size, size) of class indices: 0 background, 1 rectangle, 2 disc;
    `n` samples for training, `n_eval` held out.

    Generated once from its own generator, so a split is the same on every run; the colours
    carry no class, so the model has to tell the shapes apart by their outline.
    """

    def __init__(self, train: bool = True, n: int = 2000, n_eval: int = 400, size: int = 32,
                 max_shapes: int = 3, seed: int = 0) -> None:
        draw = torch.Generator().manual_seed(seed * 2 + (1 if train else 2))
        self.images, self.masks = _generate(draw, n if train else n_eval, size, max_shapes)

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]


def _generate(draw: torch.Generator, n: int, size: int,
              max_shapes: int) -> tuple[Tensor, Tensor]:
    """n images and masks, drawing one shape slot at a time for all images together."""
    grid = torch.arange(size, dtype=torch.float32)
    ys, xs = grid[None, :, None], grid[None, None, :]
    images = 0.15 * torch.rand(n, 3, 1, 1, generator=draw).expand(n, 3, size, size).clone()
    images += 0.05 * torch.randn(n, 3, size, size, generator=draw)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    count = torch.randint(1, max_shapes + 1, (n,), generator=draw)
    for slot in range(max_shapes):
        kind = torch.randint(1, len(CLASSES), (n, 1, 1), generator=draw)
        cy, cx = (torch.rand(2, n, 1, 1, generator=draw) * (size - 8) + 4).unbind()
        half_h, half_w = (torch.rand(2, n, 1, 1, generator=draw) * 4 + 3.5).unbind()
        radius = torch.rand(n, 1, 1, generator=draw) * 4 + 4.5
        colour = 0.4 + 0.6 * torch.rand(n, 3, 1, 1, generator=draw)
        rectangle = ((ys - cy).abs() <= half_h) & ((xs - cx).abs() <= half_w)
        disc = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        inside = torch.where(kind == 1, rectangle, disc) & (slot < count)[:, None, None]
        masks = torch.where(inside, kind, masks)
        images = torch.where(inside[:, None], colour, images)
    return images, masks


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 convolutions, each with GroupNorm (per sample, so micro-batching stays exact)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A two-level U-Net returning `{"out": scores (N, num_classes, H, W)}`, as torchvision's
    segmentation models do; H and W must be divisible by 4."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 8,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.down1 = _block(in_channels, width)
        self.down2 = _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.merge2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.merge1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Per-pixel class scores under the key `out`."""
        skip1 = self.down1(images)
        skip2 = self.down2(self.pool(skip1))
        x = self.bottom(self.pool(skip2))
        x = self.merge2(torch.cat([self.up2(x), skip2], dim=1))
        x = self.merge1(torch.cat([self.up1(x), skip1], dim=1))
        return {"out": self.head(x)}
