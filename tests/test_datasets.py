"""The embedded datasets on the real files: Debian's Fashion-MNIST and scikit-image's photographs."""

from __future__ import annotations

import gzip
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from simmim.data import fashion_mnist as fm
from simmim.data.export import CLASS_FOLDERS, export_dataset
from simmim.data.photos import PHOTOS, load_photo

needs_fashion_mnist = pytest.mark.skipif(
    not fm.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fm_train() -> tuple[np.ndarray, np.ndarray]:
    return fm.load_fashion_mnist("train", fm.FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def fm_test() -> tuple[np.ndarray, np.ndarray]:
    return fm.load_fashion_mnist("test", fm.FASHION_MNIST_DIR)


@needs_fashion_mnist
@pytest.mark.parametrize(("split", "count"), [("fm_train", 60000), ("fm_test", 10000)])
def test_split_sizes_shapes_and_class_balance(split, count, request):
    images, labels = request.getfixturevalue(split)
    assert images.shape == (count, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (count,) and labels.dtype == np.int64
    # Fashion-MNIST is exactly balanced: 6000 per class in train, 1000 in test.
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [count // 10] * 10)
    assert images.flags.writeable and 0 < images.mean() < 255


@needs_fashion_mnist
def test_first_labels_are_ankle_boots(fm_train, fm_test):
    # Both official label files start with 9 (an ankle boot); checked against the raw gzip bytes.
    assert fm_train[1][0] == 9 == fm_test[1][0]
    assert fm.CLASSES[9] == "Ankle boot" and len(fm.CLASSES) == 10


@needs_fashion_mnist
def test_dataset_items_are_rgb_pil_images(fm_train):
    ds = fm.FashionMNIST("train")
    assert len(ds) == 60000 and ds.classes == list(fm.CLASSES)
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (28, 28)
    pixels = np.asarray(image)
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], fm_train[0][0])
    assert label == 9


@needs_fashion_mnist
def test_dataset_transform_and_subset(fm_train):
    indices = [5, 17, 42]
    ds = fm.FashionMNIST("train", transform=lambda im: torch.from_numpy(np.array(im)), indices=indices)
    assert len(ds) == 3
    np.testing.assert_array_equal(ds.targets, fm_train[1][indices])
    tensor, label = ds[2]
    assert tensor.shape == (28, 28, 3) and label == fm_train[1][42]
    np.testing.assert_array_equal(tensor[:, :, 1].numpy(), fm_train[0][42])
    with pytest.raises(ValueError, match="indices"):
        fm.FashionMNIST("test", indices=[10000])


@needs_fashion_mnist
def test_balanced_subset(fm_train):
    labels = fm_train[1]
    idx = fm.balanced_subset(labels, per_class=100, seed=0)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), [100] * 10)
    np.testing.assert_array_equal(idx, fm.balanced_subset(labels, per_class=100, seed=0))
    assert not np.array_equal(idx, fm.balanced_subset(labels, per_class=100, seed=1))
    with pytest.raises(ValueError, match="fewer than"):
        fm.balanced_subset(labels[:50], per_class=10, seed=0)


def test_read_idx_round_trip(tmp_path):
    path = tmp_path / "x-idx2.gz"
    data = np.arange(6, dtype=">i4").reshape(2, 3)
    path.write_bytes(
        gzip.compress(
            bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + data.tobytes()
        )
    )
    out = fm.read_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"this is not gzip at all", "not a readable gzip"),
        (
            gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(10))[:-12],
            "not a readable gzip",
        ),
        (gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(7)), "expected 18"),
        (gzip.compress(b"\x1f\x8b\x08\x00garbage"), "bad IDX magic"),
        (gzip.compress(bytes([0, 0, 8, 3]) + (1).to_bytes(4, "big") * 3 + bytes(1)), "expected 2049"),
    ],
    ids=["not-gzip", "truncated-gzip", "short-data", "garbage-magic", "wrong-magic"],
)
def test_read_idx_rejects_bad_files_naming_them(tmp_path, payload, match):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match) as err:
        fm.read_idx(path, magic=fm.LABEL_MAGIC)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_mentions_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        fm.load_fashion_mnist("train")
    assert "nowhere" in str(err.value)
    with pytest.raises(ValueError, match="choose from"):
        fm.load_fashion_mnist("validation")


