"""The training engine on CPU with the 64 px nano models: recipes' math, end-to-end runs, exact resume,
non-finite steps, crash-safe checkpoints, robust data loading and the CLI subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.checkpoint import training as ckpt
from simmim.config import OptimConfig, load_config
from simmim.data.datasets import EpochSampler, SeededSamples, image_files, load_rgb, loader_settings
from simmim.data.fashion_mnist import FASHION_MNIST_DIR
from simmim.engine import NonFiniteLossError, add_commands, evaluate, finetune, pretrain
from simmim.engine.builders import labelled_source, unlabelled_source
from simmim.engine.distributed import DistEnv
from simmim.engine.finetuning import FinetuneTask
from simmim.engine.logging import RunLogger
from simmim.engine.optim import LRSchedule, build_optimizer, decays, layer_id, param_groups, scale_lrs
from simmim.engine.pretraining import PretrainTask
from simmim.hardware import auto_precision
from simmim.zoo import build_model, get_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory, image_folder) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


# -- layer decay, weight decay, lr scaling and schedule against hand-computed values --------------------

def test_swin_base_layer_ids_and_scales():
    with torch.device("meta"):
        model = build_model(get_spec("simmim_finetune__swin_base__img224_window7__800ep"))
    encoder = model.encoder  # depths (2, 2, 18, 2): N = 24
    expected = {
        "encoder.patch_embed.proj.weight": 0, "encoder.layers.0.blocks.0.attn.qkv.weight": 1,
        "encoder.layers.0.blocks.1.norm1.bias": 2, "encoder.layers.0.downsample.reduction.weight": 2,
        "encoder.layers.1.blocks.0.mlp.fc1.weight": 3, "encoder.layers.1.downsample.norm.weight": 4,
        "encoder.layers.2.blocks.0.attn.relative_position_bias_table": 5,
        "encoder.layers.2.blocks.17.mlp.fc2.weight": 22, "encoder.layers.2.downsample.reduction.weight": 22,
        "encoder.layers.3.blocks.0.norm2.weight": 23, "encoder.layers.3.blocks.1.attn.proj.weight": 24,
        "encoder.norm.weight": 25, "head.weight": 25, "head.bias": 25,
    }
    names = dict(model.named_parameters())
    for name, layer in expected.items():
        assert name in names and layer_id(name, encoder) == layer, name
    assert layer_id("encoder.mask_token", encoder) == 0 and layer_id("encoder.absolute_pos_embed", encoder) == 25

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.8)
    scale = {(g["layer"], g["weight_decay"] > 0): g["lr_scale"] for g in groups}
    assert scale[(0, True)] == pytest.approx(0.8**25) and scale[(1, True)] == pytest.approx(0.8**24)
    assert scale[(22, True)] == pytest.approx(0.8**3) and scale[(25, True)] == 1.0
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    assert len({id(p) for g in groups for p in g["params"]}) == len(names)


def test_vit_layer_ids():
    with torch.device("meta"):
        model = build_model(get_spec("simmim_finetune__vit_base__img224__800ep"))
    ids = {n: layer_id(n, model.encoder) for n, _ in model.named_parameters()}
    assert ids["encoder.cls_token"] == ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.blocks.0.attn.q_bias"] == 1 and ids["encoder.blocks.11.gamma_2"] == 12
    assert ids["encoder.blocks.5.attn.relative_position_bias_table"] == 6
    assert ids["fc_norm.weight"] == ids["head.weight"] == 13


def test_no_weight_decay_on_1d_params_biases_tokens_and_position_tables():
    with torch.device("meta"):
        model = build_model(get_spec("simmim_swin-nano_test-64px"))
    skip = model.no_weight_decay()
    names = {n: decays(n, p, skip) for n, p in model.named_parameters()}
    assert not names["encoder.mask_token"] and not names["encoder.patch_embed.proj.bias"]
    assert not names["encoder.layers.0.blocks.0.norm1.weight"]
    assert not names["encoder.layers.0.blocks.0.attn.relative_position_bias_table"]
    assert names["encoder.layers.0.blocks.0.attn.qkv.weight"] and names["decoder.0.weight"]
    optimizer = build_optimizer(model, OptimConfig())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.05]  # layer_decay 1: two groups
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8


def test_linear_scaling_rule_includes_accumulation():
    cfg = load_config("swin-base-pretrain-100e").optim
    s = scale_lrs(cfg, batch_size=128, world_size=16)  # the README's 16 x 128 = 2048
    assert (s.effective_batch, s.lr, s.warmup_lr, s.min_lr) == (2048, pytest.approx(8e-4), pytest.approx(4e-6),
                                                                pytest.approx(4e-5))
    cfg.accumulation_steps = 2
    assert scale_lrs(cfg, batch_size=128, world_size=8).lr == pytest.approx(8e-4)


def test_schedules_at_hand_computed_iterations():
    cfg = load_config("swin-base-pretrain-100e")
    cosine = LRSchedule.from_config(scale_lrs(cfg.optim, 128, 16), cfg.schedule, steps_per_epoch=10)
    assert (cosine.total_steps, cosine.warmup_steps) == (1000, 100)
    assert cosine(0) == pytest.approx(4e-6)
    assert cosine(50) == pytest.approx(4e-6 + (8e-4 - 4e-6) * 0.5)
    assert cosine(100) == pytest.approx(4e-5 + 0.5 * (8e-4 - 4e-5) * (1 + math.cos(math.pi * 0.1)))
    assert cosine(500) == pytest.approx(4e-5 + 0.5 * (8e-4 - 4e-5))
    assert cosine(1000) == pytest.approx(4e-5)

    cfg = load_config("swin-base-pretrain-800e")
    multistep = LRSchedule.from_config(scale_lrs(cfg.optim, 128, 16), cfg.schedule, steps_per_epoch=10)
    assert multistep(0) == pytest.approx(2e-6) and multistep(99) == pytest.approx(2e-6 + (4e-4 - 2e-6) * 0.99)
    assert multistep(100) == multistep(6999) == pytest.approx(4e-4)
    assert multistep(7000) == multistep(7999) == pytest.approx(4e-5)

    optimizer = torch.optim.AdamW([{"params": [torch.zeros(1)], "lr_scale": 0.5}, {"params": [torch.zeros(1)]}])
    assert multistep.apply(optimizer, 7000) == pytest.approx(4e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(2e-5), pytest.approx(4e-5)]


# -- data ------------------------------------------------------------------------------------------------

def test_sharded_batches_are_the_single_process_batches_and_resume_skips():
    one = list(EpochSampler(21, batch_size=8, seed=3))
    shards = [list(EpochSampler(21, batch_size=4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 16 and all(len(s) == 8 for s in shards)
    for k in range(2):  # the ranks' k-th batches together are the k-th batch of one process
        assert sorted(one[8 * k: 8 * k + 8]) == sorted(shards[0][4 * k: 4 * k + 4] + shards[1][4 * k: 4 * k + 4])
    resumed = EpochSampler(21, batch_size=8, seed=3)
    resumed.set_epoch(0, start_batch=1)
    assert list(resumed) == one[8:]
    later = EpochSampler(21, batch_size=8, seed=3)
    later.set_epoch(1)
    assert [i for i, _ in later] != [i for i, _ in one]
    evaluation = [EpochSampler(5, batch_size=2, rank=r, world_size=2, shuffle=False) for r in range(2)]
    assert [e.indices() for e in evaluation] == [[0, 2, 4], [1, 3, 0]]
    assert [e.real_count for e in evaluation] == [3, 2]


def test_any_image_mode_becomes_rgb_and_unreadable_files_are_replaced(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint16)[None] * 1000, (64, 1))
    Image.fromarray(gray).save(tmp_path / "a_16bit.png")
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(tmp_path / "b_rgba.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "c_cmyk.jpg")
    Image.new("L", (64, 64), 77).save(tmp_path / "d_gray.png")
    Image.new("P", (64, 64), 3).save(tmp_path / "e_palette.gif")
    (tmp_path / "f_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    jpeg = tmp_path / "g_truncated.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:100])
    for name in ("a_16bit.png", "b_rgba.png", "c_cmyk.jpg", "d_gray.png", "e_palette.gif"):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (64, 64), name
    assert np.asarray(load_rgb(tmp_path / "a_16bit.png"))[0, -1, 0] == round(63000 / 257)

    files = image_files(tmp_path)
    samples = SeededSamples(files, lambda im: torch.from_numpy(np.asarray(im).copy()))
    broken = [i for i, (path, _) in enumerate(files.samples) if "broken" in path or "truncated" in path]
    assert len(files) == 7 and len(broken) == 2
    image, _, _, skipped = samples[(broken[0], 5)]
    assert skipped == (files.samples[broken[0]][0],) + ((files.samples[broken[1]][0],) if broken[1] == broken[0] + 1
                                                        else ())
    assert torch.equal(image, samples[(broken[0], 5)][0])  # the replacement is deterministic


def test_list_files_and_folders_of_unlabelled_images(images, tmp_path):
    listed = tmp_path / "list.txt"
    absolute = images / "val" / "class_1" / "0.png"
    (tmp_path / "x.png").write_bytes(absolute.read_bytes())
    listed.write_text(f"# pretraining images\nx.png\n\n{absolute}\n")
    assert [p for p, _ in image_files(listed).samples] == [str(tmp_path / "x.png"), str(absolute)]
    assert len(image_files(images)) == 22  # recursive: train and val
    listed.write_text("# nothing yet\n")
    with pytest.raises(FileNotFoundError, match="no images found"):
        image_files(listed)


def test_loader_workers_and_pinning_follow_the_machine():
    cpus = len(os.sched_getaffinity(0))
    assert loader_settings(None, torch.device("cpu")) == dict(
        num_workers=max(0, min(8, cpus - 1)), pin_memory=False, persistent_workers=cpus > 1)
    assert loader_settings(0, torch.device("cuda", 0)) == dict(num_workers=0, pin_memory=True, persistent_workers=False)
    assert loader_settings(None, torch.device("cpu"), local_world_size=cpus)["num_workers"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_splits_and_labelled_subsets():
    train = labelled_source("fashion-mnist", "train", labels_per_class=3, seed=1)
    assert len(train) == 30 and np.bincount(train.targets).tolist() == [3] * 10
    assert labelled_source("fashion-mnist", "train", 3, seed=1).indices.tolist() == train.indices.tolist()
    assert labelled_source("fashion-mnist", "train", 3, seed=2).indices.tolist() != train.indices.tolist()
    assert len(labelled_source("fashion-mnist", "val")) == 10_000 and len(unlabelled_source("fashion-mnist")) == 60_000
    image, _ = train[0]
    assert image.mode == "RGB" and image.size == (28, 28)


# -- end-to-end runs -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pretraining_overfits_one_batch_and_writes_its_run_folder(images, tmp_path, settings, no_augment):
    out = tmp_path / "pretrain"
    cfg = load_config("nano-pretrain", overrides=settings(
        "pretrain", images / "train" / "class_0", out, "data.batch_size=8", "schedule.epochs=30",
        "optim.lr=0.128", "optim.min_lr=0.0128", "runtime.vis_every=15", "runtime.tensorboard=true",
        "checkpoint.every_epochs=10", *no_augment))
    result = pretrain(cfg)  # 8 images, batch 8: the same batch 30 times (with fresh masks)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 30 and result.steps == 30
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5]), losses
    assert result.checkpoint == out / "ckpt-00000030.pt" and [p.name for p in ckpt.list_checkpoints(out)] == [
        "ckpt-00000010.pt", "ckpt-00000020.pt", "ckpt-00000030.pt"]
    state = ckpt.load(result.checkpoint)
    # the run records the kernels it decided (runtime.gemm_route=auto becomes the route it took)
    decided = state["config"]["runtime"]
    assert decided["gemm_route"] in ("onednn", "mixed", "aten") and decided["recompute"] == cfg.runtime.recompute
    ran = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, gemm_route=decided["gemm_route"]))
    assert state["config"] == load_config(path=out / "config.yaml").to_dict() == ran.to_dict()
    assert (state["epoch"], state["batch"], state["step"]) == (30, 0, 30)
    assert sorted(p.name for p in (out / "reconstructions").iterdir()) == ["epoch_0015.png", "epoch_0030.png"]
    assert (out / "loss_curve.png").stat().st_size > 0 and any((out / "tensorboard").iterdir())
    assert result.images_per_second > 0 and result.skipped_steps == 0 and not result.skipped_files


@pytest.mark.slow
def test_pretraining_measures_reconstruction_on_held_out_images(images, tmp_path, settings, no_augment):
    out = tmp_path / "pretrain"
    cfg = load_config("nano-pretrain", overrides=settings(
        "pretrain", images, out, "schedule.epochs=8", "optim.lr=0.128", "optim.min_lr=0.0128", *no_augment))
    pretrain(cfg)  # trains on images/train, measures on the 6 images of images/val
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [r["heldout_loss"] for r in records if r["kind"] == "eval"]
    assert len(heldout) == 8
    assert heldout[-1] < 0.8 * heldout[0], heldout


@pytest.mark.slow
def test_finetuning_overfits_one_batch_and_evaluate_reads_its_checkpoint(images, tmp_path, settings, no_augment):
    out = tmp_path / "finetune"
    train = images / "train"
    cfg = load_config("nano-finetune", overrides=settings(
        "finetune", images, out, "data.batch_size=8", "data.labels_per_class=4", "schedule.epochs=30",
        "optim.lr=0.128", "optim.min_lr=0.0128", "model.drop_path_rate=0", "augment.mixup=0", "augment.cutmix=0",
        "augment.auto_augment=none", "augment.reprob=0", "augment.label_smoothing=0", "checkpoint.every_epochs=10",
        *no_augment))
    result = finetune(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert result.metrics["top1"] == final["top1"] and result.metrics["best_top1"] >= final["top1"]

    metrics = evaluate(result.checkpoint, str(images), batch_size=4, num_workers=0)
    assert metrics["images"] == 6 and metrics["top1"] == pytest.approx(final["top1"])
    assert metrics["top5"] == 100.0 and metrics["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert evaluate(result.checkpoint, str(train), batch_size=16, num_workers=0)["images"] == 16
    pretrained = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", images, tmp_path / "p",
                                                                           "schedule.epochs=1")))
    with pytest.raises(ValueError, match="is a pretrain checkpoint; evaluate needs a fine-tuned classifier"):
        evaluate(pretrained.checkpoint, str(images))


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_resuming_mid_epoch_gives_bit_identical_weights(images, tmp_path, task, settings, params_of):
    # random crops, flips, drop path, and for fine-tuning RandAugment, erasing and mixup all draw from
    # the streams the checkpoint must restore
    run = pretrain if task == "pretrain" else finetune
    common = ["model.drop_path_rate=0.1", "checkpoint.keep=10", "schedule.epochs=2", "schedule.warmup_epochs=1"]
    whole = run(load_config(f"nano-{task}", overrides=settings(task, images, tmp_path / "whole", *common,
                                                                "checkpoint.every_steps=3")))
    assert whole.steps == 8  # 16 images, batch 4: stopping at step 3 is mid-epoch 1
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "ckpt-00000003.pt").write_bytes((tmp_path / "whole" / "ckpt-00000003.pt").read_bytes())
    resumed = run(load_config(f"nano-{task}", overrides=settings(task, images, resumed_dir, *common,
                                                                  "checkpoint.resume=auto")))
    a, b = params_of(whole.checkpoint), params_of(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt.load(whole.checkpoint)["optimizer"]["state"].keys() == ckpt.load(resumed.checkpoint)["optimizer"][
        "state"].keys()


def test_non_finite_losses_are_skipped_and_counted(images, tmp_path, monkeypatch, settings):
    calls = []
    real_loss = PretrainTask.loss

    def flaky(self, model, images, masks):
        calls.append(1)
        loss = real_loss(self, model, images, masks)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(PretrainTask, "loss", flaky)
    result = pretrain(load_config("nano-pretrain", overrides=settings(
        "pretrain", images, tmp_path / "run", "schedule.epochs=1", "checkpoint.every_steps=1", "checkpoint.keep=5")))
    assert result.skipped_steps == 2 and result.steps == 4
    skips = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in skips if r["kind"] == "skip"] == [2, 3]
    # no checkpoint during the streak, and AdamW stepped only for the two good steps
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["ckpt-00000001.pt", "ckpt-00000004.pt"]
    adam = ckpt.load(result.checkpoint)["optimizer"]["state"]
    assert {float(s["step"]) for s in adam.values()} == {2.0}


def test_consecutive_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(images, tmp_path, monkeypatch,
                                                                                      settings):
    calls = []
    real_loss = PretrainTask.loss

    def diverging(self, model, images, masks):
        calls.append(1)
        loss = real_loss(self, model, images, masks)
        return loss * float("inf") if len(calls) > 2 else loss

    monkeypatch.setattr(PretrainTask, "loss", diverging)
    out = tmp_path / "run"
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", images, out, "schedule.epochs=2",
                                                          "checkpoint.every_steps=1", "runtime.max_bad_steps=3"))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* last good checkpoint is .*ckpt-00000002"):
        pretrain(cfg)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert ckpt.load(out / "ckpt-00000002.pt")["step"] == 2


# Where a SIGKILL lands in the second checkpoint's save: the hook hangs there until the kill.
KILL_POINTS = {
    # halfway through writing the temp file
    "mid-write": """
        real = torch.save
        def hook(obj, f, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"PK\\x03\\x04 a partial zip"); hang()
            return real(obj, f, *args, **kwargs)
        torch.save = hook
    """,
    # the temp file complete and fsynced, not yet renamed
    "before-rename": """
        import os
        real = os.replace
        def hook(src, dst):
            if "ckpt-00000002" in str(dst): hang()
            return real(src, dst)
        os.replace = hook
    """,
    # renamed, the older checkpoint not yet deleted (keep=1)
    "before-cleanup": """
        import pathlib
        real = pathlib.Path.unlink
        def hook(self, *args, **kwargs):
            if self.name == "ckpt-00000001.pt": hang()
            return real(self, *args, **kwargs)
        pathlib.Path.unlink = hook
    """,
}


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(images, tmp_path, point, settings,
                                                                               src_env):
    out = tmp_path / "run"
    overrides = settings("pretrain", images, out, "checkpoint.every_steps=1", "checkpoint.keep=1")
    script = "\n".join([
        "import time, torch",
        "from simmim.config import load_config",
        "from simmim.engine import pretrain",
        "calls = []",
        "def hang():",
        "    print('saving', flush=True)",
        "    time.sleep(120)",
        textwrap.dedent(KILL_POINTS[point]),
        "torch.set_num_threads(1)",
        f"pretrain(load_config('nano-pretrain', overrides={overrides!r}))",
    ])
    env = src_env()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("saving"):
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    newest = 2 if point == "before-cleanup" else 1
    if point != "before-cleanup":
        assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the interrupted write
    assert ckpt.list_checkpoints(out)[-1].name == f"ckpt-0000000{newest}.pt"
    assert ckpt.resume_path("auto", out) == out / f"ckpt-0000000{newest}.pt"
    assert ckpt.load(out / f"ckpt-0000000{newest}.pt")["step"] == newest
    resumed = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", images, out, "schedule.epochs=1",
                                                                        "checkpoint.resume=auto")))
    assert resumed.steps == 4


def test_unreadable_images_are_skipped_counted_and_listed(images, tmp_path, settings):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, path in enumerate(sorted((images / "train" / "class_1").iterdir())):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    (folder / "3.png").write_bytes(b"not an image")
    result = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", folder, tmp_path / "run",
                                                                       "schedule.epochs=1")))
    assert result.skipped_files == [str(folder / "3.png")]
    assert (tmp_path / "run" / "skipped_files.txt").read_text() == f"{folder / '3.png'}\n"


# -- the subcommands -------------------------------------------------------------------------------------

def cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="simmim")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    args.func(args)


QUIET = ["--set", "data.num_workers=0", "--set", "runtime.tensorboard=false", "--set", "runtime.vis_every=0"]


@pytest.mark.slow
def test_commands_train_resume_and_evaluate(images, tmp_path, capsys):
    cli("pretrain", "--preset", "nano-pretrain", "--data", images, "--out", tmp_path / "p", "--epochs", "1",
        "--batch-size", "8", *QUIET)
    assert (tmp_path / "p" / "ckpt-00000002.pt").is_file()
    precision, why = auto_precision(torch.device("cpu"))  # the header names runtime.precision=auto's choice
    assert f" loader workers), {precision} ({why}); effective batch" in capsys.readouterr().out
    cli("pretrain", "--out", tmp_path / "p", "--resume", "auto", "--epochs", "2")  # config from the checkpoint
    assert ckpt.load(tmp_path / "p" / "ckpt-00000004.pt")["config"]["data"]["batch_size"] == 8
    # the published recipe's augmentation: RandAugment, random erasing, mixup/cutmix, label smoothing
    cli("finetune", "--preset", "nano-finetune", "--data", images, "--out", tmp_path / "f", "--epochs", "1",
        "--batch-size", "4", *QUIET)
    capsys.readouterr()
    cli("evaluate", tmp_path / "f" / "ckpt-00000004.pt", "--data", images, "--batch-size", "4")
    assert "(6 images)" in capsys.readouterr().out


@pytest.mark.slow
def test_finetuning_starts_from_a_pretraining_run(images, tmp_path, capsys, settings, params_of):
    cli("pretrain", "--preset", "nano-pretrain", "--data", images, "--out", tmp_path / "p", "--epochs", "1",
        "--batch-size", "8", *QUIET)
    pretrained = tmp_path / "p" / "ckpt-00000002.pt"
    cli("finetune", "--preset", "nano-finetune", "--data", images, "--out", tmp_path / "f", "--epochs", "1",
        "--batch-size", "8", "--pretrained", pretrained, *QUIET)
    assert f"pretrained weights from {pretrained}: " in capsys.readouterr().out

    cfg = load_config("nano-finetune", overrides=settings("finetune", images, tmp_path / "g",
                                                          f"model.pretrained={pretrained}"))
    task = FinetuneTask(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")), RunLogger(tmp_path / "g", enabled=False))
    key = "encoder.layers.2.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(task.build_model(resuming=False).state_dict()[key], params_of(pretrained)[key])
    assert not torch.equal(task.build_model(resuming=True).state_dict()[key], params_of(pretrained)[key])


@pytest.mark.slow
def test_mounting_the_commands_leaves_the_training_stack_unimported(src_env):
    code = ("import argparse, sys; from simmim.engine import add_commands; "
            "add_commands(argparse.ArgumentParser().add_subparsers()); "
            "print([m for m in ('torchvision', 'timm', 'torch.distributed.checkpoint') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=src_env())
    assert run.stdout.strip() == "[]"  # `simmim --help` and the other commands stay fast


@pytest.mark.parametrize(("argv", "message"), [
    (["pretrain", "--preset", "nano-finetune"], "nano-finetune is a finetune recipe; run `simmim finetune`"),
    (["pretrain"], "pass --preset NAME or --config FILE.yaml"),
    (["pretrain", "--preset", "nano-pretrain", "--resume", "auto"], "--resume auto needs --out RUN_DIR"),
    (["pretrain", "--out", "RUN", "--resume", "auto"], "--resume auto: no checkpoint in"),
    (["pretrain", "--preset", "nano-pretrain", "--set", "optim.lrr=1"], "did you mean 'optim.lr'?"),
    (["finetune", "--preset", "nano-finetune", "--out", "RUN", "--data", "/nonexistent"],
     "/nonexistent/train not found"),
    (["pretrain", "--preset", "nano-pretrain", "--out", "RUN", "--data", "/nonexistent"],
     "no image folder or list file at"),
])
def test_command_errors_are_one_line(argv, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        cli(*[tmp_path / "run" if a == "RUN" else a for a in argv])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_randaugment_posterize_to_zero_bits_works_on_current_pillow():
    from timm.data import auto_augment

    from simmim.data.transforms import patch_posterize
    from simmim.engine.builders import train_transform

    transform = train_transform(load_config("nano-finetune").augment, 64)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", ())]
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert posterize and all(op.aug_fn is not auto_augment.posterize for op in posterize)
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize[0].aug_fn(image, 0)).max() == 0  # no bit kept: black, as older Pillow gave
    assert np.asarray(posterize[0].aug_fn(image, 2)).max() == 192
    assert patch_posterize(transform) is transform


# -- one run per folder ------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str]:
    """`simmim ARGV` in this process: (exit status, stderr)."""
    from simmim.cli import main

    capsys.readouterr()
    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_a_new_run_into_a_folder_holding_a_run_is_refused_unless_overwritten(images, tmp_path, capsys):
    """The issue's sequence: 2 epochs, then 1 epoch into the same folder, then --resume auto."""
    out = tmp_path / "pre1"
    common = ["--preset", "nano-pretrain", "--data", images, "--batch-size", "4", "--out", out, *QUIET]
    assert run_cli(capsys, "pretrain", *common, "--epochs", "2")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    status, err = run_cli(capsys, "pretrain", *common, "--epochs", "1")
    assert status == 2 and err.count("\n") == 1, err
    assert "--resume auto" in err and "--overwrite" in err and f"{out}-2" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched

    # resuming the finished run does nothing and reports its last loss, not NaN
    assert run_cli(capsys, "pretrain", "--out", out, "--resume", "auto")[0] == 0
    summary = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["kind"] == "summary" and math.isfinite(summary["train_loss"])

    # --overwrite starts clean: no checkpoint, metrics or config of the first run are left
    assert run_cli(capsys, "pretrain", *common, "--epochs", "1", "--overwrite")[0] == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000004.pt"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("summary") == 1 and max(r["step"] for r in records) == 4
    assert load_config(path=out / "config.yaml").schedule.epochs == 1

    # a changed recipe does not resume silently; more epochs may
    status, err = run_cli(capsys, "pretrain", *common, "--resume", "auto", "--set", "optim.lr=1e-3")
    assert status == 2 and err.count("\n") == 1 and "optim.lr" in err, err
    assert run_cli(capsys, "pretrain", *common, "--resume", "auto", "--epochs", "2")[0] == 0
    assert ckpt.load(out / "ckpt-00000008.pt")["step"] == 8


