"""`simmim verify-data`: check every image of a dataset before a long run."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import UnreadableImage, image_files, load_rgb
from .webdataset import looks_like_shards, sharded_images


@dataclass
class VerifyReport:
    """Files checked and the unusable ones, each with the reason."""

    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)


def verify_images(root: str | Path, progress_every: int = 5000) -> VerifyReport:
    """Decodes every image below `root` (recursively; or the files of a list file; or every sample of
    WebDataset shards, named SHARD:KEY, including the DIR/train and DIR/val folders of shards that
    training reads) as training would."""
    splits = [Path(root) / split for split in ("train", "val") if (Path(root) / split).is_dir()]
    if not looks_like_shards(root) and any(looks_like_shards(split) for split in splits):
        reports = [verify_images(split, progress_every) for split in splits]
        return VerifyReport(sum(r.checked for r in reports), [bad for r in reports for bad in r.bad])
    if looks_like_shards(root):
        shards = sharded_images(root)
        return _check(len(shards), shards.__getitem__, progress_every)
    paths = [path for path, _ in image_files(root).samples]
    return _check(len(paths), lambda i: _decode_file(paths[i]), progress_every)


def _decode_file(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        load_rgb(path)
    except OSError as err:  # e.g. a list file naming a file that is gone
        raise UnreadableImage(path, err.strerror or type(err).__name__) from None


def _check(count: int, decode: Callable[[int], object], progress_every: int) -> VerifyReport:
    """Decodes items 0..count-1, collecting the UnreadableImage ones, with a progress line now and then."""
    report = VerifyReport()
    for i in range(count):
        report.checked += 1
        try:
            decode(i)
        except UnreadableImage as err:
            report.bad.append((err.path, err.reason))
        if progress_every and report.checked % progress_every == 0:
            print(f"checked {report.checked:,}/{count:,} ({len(report.bad)} unusable so far)", flush=True)
    return report
