"""A run's model, datasets, transforms and loaders, built from its config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import AugmentConfig, TrainConfig
from ..data.datasets import (
    ClassSubset,
    EpochSampler,
    SeededSamples,
    image_files,
    image_folder,
    loader_settings,
    require_readable,
)
from ..data.fashion_mnist import FashionMNIST, balanced_subset
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, patch_posterize
from ..data.webdataset import INDEX_NAME, ShardedImages, ShardSampler, looks_like_shards, sharded_images
from ..errors import BadArgument, UsageError
from ..zoo import get_spec
from ..zoo.runs import run_network
from .distributed import DistEnv

FASHION_MNIST = "fashion-mnist"


def first(dataset: Dataset | None, count: int | None) -> Dataset | None:
    """The first `count` items of a dataset (all of it for None)."""
    if dataset is None or count is None or count >= len(dataset):
        return dataset
    if isinstance(dataset, ShardedImages):  # stays sharded, so the sampler can keep reading shard by shard
        return dataset.first(count)
    subset = Subset(dataset, range(count))
    if hasattr(dataset, "classes"):  # the label names survive the cut
        subset.classes = dataset.classes
    return subset


def img_size(cfg: TrainConfig) -> int:
    return cfg.model.img_size or get_spec(cfg.model.name).img_size


def build_network(cfg: TrainConfig, num_classes: int | None = None) -> nn.Module:
    """The pure model of a run (SimMIM or Classifier) with random weights."""
    try:
        return run_network(cfg.to_dict(), num_classes)
    except BadArgument as err:  # a setting the architecture does not have, e.g. window_size for a ViT
        raise BadArgument(f"model: {err}") from None


def train_transform(aug: AugmentConfig, size: int) -> Callable:
    """timm's ImageNet training transform: RandomResizedCrop + flip (+ RandAugment, color jitter,
    random erasing), normalized with the ImageNet mean and std."""
    return patch_posterize(create_transform(
        size, is_training=True, scale=aug.crop_scale, ratio=aug.crop_ratio, hflip=aug.hflip,
        color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment, interpolation=aug.interpolation,
        re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD))


def only(dataset: Dataset, classes: tuple[str, ...] | None) -> Dataset:
    """The images of `classes` (data.classes) of a labelled dataset, or all of it for None."""
    if not classes:
        return dataset
    if isinstance(dataset, ShardedImages):
        raise UsageError("data.classes: needs an image folder or fashion-mnist (WebDataset shards are read in "
                         "shard order, not by class)")
    return ClassSubset(dataset, classes)


def unlabelled_source(path: str, classes: tuple[str, ...] | None = None) -> Dataset:
    """Pretraining images: Fashion-MNIST's train split, DIR/train if there is one, else every image
    below DIR, or the images of a list file; WebDataset shards (a .tar, a brace pattern, a folder of
    .tar files) where the path or DIR/train names them. With `classes`, those classes' images only
    (DIR/train, or DIR, then needs one subfolder per class)."""
    if path == FASHION_MNIST:
        return only(FashionMNIST("train"), classes)
    root = Path(path)
    root = root / "train" if (root / "train").is_dir() else root
    if looks_like_shards(root):
        return only(sharded_images(root), classes)
    return only(image_folder(root), classes) if classes else image_files(root)


def heldout_source(path: str, classes: tuple[str, ...] | None = None) -> Dataset | None:
    """Images kept out of pretraining to measure reconstruction on: Fashion-MNIST's test split or
    DIR/val (of `classes` only, if given); None when there are none."""
    if path == FASHION_MNIST:
        return only(FashionMNIST("test"), classes)
    val = Path(path) / "val"
    if not val.is_dir():
        return None
    if looks_like_shards(val):
        return only(sharded_images(val), classes)
    return only(image_folder(val), classes) if classes else image_files(val)


def labelled_source(path: str, split: str, labels_per_class: int | None = None, seed: int = 0,
                    classes: tuple[str, ...] | None = None, key: str = "data.labels_per_class") -> Dataset:
    """Classification images of a split ('train' or 'val'): Fashion-MNIST (its test split as 'val') or
    DIR/<split>/<class>/*, of `classes` only if given; optionally a balanced subset of
    `labels_per_class` images per class (`key` names that setting in errors)."""
    if path == FASHION_MNIST:
        where = f"{path} {'train' if split == 'train' else 'test'}"
        dataset = only(FashionMNIST("train" if split == "train" else "test"), classes)
    else:
        root = Path(path) / split
        if not root.is_dir():
            raise FileNotFoundError(f"data.path: {root} not found; expected {path}/{split}/<class>/<images> "
                                    "(or --data fashion-mnist)")
        if looks_like_shards(root):
            if labels_per_class:
                raise UsageError(f"{key}: needs an image folder or fashion-mnist (WebDataset shards "
                                 "are read in shard order, not by class)")
            return only(labelled_shards(root), classes)
        where, dataset = str(root), only(image_folder(root), classes)
    if labels_per_class:
        dataset = dataset.subset(_balanced(np.asarray(dataset.targets), labels_per_class, seed, key, where).tolist())
    return dataset


def _balanced(targets: np.ndarray, per_class: int, seed: int, key: str, where: str) -> np.ndarray:
    try:
        return balanced_subset(targets, per_class, seed)
    except UsageError as err:  # the subset's own words, with the setting that asked for it
        raise UsageError(f"{key}: {err} ({where})") from None


def eval_source(path: str, classes: tuple[str, ...] | None = None) -> Dataset:
    """Images to evaluate on: Fashion-MNIST's test split, DIR/val if there is one, else DIR itself; of
    `classes` only if given."""
    if path == FASHION_MNIST:
        return only(FashionMNIST("test"), classes)
    root = Path(path)
    root = root / "val" if (root / "val").is_dir() else root
    return only(labelled_shards(root) if looks_like_shards(root) else image_folder(root), classes)


def labelled_shards(root: Path) -> ShardedImages:
    """Shards of labelled samples (.cls or .json labels) whose shard index names the classes."""
    dataset = sharded_images(root)
    if not dataset.classes:
        raise UsageError(f"{root}: the shards name no classes ('classes' in {INDEX_NAME}, as simmim "
                         "export-dataset writes it); classification needs them")
    return dataset


def train_loader(dataset: SeededSamples, collate: Callable, cfg: TrainConfig, env: DistEnv,
                 num_workers: int | None = None) -> tuple[DataLoader, EpochSampler]:
    """This rank's training loader with `num_workers` workers (None: loader_settings' default); the
    sampler decides order, shards, resume position and seeds."""
    require_readable(dataset.source, cfg.data.path)
    if isinstance(dataset.source, ShardedImages):  # read shard by shard, mixed within a bounded buffer
        sampler: EpochSampler = ShardSampler(dataset.source.counts, cfg.data.batch_size, env.rank, env.world_size,
                                             cfg.runtime.seed, cfg.optim.accumulation_steps, cfg.data.shuffle_buffer)
    else:
        sampler = EpochSampler(len(dataset), cfg.data.batch_size, env.rank, env.world_size, cfg.runtime.seed,
                               shuffle=True, batch_multiple=cfg.optim.accumulation_steps)
    if sampler.batches == 0:
        need = cfg.data.batch_size * env.world_size * cfg.optim.accumulation_steps
        raise UsageError(f"data.path: {len(dataset)} images are fewer than one step of {need} "
                         "(data.batch_size x processes x optim.accumulation_steps)")
    # the loader gets a generator of its own, so creating an iterator never draws from the global
    # stream (a resumed run would otherwise draw at another point than the uninterrupted one)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=collate,
                        generator=torch.Generator(), **loader_settings(num_workers, env.device, env.local_world_size))
    return loader, sampler


def eval_loader(dataset: SeededSamples, collate: Callable, batch_size: int, env: DistEnv,
                num_workers: int | None) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(dataset), batch_size, env.rank, env.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        **loader_settings(num_workers, env.device, env.local_world_size))
    return loader, sampler
