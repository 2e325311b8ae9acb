"""Training data: image folders and list files read robustly, a resumable seeded sampler, and collates.

Every random choice of the input pipeline comes from the sampler: it yields `(index, seed)` pairs,
the seed fixed by (run seed, epoch, dataset index). The augmentation of a sample and its SimMIM mask
are drawn from that seed, so they do not depend on the worker, the rank or the position in the
epoch; a run resumed mid-epoch or spread over more processes sees exactly the same samples.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import UsageError
from .masking import MaskGenerator

IMAGE_SUFFIXES = (*IMG_EXTENSIONS, ".gif")  # torchvision's list leaves out GIF, which PIL reads
# what PIL raises for files it cannot decode (truncated, not an image, a decompression bomb, ...)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class UnreadableImage(Exception):
    """An image file that could not be decoded, and why."""

    def __init__(self, path: str, reason: str = ""):
        super().__init__(f"{path}: {reason}" if reason else path)
        self.path, self.reason = path, reason


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grays are scaled to 0-255, palettes keep their colors."""
    if image.mode.startswith("I;16"):
        gray = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(gray.round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        if gray.max() > 255:  # 16-bit data that older Pillow opens as 32-bit "I"
            gray = gray / 257.0
        image = Image.fromarray(np.clip(gray, 0, 255).round().astype(np.uint8))
    elif image.mode == "P":  # via RGBA so palette transparency is read (and Pillow does not warn)
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | Path | BinaryIO, name: str | None = None) -> Image.Image:
    """Decodes an image file (or an open binary file, e.g. a tar member's bytes) as RGB, raising
    UnreadableImage, under `name` if given, for anything PIL cannot read."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; such a file is refused all the same
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except DECODE_ERRORS as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, Image.DecompressionBombWarning | Image.DecompressionBombError):
            reason = f"decompression bomb refused ({reason})"
        raise UnreadableImage(name or str(path), reason) from err


class ImageFiles(Dataset):
    """(path, target) pairs decoded on access: `dataset[i] -> (RGB PIL image, target)`."""

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str] = ()):
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return load_rgb(path), target

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        return ImageFiles([self.samples[i] for i in indices], self.classes)


class ClassSubset(Dataset):
    """The samples of some classes of a labelled dataset (one with `targets` and `classes`), labelled
    0..k-1 in the order the classes are named: one domain of a dataset, e.g. Fashion-MNIST's footwear."""

    def __init__(self, source: Dataset, names: Sequence[str], where: str = "data.classes"):
        known = list(source.classes)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}?" if close else "the data's classes: " + ", ".join(known)
                raise UsageError(f"{where}: unknown class {name!r}; {hint}")
        if len(set(names)) != len(names) or not names:
            raise UsageError(f"{where}: expected distinct class names, got {list(names)!r}")
        ids = [known.index(name) for name in names]
        self.source, self.classes = source, list(names)
        self.label = {old: new for new, old in enumerate(ids)}
        targets = np.asarray(source.targets)
        self.indices = np.flatnonzero(np.isin(targets, ids))
        self.targets = [self.label[int(t)] for t in targets[self.indices]]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.source[int(self.indices[index])]
        return image, self.label[target]

    def subset(self, positions: Sequence[int]) -> ClassSubset:
        part = copy.copy(self)
        part.indices = self.indices[np.asarray(positions, dtype=np.int64)]
        part.targets = [self.targets[p] for p in positions]
        return part


