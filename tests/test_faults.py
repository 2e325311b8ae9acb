"""Faults lose nothing: SIGTERM/SIGINT stop after a step with a checkpoint, and resuming gives the
uninterrupted run's weights; bad inputs are one-line errors; bad images are skipped and named."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from simmim.checkpoint import training as ckpt
from simmim.config import load_config
from simmim.engine import pretrain

pytestmark = pytest.mark.slow  # training runs in subprocesses, killed and resumed


@pytest.fixture(scope="module")
def images(tmp_path_factory, image_folder):
    return image_folder(tmp_path_factory.mktemp("images"), train_per_class=16)


def _cli(src_env, *args):
    env = src_env(OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "simmim.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_matches(images, tmp_path, signum, settings,
                                                                            params_of, src_env):
    common = settings("pretrain", images, tmp_path, "schedule.epochs=3")
    args = ["pretrain", "--preset", "nano-pretrain", *[a for s in common for a in ("--set", s)]]
    out = tmp_path / "interrupted"
    proc = _cli(src_env, *args, "--out", str(out))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume auto" in err
    stopped_at = ckpt.load(ckpt.list_checkpoints(out)[-1])["step"]
    assert 3 <= stopped_at < 3 * 8  # 32 images / batch 4 = 8 steps an epoch

    resumed = _cli(src_env, *args, "--out", str(out), "--resume", "auto")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    whole = pretrain(load_config("nano-pretrain", overrides=[*common, f"out_dir={tmp_path / 'whole'}"]))
    final = ckpt.list_checkpoints(out)[-1]
    a, b = params_of(final), params_of(whole.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_keeps_the_previous_checkpoint(images, tmp_path, monkeypatch, settings):
    import errno

    from simmim.checkpoint import io

    out = tmp_path / "run"
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", images, out, "schedule.epochs=2"))
    real_save = torch.save
    calls = []

    def fill_up(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(io.torch, "save", fill_up)
    with pytest.raises(OSError, match="No space left on device") as info:
        pretrain(cfg)
    assert str(out / "ckpt-00000016.pt") in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000008.pt"]
    assert ckpt.load(out / "ckpt-00000008.pt")["step"] == 8
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_verify_data_names_every_unusable_file(tmp_path, capsys, image_folder):
    from simmim.cli import main

    root = image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    bad = root / "train" / "class_0"
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = (root / "train" / "class_0" / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGBA", (40, 30)).save(bad / "rgba.png")
    Image.new("I;16", (40, 30)).save(bad / "sixteen.png")
    Image.new("CMYK", (40, 30)).save(bad / "cmyk.jpg")
    assert main(["verify-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{bad / 'empty.png'}: empty file" in out
    assert f"{bad / 'text.jpg'}: cannot identify image file" in out
    assert str(bad / "truncated.png") in out
    assert "rgba.png" not in out and "sixteen.png" not in out and "cmyk.jpg" not in out
    assert out.strip().endswith("12 images checked, 3 unusable")
    for path in ("empty.png", "text.jpg", "truncated.png"):
        (bad / path).unlink()
    assert main(["verify-data", str(root)]) == 0


def test_verify_data_checks_the_train_and_val_shards_that_pretrain_reads(tmp_path, capsys, image_folder):
    from simmim.cli import main
    from simmim.data.export import export_shards

    root = image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    (root / "val" / "class_1" / "bad.png").write_bytes(b"not an image")
    assert export_shards(str(root), tmp_path / "wds", shard_size=3) == {"train": 4, "val": 3}
    capsys.readouterr()
    assert main(["verify-data", str(tmp_path / "wds")]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "val-000000.tar" in out and out.endswith("7 images checked, 1 unusable\n"), out


def test_images_smaller_than_the_crop_and_of_any_mode_train(tmp_path, settings):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (3, 2), (200, 10, 10)).save(folder / "tiny.png")
    Image.new("L", (90, 20), 128).save(folder / "gray.png")
    Image.new("CMYK", (70, 70)).save(folder / "cmyk.jpg")
    Image.new("P", (64, 64)).save(folder / "palette.gif")
    Image.new("RGBA", (80, 64)).save(folder / "rgba.png")
    Image.new("I;16", (66, 66)).save(folder / "sixteen.png")
    result = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", folder, tmp_path / "run",
                                                                       "data.batch_size=2", "schedule.epochs=1")))
    assert result.steps == 3 and not result.skipped_files


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    from simmim.data.datasets import UnreadableImage, load_rgb

    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200 - 1)  # above the limit: PIL only warns
    with pytest.raises(UnreadableImage, match="decompression bomb refused"):
        load_rgb(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200 // 3)  # twice above: PIL raises
    with pytest.raises(UnreadableImage, match="decompression bomb refused"):
        load_rgb(tmp_path / "big.png")
