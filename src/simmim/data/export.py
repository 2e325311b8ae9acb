"""Write the embedded datasets to disk as PNG folders that `torchvision.datasets.ImageFolder` reads, or
them (or any image folder) as WebDataset tar shards."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from simmim.data.datasets import IMAGE_SUFFIXES, ImageFiles, image_files, image_folder
from simmim.data.fashion_mnist import CLASSES, load_fashion_mnist, load_labels
from simmim.data.photos import PHOTOS, load_photo
from simmim.data.webdataset import write_shards

from ..errors import UsageError

DATASETS = ("fashion-mnist", "photos")
FORMATS = ("folder", "webdataset")
Sample = tuple[str, dict[str, bytes]]  # a WebDataset sample: key, {extension: bytes}

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


def _fashion_mnist_chosen(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images and labels of a split up to its last chosen sample (the image file is read no further, so
    a limit costs what it writes), and the chosen indices: the first `limit` samples of every class."""
    chosen = _first_per_class(load_labels(split), limit)
    images, labels = load_fashion_mnist(split, count=None if limit is None else int(chosen.max(initial=-1)) + 1)
    return images, labels, chosen


def _export_fashion_mnist(out_dir: Path, limit: int | None, verbose: bool) -> dict[str, int]:
    # The official test split becomes "val": there is no separate validation set.
    splits = {"train": _fashion_mnist_chosen("train", limit), "val": _fashion_mnist_chosen("test", limit)}
    chosen = {split: indices for split, (*_, indices) in splits.items()}
    total = sum(len(idx) for idx in chosen.values())
    written = 0
    counts = {}
    for split, (images, labels, _) in splits.items():
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


def _png(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **_PNG_OPTIONS)
    return buffer.getvalue()


def _numbered(members: Iterator[dict[str, bytes]]) -> Iterator[Sample]:
    """Samples keyed 0000000, 0000001, ... in order."""
    return ((f"{n:07d}", sample) for n, sample in enumerate(members))


def _labelled_pngs(images: np.ndarray, labels: np.ndarray, chosen: np.ndarray) -> Iterator[dict[str, bytes]]:
    # a function, not a generator expression in the loop below: that would read the loop's variables
    # when consumed, i.e. give every split the last split's images
    return ({"png": _png(images[i]), "cls": str(int(labels[i])).encode()} for i in chosen)


def _fashion_mnist_splits(limit: int | None) -> dict[str, tuple[Iterator[Sample], list[str]]]:
    splits = {}
    for split, source in (("train", "train"), ("val", "test")):
        splits[split] = _numbered(_labelled_pngs(*_fashion_mnist_chosen(source, limit))), list(CLASSES)
    return splits


def _folder_samples(files: ImageFiles, labelled: bool) -> Iterator[Sample]:
    """The files' bytes as they are (no re-encoding), with their class as .cls if labelled."""
    for path, target in files.samples:
        sample = {Path(path).suffix.lower().lstrip("."): Path(path).read_bytes()}
        if labelled:
            sample["cls"] = str(target).encode()
        yield sample


def _folder_splits(root: Path) -> dict[str, tuple[Iterator[Sample], list[str]]]:
    """ROOT/train and ROOT/val if there are, else ROOT as train; a split whose images all sit in
    subfolders is labelled by subfolder (ImageFolder), any other is unlabelled."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: expected fashion-mnist, photos or an image folder")
    splits = {}
    for split, folder in ({s: root / s for s in ("train", "val") if (root / s).is_dir()} or {"train": root}).items():
        entries = list(folder.iterdir())
        labelled = any(p.is_dir() for p in entries) and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)
        files = image_folder(folder) if labelled else image_files(folder)
        splits[split] = _numbered(_folder_samples(files, labelled)), files.classes
    return splits


def export_shards(name: str, out_dir: str | Path, shard_size: int, limit_per_class: int | None = None,
                  verbose: bool = False) -> dict[str, int]:
    """Write fashion-mnist, photos or an image folder as WebDataset shards: `out_dir/<split>/<split>-000000.tar`
    ... with `shardindex.json` (sample counts, class names) per split; returns the samples per split."""
    if name == "fashion-mnist":
        splits = _fashion_mnist_splits(limit_per_class)
    elif name == "photos":
        names = PHOTOS if limit_per_class is None else PHOTOS[:limit_per_class]
        splits = {"train": (_numbered({"png": _png(load_photo(n))} for n in names), [])}
    elif limit_per_class is not None:
        raise UsageError("limit_per_class: only for fashion-mnist and photos")
    else:
        splits = _folder_splits(Path(name))
    return {split: sum(write_shards(samples, Path(out_dir) / split, split, shard_size, classes, verbose))
            for split, (samples, classes) in splits.items()}


def export_dataset(
    name: str, out_dir: str | Path, limit_per_class: int | None = None, verbose: bool = False,
    format: str = "folder", shard_size: int = 10_000,
) -> dict[str, int]:
    """Write dataset `name` under `out_dir` and return the number of images per split.

    "fashion-mnist": `out_dir/{train,val}/<NN_class>/00001.png`, val being the official test split.
    "photos": `out_dir/<photo>.png`, one flat unlabeled folder (the photos count as a single class
    for `limit_per_class`). `format="webdataset"`: tar shards of `shard_size` samples instead (see
    `export_shards`; `name` may then also be an image folder). `out_dir` must be absent or empty so
    no stale images from an earlier export get mixed in."""
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if name not in DATASETS and format == "folder":
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} (or an image folder "
                         "with --format webdataset)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; remove it or choose another folder")
    if limit_per_class is not None and limit_per_class < 1:
        raise UsageError(f"limit_per_class={limit_per_class} must be at least 1")
    if format == "webdataset":
        return export_shards(name, out_dir, shard_size, limit_per_class, verbose)
    if name == "fashion-mnist":
        return _export_fashion_mnist(out_dir, limit_per_class, verbose)
    return _export_photos(out_dir, limit_per_class, verbose)
