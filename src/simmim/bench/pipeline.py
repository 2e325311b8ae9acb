"""Throughput of the pretraining input pipeline on real photographs: JPEG decode, RandomResizedCrop,
flip, normalize and mask generation, per worker and through a DataLoader with the default workers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import AugmentConfig
from ..data.datasets import ImageFiles, MaskCollate, SeededSamples, derive_seed, loader_settings
from ..data.masking import MaskGenerator
from ..data.photos import PHOTOS, load_photo
from ..engine.builders import train_transform


def write_jpegs(folder: Path, quality: int = 90) -> list[Path]:
    """The scikit-image photographs as JPEG files (what an ImageNet-style folder holds)."""
    paths = [folder / f"{name}.jpg" for name in PHOTOS]
    for name, path in zip(PHOTOS, paths, strict=True):
        load_photo(name).save(path, quality=quality)
    return paths


def _dataset(paths: list[Path], images: int, size: int) -> tuple[SeededSamples, list[tuple[int, int]]]:
    files = ImageFiles([(str(paths[i % len(paths)]), 0) for i in range(images)])
    keys = [(i, derive_seed(0, i)) for i in range(images)]
    # the transform pretraining runs build (the augment defaults are the official pretraining recipe)
    return SeededSamples(files, train_transform(AugmentConfig(), size)), keys


def throughput(images: int = 128, size: int = 192, batch_size: int = 8, workers: int | None = None) -> dict:
    """Images/s of one worker (the pipeline in this process) and of a DataLoader with `workers`
    processes (None: the training default, min(8, CPUs - 1))."""
    collate = MaskCollate(MaskGenerator(size, 32, 4, 0.6))
    settings = loader_settings(workers, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        dataset, keys = _dataset(write_jpegs(Path(tmp)), images, size)
        start = time.perf_counter()
        for i in range(0, images, batch_size):
            collate([dataset[key] for key in keys[i:i + batch_size]])
        per_worker = images / (time.perf_counter() - start)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=collate, **settings)
        start = time.perf_counter()
        for _ in loader:  # includes starting the workers, as every epoch of a short run does
            pass
        loaded = images / (time.perf_counter() - start)
    return {"images": images, "size": size, "batch_size": batch_size, "workers": settings["num_workers"],
            "per_worker_images_per_s": per_worker, "loader_images_per_s": loaded}
