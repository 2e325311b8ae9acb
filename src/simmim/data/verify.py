"""`simmim verify-data`: check every image of a dataset before a long run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import UnreadableImage, image_files, load_rgb
from .webdataset import ShardedImages, looks_like_shards, sharded_images


@dataclass
class VerifyReport:
    """Files checked and the unusable ones, each with the reason."""

    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)


def verify_images(root: str | Path, progress_every: int = 5000) -> VerifyReport:
    """Decodes every image below `root` (recursively; or the files of a list file; or every sample of
    WebDataset shards) as training would."""
    if looks_like_shards(root):
        return verify_shards(sharded_images(root), progress_every)
    paths = [path for path, _ in image_files(root).samples]
    report = VerifyReport()
    for i, path in enumerate(paths, 1):
        report.checked += 1
        try:
            if os.path.getsize(path) == 0:
                report.bad.append((path, "empty file"))
            else:
                load_rgb(path)
        except UnreadableImage as err:
            report.bad.append((path, err.reason))
        except OSError as err:  # e.g. a list file naming a file that is gone
            report.bad.append((path, err.strerror or type(err).__name__))
        if progress_every and i % progress_every == 0:
            print(f"checked {i:,}/{len(paths):,} ({len(report.bad)} unusable so far)", flush=True)
    return report


def verify_shards(dataset: ShardedImages, progress_every: int = 5000) -> VerifyReport:
    """Decodes every sample of the shards; unusable ones are named SHARD:KEY."""
    report = VerifyReport()
    for i in range(len(dataset)):
        report.checked += 1
        try:
            dataset[i]
        except UnreadableImage as err:
            report.bad.append((err.path, err.reason))
        if progress_every and report.checked % progress_every == 0:
            print(f"checked {report.checked:,}/{len(dataset):,} ({len(report.bad)} unusable so far)", flush=True)
    return report
