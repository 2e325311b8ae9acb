"""Throughput of the pretraining input pipeline, per worker and through a DataLoader with the default
workers: on real photographs (JPEG decode, RandomResizedCrop, flip, normalize, masks), and the demo's
(Fashion-MNIST, its preset's transform) beside the demo step's consumption in bf16."""

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


def _rates(dataset: SeededSamples, keys: list, collate: MaskCollate, batch_size: int,
           workers: int | None) -> dict:
    """Images/s of one worker (the pipeline in this process) and of a DataLoader with `workers` processes
    (None: the training default, min(8, CPUs - 1)), over `keys`."""
    settings = loader_settings(workers, torch.device("cpu"))
    start = time.perf_counter()
    for i in range(0, len(keys), batch_size):
        collate([dataset[key] for key in keys[i:i + batch_size]])
    per_worker = len(keys) / (time.perf_counter() - start)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=keys, collate_fn=collate, **settings)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()  # the workers' start, paid once per epoch, is reported apart
    for _ in batches:
        pass
    loaded = (len(keys) - batch_size) / (time.perf_counter() - first)
    return {"images": len(keys), "batch_size": batch_size, "workers": settings["num_workers"],
            "per_worker_images_per_s": per_worker, "loader_images_per_s": loaded, "first_batch_s": first - start}


def throughput(images: int = 128, size: int = 192, batch_size: int = 8, workers: int | None = None) -> dict:
    """Images/s of the pipeline on JPEG photographs (`_rates`)."""
    collate = MaskCollate(MaskGenerator(size, 32, 4, 0.6))
    with tempfile.TemporaryDirectory() as tmp:
        dataset, keys = _dataset(write_jpegs(Path(tmp)), images, size)
        return {"size": size, **_rates(dataset, keys, collate, batch_size, workers)}


def demo_throughput(batches: int = 8, steps: int = 3, precision: str = "bf16") -> dict:
    """The demo's pretraining input (Fashion-MNIST through its preset's transform and masks, its batch and
    default workers) against the demo model's training step in `precision` on the same batches."""
    from ..config import load_config
    from ..data.fashion_mnist import FashionMNIST
    from ..demo import PRETRAIN_PRESET
    from ..engine.builders import build_network, img_size
    from ..measure import training_step

    cfg = load_config(PRETRAIN_PRESET)
    size, batch_size = img_size(cfg), cfg.data.batch_size
    torch.manual_seed(0)
    model = build_network(cfg)
    collate = MaskCollate(model.mask_generator)
    dataset = SeededSamples(FashionMNIST("train"), train_transform(cfg.augment, size))
    keys = [(i, derive_seed(0, i)) for i in range(batches * batch_size)]
    rates = _rates(dataset, keys, collate, batch_size, cfg.data.num_workers)
    images, masks = collate([dataset[key] for key in keys[:batch_size]])[:2]
    optimizer = torch.optim.AdamW(model.parameters())
    step = training_step(model, optimizer, lambda: model(images, masks).loss, precision, torch.device("cpu"))
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    consumed = steps * batch_size / (time.perf_counter() - start)
    return {"preset": PRETRAIN_PRESET, "size": size, "precision": precision, "threads": torch.get_num_threads(),
            "step_images_per_s": consumed, **rates, "keeps_up": rates["loader_images_per_s"] > consumed}