def test_overwrite_removes_only_the_files_a_run_writes(images, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--preset", "nano-pretrain", "--data", images, "--batch-size", "8", "--out", out, "--epochs", "1", *QUIET]
    assert run_cli(capsys, "pretrain", *common)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run_cli(capsys, "pretrain", *common, "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    status, err = run_cli(capsys, "pretrain", *common, "--overwrite", "--resume", "auto")
    assert status == 2 and "--overwrite" in err and "--resume" in err


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_every_checkpoint_draws_the_loss_curve_over_steps(images, tmp_path, monkeypatch, task, settings):
    """Fine-tuning runs have a curve too, and a run stopped before its end has the one of its last checkpoint."""
    from simmim.engine import loop

    drawn = []
    real = loop.save_curves
    monkeypatch.setattr(loop, "save_curves",
                        lambda curves, path, **kw: drawn.append(curves) or real(curves, path, **kw))
    monkeypatch.setattr(FinetuneTask if task == "finetune" else PretrainTask, "finish",
                        lambda self, run, seconds: (_ for _ in ()).throw(KeyboardInterrupt))
    extra = ["augment.mixup=0", "augment.cutmix=0"] if task == "finetune" else []
    cfg = load_config(f"nano-{task}", overrides=settings(task, images, tmp_path / "run", "schedule.epochs=2",
                                                          "runtime.log_every=2", *extra))
    with pytest.raises(KeyboardInterrupt):
        (pretrain if task == "pretrain" else finetune)(cfg)
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    steps, _ = drawn[-1]["train loss"]
    assert len(drawn) == 2 and list(steps) == [2, 4, 6, 8]  # optimizer steps, not record numbers


def test_evaluate_reads_exported_folders_and_published_checkpoint_layouts(images, tmp_path, capsys):
    """One fine-tuned classifier as a training checkpoint, an exported folder and the official, mmpretrain
    and HF files of it (written by `simmim convert`): the same accuracy from each."""
    cli("finetune", "--preset", "nano-finetune", "--data", images, "--out", tmp_path / "f", "--epochs", "1",
        "--batch-size", "4", *QUIET)
    trained = tmp_path / "f" / "ckpt-00000004.pt"
    expected = evaluate(trained, str(images), batch_size=4, num_workers=0)
    assert run_cli(capsys, "export", trained, tmp_path / "exported")[0] == 0
    assert evaluate(tmp_path / "exported", str(images), batch_size=4, num_workers=0) == expected
    # HF's from_pretrained folder (the nano model is too small for HF's config: its weights file alone)
    (tmp_path / "hf-folder").mkdir()
    assert run_cli(capsys, "convert", trained, tmp_path / "hf-folder" / "model.safetensors", "--to", "hf")[0] == 0
    for layout in ("official.pth", "mmpretrain.pth", "hf.pth", "hf-folder"):
        if layout.endswith(".pth"):
            assert run_cli(capsys, "convert", trained, tmp_path / layout, "--to", layout[:-4])[0] == 0
        published = evaluate(tmp_path / layout, str(images), batch_size=4, num_workers=0,
                             model="swin-nano_test-64px")
        assert published == pytest.approx(expected, rel=1e-6), layout
    capsys.readouterr()
    cli("evaluate", tmp_path / "hf.pth", "--model", "swin-nano_test-64px", "--data", images, "--batch-size", "4")
    assert f"top-1 {expected['top1']:.2f}" in capsys.readouterr().out
    status, err = run_cli(capsys, "evaluate", tmp_path / "official.pth", "--data", images)
    assert status == 2 and "--model NAME" in err, err


@pytest.mark.slow
def test_images_per_second_leave_out_evaluation_and_checkpoints(images, tmp_path, monkeypatch, settings):
    import time

    from simmim.engine import loop

    pause = 1.0
    real_end, real_save = PretrainTask.end_epoch, loop.Run.save
    monkeypatch.setattr(PretrainTask, "end_epoch",
                        lambda self, run, epoch: time.sleep(pause) or real_end(self, run, epoch))
    monkeypatch.setattr(loop.Run, "save", lambda self: time.sleep(pause) or real_save(self))
    result = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", images, tmp_path / "run",
                                                                       "schedule.epochs=2", "runtime.log_every=1")))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if r["kind"] == "train"]
    paused = 4 * pause  # 2 evaluations, 2 checkpoints
    assert result.images_per_second >= 0.9 * result.steps * 4 / (result.seconds - paused)
    # the first step after the evaluation and checkpoint is as fast as the others
    assert rates[4] > 0.2 * float(np.median(rates)), rates
