"""Detection and segmentation mosaics of Fashion-MNIST items, with exact labels.

Each canvas holds a few items pasted at random positions and sizes on black; the items' squares do not
overlap, so every item's mask (its pixels above a threshold), tight box and class are exact. A mosaic is
a pure function of (seed, index): the same settings give the same images in any order, in any process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from .fashion_mnist import CLASSES, load_fashion_mnist


@dataclass(frozen=True)
class MosaicConfig:
    """How the canvases are drawn."""

    canvas: int = 96
    """Side of the square canvas in pixels."""
    items: tuple[int, int] = (2, 4)
    """Fewest and most items per canvas (fewer when no free place is found in `tries`)."""
    sizes: tuple[int, int] = (24, 48)
    """Smallest and largest side of a pasted item in pixels (Fashion-MNIST's are 28)."""
    threshold: int = 24
    """An item's pixel belongs to its mask above this grey level (0-255); the black surround does not."""
    tries: int = 30
    """Random positions tried per item before it is left out."""

    def __post_init__(self):
        lo, hi = self.sizes
        if not 1 <= self.items[0] <= self.items[1]:
            raise UsageError(f"items={self.items}: expected 1 <= fewest <= most")
        if not 4 <= lo <= hi <= self.canvas:
            raise UsageError(f"sizes={self.sizes}: expected 4 <= smallest <= largest <= canvas ({self.canvas})")
        if not 0 <= self.threshold < 255:
            raise UsageError(f"threshold={self.threshold}: expected a grey level in 0..254")


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x, y, s, _ = box
    return any(x < px + ps and px < x + s and y < py + ps and py < y + s for px, py, ps, _ in placed)


def draw_mosaic(images: np.ndarray, labels: np.ndarray, cfg: MosaicConfig, seed: int,
                index: int) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """Mosaic `index` of `seed`: a (canvas, canvas) uint8 grey image and its items as (bool mask, class)."""
    rng = np.random.default_rng([seed, index])
    canvas = np.zeros((cfg.canvas, cfg.canvas), np.uint8)
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(cfg.items[0], cfg.items[1] + 1))):
        item, size = int(rng.integers(len(images))), int(rng.integers(cfg.sizes[0], cfg.sizes[1] + 1))
        for _ in range(cfg.tries):
            x, y = (int(v) for v in rng.integers(0, cfg.canvas - size + 1, 2))
            if not _overlaps((x, y, size, item), placed):
                placed.append((x, y, size, item))
                break
    items = []
    for x, y, size, item in placed:
        pixels = np.asarray(Image.fromarray(images[item]).resize((size, size), Image.BILINEAR))
        canvas[y:y + size, x:x + size] = pixels
        mask = np.zeros_like(canvas, bool)
        mask[y:y + size, x:x + size] = pixels > cfg.threshold
        if mask.any():
            items.append((mask, int(labels[item])))
    return canvas, items


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight (x1, y1, x2, y2) box of a mask in torchvision's convention (x2, y2 one past the last pixel)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


class FashionMosaics(torch.utils.data.Dataset):
    """`count` mosaics of one Fashion-MNIST split's items -> (image (3, H, W) in [0, 1], target) with the
    target as torchvision's detectors take it (boxes (K, 4) float, labels (K,) int64 with 0 the
    background, masks (K, H, W) uint8) plus `semantic` (H, W) int64, the class map of the same labels."""

    classes = ("background", *CLASSES)

    def __init__(self, split: str, count: int, cfg: MosaicConfig = MosaicConfig(), seed: int = 0,
                 root: str | None = None, pool: int | None = None):
        self.images, self.labels = load_fashion_mnist(split, root, pool)
        self.count, self.cfg, self.seed = count, cfg, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.count:
            raise IndexError(f"mosaic {index} of {self.count}")
        canvas, items = draw_mosaic(self.images, self.labels, self.cfg, self.seed, index)
        semantic = np.zeros(canvas.shape, np.int64)
        for mask, label in items:
            semantic[mask] = label + 1
        size = (0, *canvas.shape)
        target = {
            "boxes": torch.tensor([mask_box(m) for m, _ in items], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label + 1 for _, label in items], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack([m for m, _ in items]).astype(np.uint8)) if items
            else torch.zeros(size, dtype=torch.uint8),
            "semantic": torch.from_numpy(semantic),
        }
        image = torch.from_numpy(canvas).float().div_(255).expand(3, -1, -1).contiguous()
        return image, target


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Lists of images and targets, as torchvision's detectors take them."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