@pytest.mark.parametrize(
    ("name", "size"),
    [("astronaut", (512, 512)), ("coffee", (600, 400)), ("chelsea", (451, 300)), ("rocket", (640, 427))],
)
def test_known_photo_sizes(name, size):
    photo = load_photo(name)
    assert photo.mode == "RGB" and photo.size == size


def test_every_photo_loads_offline_as_rgb():
    assert len(PHOTOS) == len(set(PHOTOS)) >= 10
    for name in PHOTOS:
        photo = load_photo(name)
        assert photo.mode == "RGB" and min(photo.size) >= 100, name
    gray = np.asarray(load_photo("camera"))
    assert (gray[:, :, 0] == gray[:, :, 2]).all()
    with pytest.raises(ValueError, match="astronaut"):
        load_photo("lena")


def test_class_folders_sort_in_label_order():
    assert list(CLASS_FOLDERS) == sorted(CLASS_FOLDERS)
    assert CLASS_FOLDERS[0] == "00_t-shirt_top" and CLASS_FOLDERS[9] == "09_ankle_boot"


@needs_fashion_mnist
def test_export_fashion_mnist_reads_back_as_image_folder(tmp_path, fm_train, fm_test):
    counts = export_dataset("fashion-mnist", tmp_path / "fm", limit_per_class=3)
    assert counts == {"train": 30, "val": 30}
    for split, (images, labels) in {"train": fm_train, "val": fm_test}.items():
        folder = ImageFolder(str(tmp_path / "fm" / split))
        assert folder.class_to_idx == {name: i for i, name in enumerate(CLASS_FOLDERS)}
        assert len(folder) == 30
        np.testing.assert_array_equal(np.bincount(folder.targets), [3] * 10)
        for label in range(10):
            sources = np.flatnonzero(labels == label)[:3]
            samples = [path for path, target in folder.samples if target == label]
            for path, src in zip(samples, sources, strict=True):
                rgb = np.asarray(folder.loader(path))
                for channel in range(3):
                    np.testing.assert_array_equal(rgb[:, :, channel], images[src])
    with pytest.raises(FileExistsError):
        export_dataset("fashion-mnist", tmp_path / "fm", limit_per_class=1)


def test_export_photos_and_unknown_name(tmp_path):
    counts = export_dataset("photos", tmp_path / "photos", limit_per_class=2)
    assert counts == {"unlabeled": 2}
    written = sorted(p.name for p in (tmp_path / "photos").iterdir())
    assert written == sorted(f"{name}.png" for name in PHOTOS[:2])
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "photos" / f"{PHOTOS[0]}.png")), np.asarray(load_photo(PHOTOS[0]))
    )
    with pytest.raises(ValueError, match="fashion-mnist, photos"):
        export_dataset("cifar10", tmp_path / "other")


def _idx_gz(path, magic_code: int, dims: tuple[int, ...], data: np.ndarray) -> None:
    header = bytes([0, 0, magic_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(gzip.compress(header + data.astype(np.uint8).tobytes()))


def test_a_limited_export_reads_only_the_images_it_writes(tmp_path, monkeypatch):
    """`--limit-per-class` costs what it writes: the image files are read only up to the last image
    exported (here they end after 40 of the 1000 images their headers announce, and the export works)."""
    rng = np.random.default_rng(0)
    pixels = {}
    for prefix in ("train", "t10k"):
        labels = np.arange(1000) % 10
        _idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 0x08, (1000,), labels)
        pixels[prefix] = rng.integers(0, 256, (40, 28, 28)).astype(np.uint8)
        _idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 0x08, (1000, 28, 28), pixels[prefix])
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert export_dataset("fashion-mnist", tmp_path / "out", limit_per_class=3) == {"train": 30, "val": 30}
    first_bag = np.asarray(Image.open(tmp_path / "out" / "val" / CLASS_FOLDERS[8] / "00001.png"))
    np.testing.assert_array_equal(first_bag, pixels["t10k"][8])
    # as shards too, each split with its own images (the train shards once held the test images)
    assert export_dataset("fashion-mnist", tmp_path / "wds", limit_per_class=3, format="webdataset") == {
        "train": 30, "val": 30}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        with tarfile.open(tmp_path / "wds" / split / f"{split}-000000.tar") as tar:
            first = np.asarray(Image.open(tar.extractfile("0000001.png")))
        np.testing.assert_array_equal(first, pixels[prefix][1])
    with pytest.raises(ValueError, match="expected"):  # a whole split still checks the whole file
        fm.load_fashion_mnist("train")


