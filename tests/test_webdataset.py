"""WebDataset tar shards: shard lists, counts, splitting across ranks and workers, the epoch order,
resume, damaged samples, the writer, compatibility with the webdataset package, and pretraining
through the engine."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from simmim import cli
from simmim.checkpoint import training as ckpt
from simmim.config import load_config
from simmim.data import webdataset as shards
from simmim.data.datasets import SeededSamples
from simmim.data.verify import verify_images
from simmim.data.webdataset import ShardedImages, ShardSampler, buffer_shuffle, expand_braces, shard_paths
from simmim.engine import evaluate, finetune, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "cache"))  # the count cache of these tests only


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tar_shards(folder: Path, counts: list[int], size: int = 8) -> list[Path]:
    """Shards written with tarfile alone (no index): sample `s{i}` of all shards is png(i) with class i % 3."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, index = [], 0
    for n, count in enumerate(counts):
        path = folder / f"part-{n:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                for ext, data in (("png", png(index, size)), ("cls", str(index % 3).encode())):
                    info = tarfile.TarInfo(f"s{index:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        paths.append(path)
    return paths


class KeysAndWorkers(Dataset):
    """dataset[(index, seed)] -> (sample key, worker id): what a loader worker read."""

    def __init__(self, images: ShardedImages):
        self.images = images

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, int]:
        info = get_worker_info()
        return self.images.read(key[0])[0], info.id if info else -1


def read_epoch(images: ShardedImages, rank: int, world: int, workers: int, batch: int, epoch: int = 0,
               start_batch: int = 0) -> list[list[tuple[str, int]]]:
    sampler = ShardSampler(images.counts, batch, rank, world, seed=7, buffer_size=5)
    sampler.set_epoch(epoch, start_batch)
    loader = DataLoader(KeysAndWorkers(images), batch_size=batch, sampler=sampler, num_workers=workers,
                        collate_fn=list)
    return list(loader)


# -- shard lists ---------------------------------------------------------------------------------------

def test_brace_patterns_folders_and_lists_name_the_shards(tmp_path):
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    paths = tar_shards(tmp_path / "s", [2, 1, 3])
    assert shard_paths(str(tmp_path / "s")) == paths == shard_paths(str(tmp_path / "s" / "part-{000..002}.tar"))
    assert shard_paths([paths[2], str(tmp_path / "s" / "part-{000..001}.tar")]) == [paths[2], *paths[:2]]
    assert shards.looks_like_shards(tmp_path / "s") and not shards.looks_like_shards(tmp_path)


@pytest.mark.parametrize(("spec", "error", "message"), [
    ("s/part-{000..003}.tar", FileNotFoundError, "1 of 4 shards missing, e.g. "),
    ("s/part-{003..000}.tar", ValueError, "range {003..000} runs backwards"),
    ("s/part-{000..002.tar", ValueError, "unbalanced or nested braces"),
    ("s/part-{abc}.tar", ValueError, "is neither a range like {000..099} nor alternatives"),
    ("empty", FileNotFoundError, "no .tar shards in this folder"),
    ("nowhere.tar", FileNotFoundError, "no shard, shard folder or shard pattern at"),
    ("s/notes.tar.gz", ValueError, "expected an uncompressed .tar shard"),
])
def test_bad_shard_specs_are_one_line_errors(tmp_path, spec, error, message):
    tar_shards(tmp_path / "s", [1, 1, 1])
    (tmp_path / "empty").mkdir()
    (tmp_path / "s" / "notes.tar.gz").write_bytes(b"")
    with pytest.raises(error) as err:
        shards.sharded_images(str(tmp_path / spec))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_counts_come_from_the_index_or_a_cached_scan(tmp_path, monkeypatch):
    paths = tar_shards(tmp_path / "s", [3, 5])
    assert shards.shard_counts(paths) == [3, 5]  # scanned, then cached by path, size and time
    monkeypatch.setattr(shards, "scan_shard", lambda path: pytest.fail(f"{path} scanned again"))
    assert shards.shard_counts(paths) == [3, 5]
    monkeypatch.undo()
    index = {"shardlist": [{"url": "part-000.tar", "nsamples": 2, "filesize": paths[0].stat().st_size},
                           {"url": "part-001.tar", "nsamples": 9, "filesize": 1}]}  # a stale size: not used
    (tmp_path / "s" / shards.INDEX_NAME).write_text(json.dumps(index))
    images = shards.sharded_images(tmp_path / "s")
    assert images.counts == [2, 5]
    head = images.first(4)  # data.max_images
    assert head.counts == [2, 2] and len(head) == 4 and head.read(3)[0] == "s00004"
    with pytest.raises(ValueError, match="part-000.tar: 3 samples, but its count says 2 \\(a stale shardindex.json"):
        images.read(0)
    (tmp_path / "s" / shards.INDEX_NAME).write_text('{"shardlist": [{"url": "part-000.tar"}]}')
    with pytest.raises(ValueError, match='shardindex.json: not a shard index \\(expected {"shardlist": \\[{"url"'):
        shards.sharded_images(tmp_path / "s")


