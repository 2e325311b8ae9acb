"""WebDataset tar shards: shard lists, per-shard sample counts, random access to samples, the epoch
order of a rank, and a writer.

A shard is an uncompressed tar file; a sample is a run of consecutive members sharing a key (the
member name up to the first dot of its base name): `0001.jpg` + `0001.cls` is the sample "0001"
with an image and a label. Members named `__x__` at the top level are metadata and not samples.

Reading does not unpack anything. A shard's member headers are scanned once per worker process (a
512-byte read per member, no image data) and a sample's bytes are then read with one `pread`. That
makes the dataset map-style: sample `i` of the concatenated shards is `dataset[i]`, and the order
of an epoch is entirely the sampler's (`ShardSampler`): shards shuffled by (seed, epoch), their
samples concatenated and cut into one contiguous run per rank, mixed within a bounded shuffle
buffer, cut to whole batches. The DataLoader hands batch k of a rank to worker k mod workers, so
ranks and workers read disjoint samples, and a resumed run skips consumed batches by recomputing
that order (integers only: no sample is read or decoded).

The number of samples of every shard must be known before the first step (every rank runs the
same number of steps): `shardindex.json` next to the shards says it (the layout of the wids shard
index: `shardlist` entries with `url`, `nsamples`, `filesize`); shards it does not list are counted
by a header scan whose result is cached in $SIMMIM_CACHE/shard-counts.json (default ~/.cache/simmim).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import json
import os
import re
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UsageError
from ..fsutil import atomic_write, atomic_write_text, read_json_cache, update_json_cache
from ..hardware import cache_dir
from .datasets import EpochSampler, UnreadableImage, derive_seed, load_rgb

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp", "gif", "tif", "tiff")
INDEX_NAME = "shardindex.json"
COUNTS_CACHE = "shard-counts.json"  # in cache_dir(): samples per shard found by a scan, by path, size and mtime
INDEX_KIND = "wids-shard-index-v1"
OPEN_SHARDS = 16  # per process: open files and member tables kept, least recently used dropped
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")

Members = dict[str, tuple[int, int]]  # extension -> (offset of the data in the tar, size)


# -- shard lists ---------------------------------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """`train-{000..002}.tar` -> train-000.tar, train-001.tar, train-002.tar; `{a,b}` alternatives;
    several groups multiply. Ranges keep the zero padding of their first bound."""
    match = _BRACES.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise UsageError(f"{pattern}: unbalanced or nested braces; expected e.g. train-{{000000..000099}}.tar")
        return [pattern]
    body = match.group(1)
    if (numbers := _RANGE.fullmatch(body)) is not None:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise UsageError(f"{pattern}: range {{{body}}} runs backwards")
        choices = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise UsageError(f"{pattern}: {{{body}}} is neither a range like {{000..099}} nor alternatives like {{a,b}}")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def looks_like_shards(path: str | Path) -> bool:
    """Whether `data.path` names WebDataset shards: a .tar file, a brace pattern or a folder holding .tar files."""
    text = str(path)
    if text.endswith(".tar") or _BRACES.search(text):
        return True
    folder = Path(path)
    if not folder.is_dir():
        return False
    suffixes = {p.suffix.lower().lstrip(".") for p in folder.iterdir() if p.is_file()}
    if "tar" in suffixes and suffixes & set(IMAGE_EXTENSIONS):
        raise UsageError(f"{folder}: holds both .tar shards and image files; expected one kind (point data.path "
                         "at a folder of shards, a shard pattern, or an image folder)")
    return "tar" in suffixes


def shard_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shards of a .tar file, a brace pattern, a folder (its .tar files, sorted) or a list of those."""
    if not isinstance(spec, str | Path):
        paths = [path for item in spec for path in shard_paths(item)]
        if not paths:
            raise UsageError("no shards given")
        return paths
    text = str(spec)
    if _BRACES.search(text) or "{" in text or "}" in text:
        paths = [Path(p) for p in expand_braces(text)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{text}: {len(missing)} of {len(paths)} shards missing, e.g. {missing[0]}")
    elif Path(text).is_dir():
        paths = sorted(p for p in Path(text).iterdir() if p.suffix == ".tar" and p.is_file())
        if not paths:
            raise FileNotFoundError(f"{text}: no .tar shards in this folder")
    elif Path(text).is_file():
        paths = [Path(text)]
    else:
        raise FileNotFoundError(f"no shard, shard folder or shard pattern at {text}")
    for path in paths:
        if path.suffix != ".tar":
            raise UsageError(f"{path}: expected an uncompressed .tar shard (compressed shards cannot be read "
                             "by random access)")
    return paths


# -- members and samples -------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str]:
    """A member name as (sample key, extension): `a/b.seg.png` -> (`a/b`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str | Path) -> tuple[list[tuple[str, Members]], str | None]:
    """The samples of a shard in tar order, each (key, members), from the member headers alone; and
    why the scan stopped early (a truncated or damaged tar), or None."""
    samples: list[tuple[str, Members]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or ("/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                key, ext = split_name(name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError) as err:
        return samples, f"damaged tar after {len(samples)} samples ({err or type(err).__name__})"
    return samples, None


def read_index(folder: Path) -> dict[str, Any]:
    """`folder/shardindex.json` ({} when there is none)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return {}
    try:
        content = json.loads(index.read_text())
        if all(isinstance(e, dict) and {"url", "nsamples"} <= e.keys() for e in content["shardlist"]):
            return content
    except (ValueError, KeyError, TypeError):
        pass
    raise UsageError(f"{index}: not a shard index "
                     '(expected {"shardlist": [{"url": ..., "nsamples": ...}, ...]})')


def shard_counts(paths: Sequence[Path]) -> list[int]:
    """Samples per shard: from shardindex.json beside the shards where its file size matches, else
    from the cache of earlier scans, else by scanning the member headers (and caching the count)."""
    indexes: dict[Path, dict[str, dict[str, Any]]] = {}
    cache_path = cache_dir() / COUNTS_CACHE
    cache = read_json_cache(cache_path)
    counts, scanned = [], {}
    for path in paths:
        stat = path.stat()
        folder = path.parent
        if folder not in indexes:
            indexes[folder] = {Path(e["url"]).name: e for e in read_index(folder).get("shardlist", [])}
        entry = indexes[folder].get(path.name)
        if entry is not None and entry.get("filesize", stat.st_size) == stat.st_size:
            counts.append(int(entry["nsamples"]))
            continue
        key = str(path.resolve())
        cached = cache.get(key)
        if cached is not None and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
            counts.append(cached[2])
            continue
        samples, _ = scan_shard(path)
        cache[key] = scanned[key] = [stat.st_size, stat.st_mtime_ns, len(samples)]
        counts.append(len(samples))
    if scanned:
        update_json_cache(cache_path, scanned, "shard count cache")
    return counts


def label_of(members: dict[str, bytes]) -> int | None:
    """The class index of a sample: `.cls` (an integer as text) or `.json` with an integer "label" or "cls"."""
    if "cls" in members:
        return int(members["cls"].decode().strip())
    if "json" in members:
        meta = json.loads(members["json"])
        for name in ("label", "cls"):
            if isinstance(meta, dict) and isinstance(meta.get(name), int):
                return meta[name]
    return None


class ShardedImages(Dataset):
    """The samples of WebDataset shards, in shard and tar order: `dataset[i] -> (RGB image, label or 0)`.

    A sample whose image cannot be decoded, that has no image member or that a damaged shard lost
    raises UnreadableImage named `SHARD:KEY`, which SeededSamples skips and the run counts."""

    def __init__(self, paths: Sequence[str | Path], counts: Sequence[int], classes: Sequence[str] = ()):
        if len(paths) != len(counts):
            raise UsageError(f"{len(paths)} shards but {len(counts)} sample counts")
        self.paths = [str(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.classes = list(classes)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self._full = list(self.counts)  # what the index says; `first` may use fewer
        self._open: OrderedDict[int, tuple[int, list[tuple[str, Members]], str | None]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    def first(self, count: int) -> ShardedImages:
        """The first `count` samples (in shard order)."""
        counts = [min(c, max(0, count - start)) for c, start in zip(self.counts, self.starts, strict=False)]
        keep = [i for i, c in enumerate(counts) if c]
        subset = ShardedImages([self.paths[i] for i in keep], [counts[i] for i in keep], self.classes)
        subset._full = [self._full[i] for i in keep]
        return subset

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, position in the shard) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def _shard(self, shard: int) -> tuple[int, list[tuple[str, Members]], str | None]:
        if self._pid != os.getpid():  # a forked worker: its parent's table stays the parent's
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.paths[shard]
        samples, damage = scan_shard(path)
        if damage is None and len(samples) != self._full[shard]:
            raise UsageError(f"{path}: {len(samples)} samples, but its count says {self._full[shard]} "
                             f"(a stale {INDEX_NAME}? rewrite it or delete it to count again)")
        self._open[shard] = (os.open(path, os.O_RDONLY), samples, damage)
        if len(self._open) > OPEN_SHARDS:
            os.close(self._open.popitem(last=False)[1][0])
        return self._open[shard]

    def _sample(self, index: int) -> tuple[str, str, Members, int]:
        """Sample `index` as (name SHARD:KEY, key, its members, the shard's open file)."""
        shard, position = self.locate(index)
        fd, samples, damage = self._shard(shard)
        if position >= len(samples):
            raise UnreadableImage(f"{self.paths[shard]}#{position}", damage or "sample missing")
        key, members = samples[position]
        return f"{self.paths[shard]}:{key}", key, members, fd

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        """Sample `index` undecoded: its key and the bytes of each member by extension."""
        _, key, members, fd = self._sample(index)
        return key, {ext: os.pread(fd, size, offset) for ext, (offset, size) in members.items()}

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        name, _, members, fd = self._sample(index)
        image = next((ext for ext in members if ext in IMAGE_EXTENSIONS), None)
        if image is None:
            raise UnreadableImage(name, f"no image member (extensions: {', '.join(sorted(members)) or 'none'})")
        # only the image and the label are read: other members (captions, features) may be large
        data = {ext: os.pread(fd, members[ext][1], members[ext][0]) for ext in (image, "cls", "json") if ext in members}
        try:
            label = label_of(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise UnreadableImage(name, f"unreadable label ({err})") from None
        if label is not None and self.classes and not 0 <= label < len(self.classes):
            # skipped and counted like a bad image, rather than an index error in the loss
            raise UnreadableImage(name, f"label {label} outside the {len(self.classes)} classes of the index")
        return load_rgb(io.BytesIO(data[image]), name=f"{name}.{image}"), 0 if label is None else label

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to spawned workers
        return {**self.__dict__, "_open": OrderedDict()}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd, _, _ in self._open.values():
                with contextlib.suppress(OSError):
                    os.close(fd)


def sharded_images(spec: str | Path | Sequence[str | Path]) -> ShardedImages:
    """ShardedImages of a .tar, a brace pattern, a folder of shards or a list; class names from the
    shard index when it has them."""
    paths = shard_paths(spec)
    return ShardedImages(paths, shard_counts(paths), read_index(paths[0].parent).get("classes", []))


# -- the order of an epoch -----------------------------------------------------------------------------

def buffer_shuffle(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`items` passed through a shuffle buffer of `size`: each arriving item takes the place of a random
    one, which leaves; the last ones leave in random order. An item leaves at most `size` places
    before it arrived, so reading stays within a window of the stream."""
    if size <= 1 or len(items) <= 1:
        return items
    buffer = items[:size].tolist()
    out = []
    for item, pick in zip(items[size:].tolist(), rng.integers(0, len(buffer), len(items) - len(buffer)).tolist(),
                          strict=True):
        out.append(buffer[pick])
        buffer[pick] = item
    return np.asarray(out + rng.permutation(buffer).tolist(), dtype=items.dtype)


class ShardSampler(EpochSampler):
    """One rank's share of an epoch of sharded samples as `(index, sample seed)` pairs.

    The shards in an order fixed by (seed, epoch), their samples concatenated and cut into one
    contiguous run per rank (so fewer shards than ranks x workers still split without repeats),
    mixed by a shuffle buffer seeded by (seed, epoch, rank), cut to the same whole number of batches
    on every rank. `set_epoch(epoch, start_batch)` skips consumed batches, as in EpochSampler."""

    def __init__(self, counts: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 batch_multiple: int = 1, buffer_size: int = 4096):
        super().__init__(sum(counts), batch_size, rank, world_size, seed, shuffle=True, batch_multiple=batch_multiple)
        self.counts, self.buffer_size = list(counts), buffer_size

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.batch_size

    def indices(self) -> list[int]:
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        order = np.random.default_rng(derive_seed(self.seed, self.epoch)).permutation(len(self.counts))
        stream = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order] or [np.zeros(0, np.int64)])
        own = stream[self.rank * self.size // self.world_size:(self.rank + 1) * self.size // self.world_size]
        mixing = np.random.default_rng(derive_seed(self.seed, self.epoch, self.rank))
        own = buffer_shuffle(own, self.buffer_size, mixing)
        return own[self.start_batch * self.batch_size:self.batches * self.batch_size].tolist()


# -- writing -------------------------------------------------------------------------------------------

def write_tar(file: BinaryIO, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """An uncompressed tar of samples (key, {extension: bytes}); times fixed, so equal input gives equal bytes."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if not key or "." in key.rpartition("/")[2]:
                raise UsageError(f"sample key {key!r}: expected a non-empty name without a dot in its base name")
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[tuple[str, dict[str, bytes]]], folder: str | Path, prefix: str,
                 shard_size: int, classes: Sequence[str] = (), verbose: bool = False) -> list[int]:
    """Writes samples as `folder/PREFIX-000000.tar`, ... of `shard_size` samples each, every shard
    atomically, then `folder/shardindex.json` with the counts; returns the samples per shard."""
    if shard_size < 1:
        raise UsageError(f"shard size {shard_size}: expected at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    samples = iter(samples)
    while batch := list(itertools.islice(samples, shard_size)):
        path = folder / f"{prefix}-{len(entries):06d}.tar"
        atomic_write(path, lambda file, batch=batch: write_tar(file, batch), "shard")
        entries.append({"url": path.name, "nsamples": len(batch), "filesize": path.stat().st_size})
        if verbose:
            print(f"{path}: {len(batch)} samples", flush=True)
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": prefix, "shardlist": entries}
    if classes:
        index["classes"] = list(classes)
    text = json.dumps(index, indent=1) + "\n"
    atomic_write_text(folder / INDEX_NAME, text, "shard index")
    return [entry["nsamples"] for entry in entries]