FOOTWEAR_AND_BAGS = ("Sandal", "Sneaker", "Bag", "Ankle boot")


@needs_fashion_mnist
def test_data_classes_keeps_one_domain_of_fashion_mnist_relabelled_in_the_order_named(fm_test):
    from simmim.engine.builders import eval_source, labelled_source, unlabelled_source

    images, labels = fm_test
    domain = eval_source("fashion-mnist", FOOTWEAR_AND_BAGS)
    assert domain.classes == list(FOOTWEAR_AND_BAGS) and len(domain) == 4000  # 1,000 test images per class
    originals = {5: 0, 7: 1, 8: 2, 9: 3}  # Sandal, Sneaker, Bag, Ankle boot
    for position in (0, 1, 1234, 3999):
        index = int(domain.indices[position])
        image, label = domain[position]
        assert originals[int(labels[index])] == label == domain.targets[position]
        assert np.array_equal(np.asarray(image)[:, :, 0], images[index])
    assert sorted(set(domain.targets)) == [0, 1, 2, 3]
    train = labelled_source("fashion-mnist", "train", 5, seed=3, classes=FOOTWEAR_AND_BAGS)
    assert len(train) == 20 and sorted(train.targets) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    reordered = eval_source("fashion-mnist", ("Bag", "Sandal"))
    assert reordered.classes == ["Bag", "Sandal"] and reordered[int(np.flatnonzero(  # labels follow the order named
        np.asarray(reordered.targets) == 1)[0])][1] == 1
    assert len(unlabelled_source("fashion-mnist", ("Trouser",))) == 6000
    # without classes nothing changes: the same balanced subset as before
    assert list(labelled_source("fashion-mnist", "train", 2, seed=1).indices) == list(
        fm.balanced_subset(fm.load_labels("train"), 2, 1))


def test_data_classes_selects_class_folders_and_refuses_an_unknown_class_in_one_line(tmp_path):
    from simmim.engine.builders import eval_source, heldout_source, labelled_source, unlabelled_source

    for split in ("train", "val"):
        for name in ("cat", "dog", "fox"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    root = str(tmp_path)
    train = labelled_source(root, "train", classes=("fox", "cat"))
    assert train.classes == ["fox", "cat"] and len(train) == 6 and sorted(train.targets) == [0, 0, 0, 1, 1, 1]
    assert all(train.source.samples[i][0].split("/")[-2] == ("fox", "cat")[t]
               for i, t in zip(train.indices, train.targets, strict=True))
    assert len(unlabelled_source(root, ("dog",))) == 3 and len(heldout_source(root, ("dog",))) == 3
    assert len(unlabelled_source(root)) == 9  # every image below train/ without classes
    with pytest.raises(ValueError, match=r"^data.classes: unknown class 'fxo'; did you mean 'fox'\?$"):
        eval_source(root, ("fxo",))
    with pytest.raises(ValueError, match=r"^data.classes: unknown class 'bird'; the data's classes: cat, dog, fox$"):
        labelled_source(root, "val", classes=("cat", "bird"))


def test_data_classes_from_the_command_line(tmp_path, capsys):
    from simmim.cli import main
    from simmim.config import load_config

    cfg = load_config("fashion-mnist-finetune", overrides=["data.classes=Sandal, Sneaker,Bag,Ankle boot"])
    assert cfg.data.classes == FOOTWEAR_AND_BAGS
    with pytest.raises(ValueError, match=r"^data.classes: expected distinct class names or none"):
        load_config("fashion-mnist-finetune", overrides=["data.classes=Bag,Bag"])
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "only" / "0.png")
    code = main(["finetune", "--preset", "nano-finetune", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--set", "data.classes=onyl"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("data.classes: unknown class 'onyl'; "
                                                                     "did you mean 'only'?")
