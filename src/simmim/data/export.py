"""Write the embedded datasets to disk as PNG folders that `torchvision.datasets.ImageFolder` reads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from simmim.data.fashion_mnist import CLASSES, load_fashion_mnist
from simmim.data.photos import PHOTOS, load_photo

DATASETS = ("fashion-mnist", "photos")

# ImageFolder numbers classes by sorted folder name; the plain names ("ankle_boot", "bag", ...) would
# sort out of label order, so the two-digit label prefix makes folder index i equal label i.
CLASS_FOLDERS: tuple[str, ...] = tuple(
    f"{label:02d}_{re.sub(r'[^a-z0-9-]+', '_', name.lower())}" for label, name in enumerate(CLASSES)
)

# zlib's fastest level: Fashion-MNIST PNGs come out only ~4% larger (~530 bytes) than at PIL's default 6.
_PNG_OPTIONS = {"compress_level": 1}
_PROGRESS_EVERY = 10_000


def _first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` samples of every class, in file order (all samples if None)."""
    if limit is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == cls)[:limit] for cls in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def _export_fashion_mnist(out_dir: Path, limit: int | None, verbose: bool) -> dict[str, int]:
    # The official test split becomes "val": there is no separate validation set.
    splits = {"train": load_fashion_mnist("train"), "val": load_fashion_mnist("test")}
    chosen = {split: _first_per_class(labels, limit) for split, (_, labels) in splits.items()}
    total = sum(len(idx) for idx in chosen.values())
    written = 0
    counts = {}
    for split, (images, labels) in splits.items():
        for folder in CLASS_FOLDERS:
            (out_dir / split / folder).mkdir(parents=True)
        per_class = [0] * len(CLASSES)
        for i in chosen[split]:
            label = int(labels[i])
            per_class[label] += 1
            # Numbered within the class in file order, so ImageFolder's sorted listing keeps that order.
            path = out_dir / split / CLASS_FOLDERS[label] / f"{per_class[label]:05d}.png"
            Image.fromarray(images[i]).save(path, **_PNG_OPTIONS)
            written += 1
            if verbose and (written % _PROGRESS_EVERY == 0 or written == total):
                print(f"fashion-mnist: {written}/{total} images written", flush=True)
        counts[split] = len(chosen[split])
    return counts


def _export_photos(out_dir: Path, limit: int | None, verbose: bool) -> dict[str, int]:
    names = PHOTOS if limit is None else PHOTOS[:limit]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        load_photo(name).save(out_dir / f"{name}.png", **_PNG_OPTIONS)
    if verbose:
        print(f"photos: {len(names)} images written to {out_dir}", flush=True)
    return {"unlabeled": len(names)}


def export_dataset(
    name: str, out_dir: str | Path, limit_per_class: int | None = None, verbose: bool = False
) -> dict[str, int]:
    """Write dataset `name` under `out_dir` and return the number of images per split.

    "fashion-mnist": `out_dir/{train,val}/<NN_class>/00001.png`, val being the official test split.
    "photos": `out_dir/<photo>.png`, one flat unlabeled folder (the photos count as a single class
    for `limit_per_class`). `out_dir` must be absent or empty so no stale images from an earlier
    export get mixed in."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; remove it or choose another folder")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class={limit_per_class} must be at least 1")
    if name == "fashion-mnist":
        return _export_fashion_mnist(out_dir, limit_per_class, verbose)
    return _export_photos(out_dir, limit_per_class, verbose)
