"""Fashion-MNIST read straight from Debian's `dataset-fashion-mnist` package (IDX files, no download)."""

from __future__ import annotations

import copy
import gzip
import math
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SIMMIM_FASHION_MNIST_DIR"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SPLITS = {"train": "train", "test": "t10k"}
IMAGE_MAGIC = 0x00000803  # 2051: uint8, 3 dims
LABEL_MAGIC = 0x00000801  # 2049: uint8, 1 dim

# IDX type codes (third magic byte); all multi-byte types are stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, magic: int | None = None, count: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped if the name ends in `.gz`) into a native-endian array.

    `magic`, when given, is the exact magic number the file must carry (e.g. 2051 for images).
    `count`, when given, reads only the first `count` items: the rest of the file is neither
    decompressed nor checked, so a few images cost a few images' worth of work."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as file:
            head = file.read(4)
            if len(head) < 4:
                raise UsageError(f"{path}: {len(head)} bytes, too short for an IDX header (expected at least 4)")
            found, code, ndim = int.from_bytes(head, "big"), head[2], head[3]
            if head[:2] != b"\0\0" or code not in _IDX_DTYPES or ndim == 0:
                raise UsageError(
                    f"{path}: bad IDX magic 0x{found:08x} (expected 0x0000TTDD, TT a type code, DD dims)"
                )
            if magic is not None and found != magic:
                raise UsageError(f"{path}: IDX magic {found} (expected {magic})")
            dims = file.read(4 * ndim)
            header = 4 + 4 * ndim
            if len(dims) < 4 * ndim:
                raise UsageError(f"{path}: truncated IDX header ({4 + len(dims)} bytes, expected {header} "
                                 f"for {ndim} dims)")
            shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
            dtype = _IDX_DTYPES[code]
            expected = header + math.prod(shape) * dtype.itemsize
            if count is not None:
                shape = (min(count, shape[0]), *shape[1:])
            body = file.read(math.prod(shape) * dtype.itemsize)
            extra = file.read(1) if count is None else b""  # a whole file must end there
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        # gzip reports truncation as EOFError and garbage as BadGzipFile; callers want one error type.
        raise UsageError(f"{path}: not a readable gzip IDX file ({err})") from err
    if len(body) < math.prod(shape) * dtype.itemsize or extra:
        held = f"{header + len(body)}" if not extra else f"more than {expected}"
        raise UsageError(f"{path}: holds {held} bytes, expected {expected} for shape {shape} of {dtype.name}")
    # astype copies, so the result is writable and native-endian (torch.from_numpy needs both).
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _resolve_root(root: str | Path | None) -> Path:
    # The env var is read at call time so it can be set after import (tests, launch scripts).
    if root is not None:
        return Path(root)
    return Path(os.environ.get(ENV_VAR) or FASHION_MNIST_DIR)


def _split_files(split: str, root: str | Path | None) -> tuple[Path, Path, Path]:
    """The folder, image file and label file of a split, which must exist."""
    if split not in SPLITS:
        raise UsageError(f"unknown Fashion-MNIST split {split!r}; choose from {sorted(SPLITS)}")
    folder = _resolve_root(root)
    images_path = folder / f"{SPLITS[split]}-images-idx3-ubyte.gz"
    labels_path = folder / f"{SPLITS[split]}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files {missing} not found in {folder}; "
            f"run `apt-get install dataset-fashion-mnist` or set {ENV_VAR}"
        )
    return folder, images_path, labels_path


def load_labels(split: str, root: str | Path | None = None) -> np.ndarray:
    """Labels `(N,)` int64 of a split, without reading its images."""
    _, _, labels_path = _split_files(split, root)
    labels = read_idx(labels_path, magic=LABEL_MAGIC).astype(np.int64)
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASSES):
        raise UsageError(f"{labels_path}: labels outside 0..{len(CLASSES) - 1}")
    return labels


def load_fashion_mnist(split: str, root: str | Path | None = None,
                       count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images `(N, 28, 28)` uint8 and labels `(N,)` int64 of the "train" (60000) or "test" (10000) split;
    only the first `count` of them if given (the image file is read no further)."""
    folder, images_path, _ = _split_files(split, root)
    labels = load_labels(split, root)[:count]
    images = read_idx(images_path, magic=IMAGE_MAGIC, count=count)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UsageError(
            f"{folder}: {split} images {images.shape} and labels {labels.shape} "
            "(expected (N, 28, 28) images and N labels)"
        )
    return images, labels


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` random samples of every class in `labels`, fixed by `seed`."""
    if per_class < 1:
        raise UsageError(f"per_class={per_class} must be at least 1")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise UsageError(f"class {cls} has {len(members)} images, fewer than the {per_class} asked")
        picked.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picked))


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as `(image, label)` pairs; images are 28x28 RGB PIL images (gray copied to 3 channels)
    so the same transforms as for photographs apply. `indices` restricts it to a subset."""

    def __init__(
        self,
        split: str,
        root: str | Path | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.images, labels = load_fashion_mnist(split, root)
        self.transform = transform
        self.classes = list(CLASSES)
        if indices is None:
            self.indices = np.arange(len(labels))
        else:
            self.indices = np.asarray(indices, dtype=np.int64)
            if self.indices.ndim != 1 or (
                self.indices.size and not 0 <= self.indices.min() <= self.indices.max() < len(labels)
            ):
                raise UsageError(f"indices must be a 1-D sequence within 0..{len(labels) - 1}")
        self.targets = labels[self.indices]

    def subset(self, positions: Sequence[int]) -> FashionMNIST:
        """The items at `positions` of this dataset, sharing its arrays."""
        part = copy.copy(self)
        part.indices, part.targets = self.indices[np.asarray(positions, dtype=np.int64)], self.targets[positions]
        return part

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        gray = self.images[self.indices[index]]
        image = Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