def test_the_count_cache_lives_in_simmim_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "elsewhere"))
    paths = tar_shards(tmp_path / "s", [3, 5])
    assert shards.shard_counts(paths) == [3, 5]
    cache = json.loads((tmp_path / "elsewhere" / "shard-counts.json").read_text())
    assert {key: entry[2] for key, entry in cache.items()} == {str(paths[0].resolve()): 3, str(paths[1].resolve()): 5}


# -- splitting, order and resume -----------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[24], [7, 1, 12, 4], [3, 3, 3, 3, 3, 3, 3, 3]])
def test_two_ranks_with_two_workers_each_read_every_sample_once(tmp_path, counts):
    images = shards.sharded_images(tar_shards(tmp_path / "s", counts))
    epoch = {rank: read_epoch(images, rank, world=2, workers=2, batch=3) for rank in (0, 1)}
    assert len(epoch[0]) == len(epoch[1]) == 4  # lockstep: 12 samples a rank in batches of 3
    keys = [key for batches in epoch.values() for batch in batches for key, _ in batch]
    assert sorted(keys) == [f"s{i:05d}" for i in range(24)]  # every sample once: no repeats, no losses
    for rank, batches in epoch.items():  # worker k % 2 reads the rank's batch k, all of it
        assert [{worker for _, worker in batch} for batch in batches] == [{0}, {1}, {0}, {1}], rank
    # the workers only share out the rank's batches: the order is that of a loader without workers
    assert [[k for k, _ in b] for b in read_epoch(images, 1, 2, 0, 3)] == [[k for k, _ in b] for b in epoch[1]]


def test_uneven_shares_keep_the_ranks_in_lockstep(tmp_path):
    images = shards.sharded_images(tar_shards(tmp_path / "s", [5, 3, 3]))  # 11 samples: 5 and 6 a rank
    epoch = [read_epoch(images, rank, world=2, workers=0, batch=2) for rank in (0, 1)]
    assert [len(batches) for batches in epoch] == [2, 2]  # the same whole batches on both ranks
    keys = [key for batches in epoch for batch in batches for key, _ in batch]
    assert len(keys) == len(set(keys)) == 8