def image_folder(root: str | Path) -> ImageFiles:
    """An ImageFolder layout (one subfolder per class) as ImageFiles."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    try:
        folder = ImageFolder(str(root), is_valid_file=lambda p: p.lower().endswith(IMAGE_SUFFIXES))
    except (FileNotFoundError, RuntimeError) as err:  # torchvision: no class folders / no images
        raise FileNotFoundError(f"{root}: expected one subfolder of images per class ({err})") from None
    return ImageFiles(folder.samples, folder.classes)


def image_files(path: str | Path) -> ImageFiles:
    """Unlabelled images: every image below a folder (recursively), or the lines of a list file
    (relative paths are relative to the list file; blank lines and # comments are skipped)."""
    path = Path(path)
    if path.is_file():
        lines = (line.strip() for line in path.read_text().splitlines())
        paths = [p if p.is_absolute() else path.parent / p for p in (Path(s) for s in lines if s and s[0] != "#")]
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    else:
        raise FileNotFoundError(f"no image folder or list file at {path}")
    if not paths:
        raise FileNotFoundError(f"{path}: no images found (extensions: {', '.join(IMAGE_SUFFIXES)})")
    return ImageFiles([(str(p), 0) for p in paths])


def require_readable(source: Dataset, where: str) -> None:
    """Decodes items of `source` until one succeeds (usually the first): a dataset with no readable image
    fails here, naming `where`, instead of in the middle of a step or as a batch size too large."""
    for index in range(len(source)):
        try:
            source[index]
            return
        except UnreadableImage:
            continue
    raise UsageError(f"{where}: none of its {len(source)} images could be decoded ({len(source)} skipped; "
                     f"`simmim verify-data {where}` names each and why)")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds the CPU generators that transforms use (torch, numpy, random) and restores them after, so
    a transform is a function of the seed and the caller's random streams are untouched."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed the GPUs too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class SeededSamples(Dataset):
    """Wraps a dataset of (PIL image, target): `dataset[(index, seed)] -> (tensor, target, seed, skipped)`.

    The transform runs under `seeded(seed)` (plain integer keys run it unseeded). An image that fails
    to decode is replaced by the next readable one, deterministically, and its path returned in
    `skipped` so the run can count and list it whichever worker process read it."""

    def __init__(self, source: Dataset, transform: Callable[[Image.Image], torch.Tensor]):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int | None, tuple[str, ...]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped: list[str] = []
        for offset in range(len(self.source)):
            try:
                image, target = self.source[(index + offset) % len(self.source)]
                break
            except UnreadableImage as err:
                skipped.append(err.path)
        else:
            raise RuntimeError(f"none of the {len(self.source)} images could be decoded")
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            tensor = self.transform(image)
        return tensor, target, seed, tuple(skipped)


def derive_seed(*entropy: int) -> int:
    """A 32-bit seed mixed from non-negative integers, e.g. (run seed, epoch, sample index)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class EpochSampler(Sampler):
    """One rank's share of an epoch as `(index, sample seed)` pairs.

    Training (`shuffle=True`): a permutation fixed by (seed, epoch), rank r taking every world-th item
    from r, cut to whole batches, so the ranks' k-th batches together are exactly the k-th batch of
    one process with world x the batch. `set_epoch(epoch, start_batch)` skips batches already consumed.
    Evaluation (`shuffle=False`): the dataset in order, rank r taking r, r+world, ...; shards are padded
    by wrapping around so every rank runs the same number of batches (`real_count` says how many count).
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, batch_multiple: int = 1):
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if shuffle:  # whole batches, and whole groups of `batch_multiple` (gradient accumulation)
            self.batches = (size // world_size) // batch_size // batch_multiple * batch_multiple
        else:
            self.batches = -(-self.padded_count // batch_size)

    @property
    def real_count(self) -> int:
        """Samples of this rank that are not padding (evaluation)."""
        return len(range(self.rank, self.size, self.world_size))

    @property
    def padded_count(self) -> int:
        return -(-self.size // self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.indices())

    def indices(self) -> list[int]:
        if not self.shuffle:
            own = list(range(self.rank, self.size, self.world_size))
            return (own + list(range(self.padded_count - len(own))))[: self.padded_count]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        own = order[self.rank::self.world_size][: self.batches * self.batch_size]
        return own[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices():
            yield index, derive_seed(self.seed, self.epoch, index)


def collate_labelled(samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """-> images (B, 3, H, W), targets (B,), paths of images skipped while reading."""
    images = torch.stack([s[0] for s in samples])
    targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return images, targets, [path for s in samples for path in s[3]]


class MaskCollate:
    """Pretraining collate: -> images (B, 3, H, W), masks (B, h, w) with a fresh mask per sample
    drawn from the sample's seed, paths of images skipped while reading."""

    def __init__(self, generator: MaskGenerator):
        self.generator = generator

    def __call__(self, samples: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        images = torch.stack([s[0] for s in samples])
        masks = torch.stack([self.generator(np.random.default_rng(None if s[2] is None else [s[2], 1]))
                             for s in samples])
        return images, masks, [path for s in samples for path in s[3]]


def cpus_per_rank(local_world_size: int = 1) -> int:
    """CPU cores this process may use when `local_world_size` processes share the machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(local_world_size, 1))


def loader_settings(num_workers: int | None, device: torch.device, local_world_size: int = 1) -> dict[str, Any]:
    """DataLoader keywords: workers min(8, CPUs per rank - 1) unless given, pinned memory only for
    CUDA, workers kept alive between epochs."""
    if num_workers is None:
        num_workers = max(0, min(8, cpus_per_rank(local_world_size) - 1))
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)
