"""Pictures people look at: reconstruction grids and loss curves, written as PNG."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize
from .models.simmim import upsample_mask

# each panel's titles, longest first: a grid shows the longest that fits its panel width
PANELS = (("original", "input"), ("masked",), ("reconstruction", "recon."), ("visible + reconstruction", "pasted"))
GAP = 4


def reconstruction_panels(images: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor,
                          patch_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1]: original | masked (grey) | reconstruction | reconstruction pasted
    into the masked patches of the original."""
    pixel_mask = upsample_mask(mask, images.shape[-2:], patch_size).to(images.dtype)
    original = denormalize(images, mean, std)
    rec = denormalize(reconstruction.to(images.dtype), mean, std)
    masked = original * (1 - pixel_mask) + 0.5 * pixel_mask
    pasted = original * (1 - pixel_mask) + rec * pixel_mask
    return torch.stack([original, masked, rec, pasted], dim=1)


def fitting_title(draw: ImageDraw.ImageDraw, titles: str | Sequence[str], width: int) -> str:
    """The first (longest) of `titles` that fits `width` pixels, else the shortest."""
    titles = (titles,) if isinstance(titles, str) else titles
    return next((t for t in titles if draw.textlength(t) <= width), titles[-1])


def save_grid(panels: torch.Tensor, path: str | Path, titles: Sequence[str | Sequence[str]] = PANELS,
              scale: int = 1) -> Path:
    """Writes (rows, cols, 3, H, W) panels in [0, 1] as one PNG with a title row; a title may be a
    sequence of alternatives, longest first."""
    rows, cols, _, h, w = panels.shape
    h, w = h * scale, w * scale
    title_h = 14
    canvas = Image.new("RGB", (cols * (w + GAP) + GAP, title_h + rows * (h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles[:cols]):
        draw.text((GAP + c * (w + GAP), 1), fitting_title(draw, title, w), fill="black")
    pixels = (panels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = Image.fromarray(pixels[r, c].permute(1, 2, 0).numpy())
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            canvas.paste(tile, (GAP + c * (w + GAP), title_h + GAP + r * (h + GAP)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


@contextlib.contextmanager
def _figure(path: str | Path, size: tuple[float, float], xlabel: str, ylabel: str, title: str,
            legend_outside: bool = False):
    """Yields the axes of a new headless matplotlib figure, then labels it and writes it as PNG; the legend
    goes right of the axes where it would hide bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    yield ax
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if legend_outside else {}))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_curves(curves: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]], path: str | Path,
                xlabel: str = "step", ylabel: str = "loss", title: str = "") -> Path:
    """Line plot of named series as PNG; a series is its y values (at x = 1, 2, ...) or (xs, ys)."""
    with _figure(path, (6, 4), xlabel, ylabel, title) as ax:
        for name, series in curves.items():
            xs, ys = series if isinstance(series, tuple) else (np.arange(1, len(series) + 1), series)
            ax.plot(xs, ys, label=name)
        ax.grid(alpha=0.3)
    return Path(path)


def save_bars(groups: dict[str, dict[str, tuple[float, float]]], path: str | Path, ylabel: str = "",
              title: str = "") -> Path:
    """Grouped bar chart with error bars, {group: {bar: (value, spread)}}, as PNG."""
    bars = list(dict.fromkeys(b for group in groups.values() for b in group))
    width = 0.8 / len(bars)
    with _figure(path, (max(6, 1.2 * len(bars) * len(groups)), 4), "", ylabel, title, legend_outside=True) as ax:
        for i, bar in enumerate(bars):
            values = [groups[g].get(bar, (np.nan, 0.0)) for g in groups]
            ax.bar(np.arange(len(groups)) + i * width, [v for v, _ in values], width,
                   yerr=[e for _, e in values], capsize=3, label=bar)
        ax.set_xticks(np.arange(len(groups)) + width * (len(bars) - 1) / 2, list(groups))
        lows = [v - e for group in groups.values() for v, e in group.values()]
        ax.set_ylim(max(0.0, min(lows) - 5), None)
        ax.grid(axis="y", alpha=0.3)
    return Path(path)