def test_the_order_is_fixed_by_seed_and_epoch(tmp_path):
    counts = [10, 10, 10, 10]

    def order(seed: int, epoch: int) -> list[int]:
        sampler = ShardSampler(counts, 4, seed=seed, buffer_size=8)
        sampler.set_epoch(epoch)
        return sampler.indices()

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(40))
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)
    first_shards = {tuple(i // 10 for i in order(0, epoch)[:4]) for epoch in range(6)}
    assert len(first_shards) > 1  # the shard order changes between epochs
    # the buffer bounds how far ahead of the stream reading goes
    items = np.arange(1000)
    mixed = buffer_shuffle(items, 16, np.random.default_rng(0))
    assert sorted(mixed.tolist()) == items.tolist() and (mixed <= np.arange(1000) + 16).all()
    assert (mixed != items).mean() > 0.9


def test_a_resumed_epoch_yields_exactly_the_rest(tmp_path):
    images = shards.sharded_images(tar_shards(tmp_path / "s", [7, 1, 12, 4]))
    def keys(start_batch: int) -> list[list[str]]:
        return [[k for k, _ in b] for b in read_epoch(images, 1, 2, 2, batch=3, epoch=3, start_batch=start_batch)]

    assert keys(1) == keys(0)[1:]  # (a resumed loader hands its first batch to worker 0)
    sampler = ShardSampler(images.counts, 3, 1, 2, seed=7, buffer_size=5)
    sampler.set_epoch(3)
    pairs = list(sampler)
    sampler.set_epoch(3, start_batch=2)
    assert list(sampler) == pairs[6:] and len(sampler) == 6  # the same samples with the same seeds


# -- damaged samples -----------------------------------------------------------------------------------

def test_damaged_samples_are_skipped_and_named(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with tarfile.open(folder / "a.tar", "w") as tar:
        for name, data in (("good.png", png(1)), ("bad.png", b"not an image"), ("bad.cls", b"1"),
                           ("text.txt", b"no image"), ("last.png", png(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "b.tar").write_bytes((folder / "a.tar").read_bytes()[:3684])  # cut inside text.txt's data
    # b.tar as indexed before it was cut (an index without file sizes cannot tell)
    (folder / shards.INDEX_NAME).write_text(json.dumps({"shardlist": [{"url": "b.tar", "nsamples": 4}]}))
    images = shards.sharded_images(folder)
    assert images.counts == [4, 4]
    samples = SeededSamples(images, lambda image: torch.from_numpy(np.array(image)))
    assert samples[(0, 0)][3] == ()
    a, b = folder / "a.tar", folder / "b.tar"
    assert samples[(1, 0)][3] == (f"{a}:bad.png", f"{a}:text")  # replaced by the next readable one
    assert torch.equal(samples[(1, 0)][0], samples[(3, 0)][0])
    assert samples[(7, 0)][3] == (f"{b}#3",)  # lost by the cut: replaced by sample 0, wrapping around
    assert torch.equal(samples[(7, 0)][0], samples[(0, 0)][0])
    with pytest.raises(shards.UnreadableImage, match="no image member \\(extensions: txt\\)"):
        images[2]
    with pytest.raises(shards.UnreadableImage, match="damaged tar after 3 samples \\(unexpected end of data"):
        images[7]
    report = verify_images(folder, progress_every=0)  # simmim verify-data
    assert report.checked == 8 and [name for name, _ in report.bad] == [
        f"{a}:bad.png", f"{a}:text", f"{b}:bad.png", f"{b}:text", f"{b}#3"]


def test_a_folder_of_shards_and_images_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    tar_shards(folder, [2])
    (folder / "stray.png").write_bytes(png(0))
    with pytest.raises(ValueError, match="holds both .tar shards and image files; expected one kind"):
        shards.looks_like_shards(folder)


def test_a_label_outside_the_indexed_classes_is_a_skipped_sample(tmp_path):
    paths = tar_shards(tmp_path / "s", [3])  # classes 0, 1, 2
    images = ShardedImages(paths, [3], classes=["a", "b"])
    assert images[1][1] == 1
    with pytest.raises(shards.UnreadableImage, match="label 2 outside the 2 classes of the index"):
        images[2]
    assert ShardedImages(paths, [3])[2][1] == 2  # no class names: nothing to check against


# -- writer and the webdataset package ------------------------------------------------------------------

def test_export_writes_shards_that_webdataset_reads(tmp_path):
    wds = pytest.importorskip("webdataset")
    for label in ("cat", "dog"):
        for i in range(3):
            path = tmp_path / "folder" / "train" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(10 * len(label) + i + (label == "dog") * 100))
    assert cli.main(["export-dataset", str(tmp_path / "folder"), str(tmp_path / "out"), "--format", "webdataset",
                     "--shard-size", "4"]) == 0
    folder = tmp_path / "out" / "train"
    assert sorted(p.name for p in folder.iterdir()) == [shards.INDEX_NAME, "train-000000.tar", "train-000001.tar"]
    index = json.loads((folder / shards.INDEX_NAME).read_text())
    assert [e["nsamples"] for e in index["shardlist"]] == [4, 2] and index["classes"] == ["cat", "dog"]
    ours = shards.sharded_images(folder)
    theirs = list(wds.WebDataset([str(p) for p in ours.paths], shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [ours.read(i)[0] for i in range(6)] == [f"{i:07d}" for i in range(6)]
    files = sorted((tmp_path / "folder" / "train").rglob("*.png"))
    assert [s["png"] for s in theirs] == [p.read_bytes() for p in files]  # the files' bytes as they were
    assert [int(s["cls"]) for s in theirs] == [ours[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileExistsError, match="is not empty"):
        cli.main(["--debug", "export-dataset", "photos", str(tmp_path / "out"), "--format", "webdataset"])


def test_shards_of_webdatasets_tarwriter_are_read(tmp_path):
    wds = pytest.importorskip("webdataset")
    with wds.TarWriter(str(tmp_path / "w-0.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"sample{i}", "jpg": png(i), "cls": i % 2, "json": {"i": i}})
    images = shards.sharded_images(str(tmp_path / "w-{0..0}.tar"))
    assert len(images) == 5 and [images.read(i)[0] for i in range(5)] == [f"sample{i}" for i in range(5)]
    image, label = images[3]
    assert label == 1 and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(png(3)))))


# -- the engine ----------------------------------------------------------------------------------------

STREAMING = ["data.shuffle_buffer=6", "model.drop_path_rate=0.1"]  # on top of the settings fixture's tiny run


def test_pretraining_streams_shards_and_resumes_mid_epoch_bit_identically(tmp_path, settings, params_of):
    paths = tar_shards(tmp_path / "data" / "train", [7, 6, 4], size=72)
    with tarfile.open(tmp_path / "data" / "train" / "part-003.tar", "w") as tar:  # a corrupt member
        info = tarfile.TarInfo("broken.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    pattern = str(tmp_path / "data" / "train" / "part-{000..003}.tar")
    common = ["checkpoint.keep=10", "schedule.epochs=2"]
    whole = pretrain(load_config("nano-pretrain", overrides=settings(
        "pretrain", pattern, tmp_path / "whole", *STREAMING, *common, "checkpoint.every_steps=3")))
    assert whole.steps == 8  # 18 samples, batch 4: 4 steps an epoch; step 3 is mid-epoch 1
    assert whole.skipped_files == [f"{paths[0].parent / 'part-003.tar'}:broken.png"]
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "ckpt-00000003.pt").write_bytes((tmp_path / "whole" / "ckpt-00000003.pt").read_bytes())
    resumed = pretrain(load_config("nano-pretrain", overrides=settings(
        "pretrain", pattern, resumed_dir, *STREAMING, *common, "checkpoint.resume=auto")))
    a, b = params_of(whole.checkpoint), params_of(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exported_shards_pretrain_with_held_out_images_and_fine_tune(tmp_path, settings):
    cli.main(["export-dataset", "fashion-mnist", str(tmp_path / "fm"), "--format", "webdataset",
              "--limit-per-class", "1", "--shard-size", "3"])
    pretrain(load_config("nano-pretrain", overrides=settings(
        "pretrain", str(tmp_path / "fm"), tmp_path / "pre", *STREAMING, "schedule.epochs=1", "data.heldout_images=6")))
    records = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("train") == 2  # fm/train: 10 images; fm/val held out
    assert [r for r in records if r["kind"] == "eval"][0]["heldout_loss"] > 0
    result = finetune(load_config("nano-finetune", overrides=settings(
        "finetune", str(tmp_path / "fm"), tmp_path / "run", *STREAMING, "schedule.epochs=1")))
    assert result.steps == 2  # 10 training images in batches of 4
    assert evaluate(result.checkpoint, str(tmp_path / "fm"), batch_size=4, num_workers=0)["images"] == 10
    with pytest.raises(ValueError, match="data.labels_per_class: needs an image folder"):
        finetune(load_config("nano-finetune", overrides=settings(
            "finetune", str(tmp_path / "fm"), tmp_path / "run2", *STREAMING, "data.labels_per_class=1")))


@pytest.mark.distributed
def test_two_processes_with_loader_workers_stream_uneven_shards_in_lockstep(tmp_path, torchrun):
    tar_shards(tmp_path / "data", [5, 1, 8, 5], size=72)  # 19 samples: 10 and 9 a rank, 4 steps of 2
    sets = [arg for s in ("data.num_workers=2", "runtime.tensorboard=false", "runtime.vis_every=0",
                          "schedule.epochs=2", "data.shuffle_buffer=4") for arg in ("--set", s)]
    run = torchrun(2, "pretrain", "--preset", "nano-pretrain", "--data", str(tmp_path / "data"),
                   "--batch-size", "2", "--out", str(tmp_path / "run"), *sets)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes (ddp) on cpu" in run.stdout and ", 2 loader workers)" in run.stdout
    assert "4 steps/epoch x 2 epochs" in run.stdout and "epoch 2/2  step 4/4" in run.stdout
    assert ckpt.load(tmp_path / "run" / "ckpt-00000008.pt")["world_size"] == 2
