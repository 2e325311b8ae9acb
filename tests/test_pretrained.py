"""Continued pretraining (`simmim pretrain --pretrained SRC`, `model.pretrained`): every weights source
loads encoder, mask token and decoder exactly (same tensors, same loss on a fixed batch and mask),
other windows are resampled, encoder-only and fine-tuned checkpoints start the rest fresh, bad
sources stop the run before its data is read, and a resumed run keeps its own weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import simmim
from simmim.checkpoint.ecosystem import to_timm
from simmim.checkpoint.formats import HF, MMPRETRAIN, OFFICIAL
from simmim.checkpoint.io import atomic_save_safetensors
from simmim.checkpoint.resample import resample_rel_pos_bias
from simmim.cli import main
from simmim.config import load_config
from simmim.engine import pretrain
from simmim.engine.builders import build_network
from simmim.engine.distributed import DistEnv
from simmim.engine.logging import RunLogger
from simmim.engine.pretraining import PretrainTask, load_pretrained
from simmim.zoo import hub

pytestmark = pytest.mark.usefixtures("one_thread")

PRE, CLS = "simmim_swin-nano_test-64px", "swin-nano_test-64px"
QUIET = ["--set", "data.num_workers=0", "--set", "runtime.tensorboard=false", "--set", "runtime.vis_every=0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, image_folder) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def source(randomize) -> torch.nn.Module:
    """A pretraining model whose every tensor (mask token and decoder included) is random."""
    return randomize(simmim.get_model(PRE)).eval()


def _write(fmt: str, model: torch.nn.Module, root: Path) -> Path:
    """`model` saved in a published layout (or one of ours) under root; the path to pass as SRC."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "official":  # main_simmim.py's save_checkpoint: the weights under `model`, beside the yacs config
        path = root / "ckpt_epoch_99.pth"
        torch.save({"model": OFFICIAL.from_ours(state), "config": {"DATA": {"MASK_RATIO": 0.6}}, "epoch": 99}, path)
    elif fmt == "mmpretrain":
        path = root / "epoch_100.pth"
        torch.save({"state_dict": MMPRETRAIN.from_ours(state), "meta": {"epoch": 100}}, path)
    elif fmt == "hf":  # a from_pretrained folder (nano's 2 px last stage is too small for HF's own config)
        path = root / "hf"
        path.mkdir()
        atomic_save_safetensors(HF.from_ours(state), path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps({"model_type": "swin"}))
    elif fmt == "ours":  # what `simmim consolidate` and `convert --to simmim` write
        path = root / "weights.safetensors"
        atomic_save_safetensors(state, path)
    else:
        path = hub.export(model, root / "exported", name=PRE)
    return path


def _task(images: Path, out: Path, settings, *extra: str) -> PretrainTask:
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", images, out, *extra))
    return PretrainTask(cfg, DistEnv(0, 1, 0, 1, torch.device("cpu")), RunLogger(out, enabled=False))


def _fixed_loss(model: torch.nn.Module) -> torch.Tensor:
    """The masked-pixel loss on one fixed batch with one fixed mask (16 px blocks, the run's)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.from_numpy(np.random.default_rng(0).random((2, 4, 4)) < 0.6).long()
    mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2)  # one entry per 4 px model patch
    with torch.no_grad():
        return model.eval()(images, mask).loss


@pytest.mark.parametrize("fmt", ["official", "mmpretrain", "hf", "ours", "exported"])
def test_every_format_loads_encoder_mask_token_and_decoder(fmt, source, images, tmp_path, settings):
    src = _write(fmt, source, tmp_path)
    model = _task(images, tmp_path / "run", settings, f"model.pretrained={src}").build_model(resuming=False)
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key
    assert torch.equal(_fixed_loss(model), _fixed_loss(source))


def test_a_training_checkpoint_and_the_header_line(images, tmp_path, capsys, settings, params_of):
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(images), "--out", str(tmp_path / "a"),
                 "--epochs", "1", "--batch-size", "8", *QUIET]) == 0
    first = tmp_path / "a" / "ckpt-00000002.pt"
    trained = simmim.get_model(PRE)
    trained.load_state_dict(params_of(first))
    model = _task(images, tmp_path / "b", settings, f"model.pretrained={first}").build_model(resuming=False)
    assert all(torch.equal(v, params_of(first)[k]) for k, v in model.state_dict().items())
    assert torch.equal(_fixed_loss(model), _fixed_loss(trained))

    capsys.readouterr()
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(images), "--out", str(tmp_path / "b"),
                 "--epochs", "1", "--batch-size", "8", "--pretrained", str(first), *QUIET]) == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrained:")]
    assert header == [f"pretrained: encoder, decoder and mask token from {first} "
                      f"({len(trained.state_dict())} tensors, official layout)"]


def test_encoder_only_and_fine_tuned_checkpoints_start_decoder_and_mask_token_fresh(
        source, images, tmp_path, settings, randomize):
    timm_file = tmp_path / "timm.pth"
    torch.save(to_timm(source.state_dict()), timm_file)  # encoder only, as timm's Swin reads it
    task = _task(images, tmp_path / "run", settings, f"model.pretrained={timm_file}")
    torch.manual_seed(1)
    fresh = task.build_model(resuming=False)
    torch.manual_seed(1)
    initial = build_network(task.cfg)  # the same draws, no weights loaded
    for key, value in fresh.state_dict().items():
        new = key.startswith("decoder.") or key == "encoder.mask_token"
        assert torch.equal(value, (initial if new else source).state_dict()[key]), key

    classifier = randomize(simmim.get_model(CLS, num_classes=2))
    finetuned = tmp_path / "finetuned.safetensors"
    atomic_save_safetensors(dict(classifier.state_dict()), finetuned)
    model = _task(images, tmp_path / "run2", settings, f"model.pretrained={finetuned}").build_model(resuming=False)
    assert torch.equal(model.encoder.layers[0].blocks[0].attn.qkv.weight,
                       classifier.encoder.layers[0].blocks[0].attn.qkv.weight)
    assert load_pretrained(simmim.get_model(PRE), str(finetuned)).endswith(
        "official layout; left out head); decoder and mask token start fresh")


def test_the_header_says_what_starts_fresh_and_what_is_resampled(source, images, tmp_path, settings):
    timm_file = tmp_path / "timm.pth"
    torch.save(to_timm(source.state_dict()), timm_file)
    # window 4 -> 3: the 4 blocks of stages 1-3 resampled (stage 4's 2x2 map clamps both windows to 2)
    run_model = simmim.get_model(PRE, window_size=3)
    line = load_pretrained(run_model, str(timm_file))
    encoder = len(source.state_dict()) - 3  # all but the mask token and the decoder's weight and bias
    assert line == (f"pretrained: encoder from {timm_file} ({encoder} tensors, official layout; 4 position tables "
                    "resampled); decoder and mask token start fresh")
    key = "encoder.layers.0.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(run_model.state_dict()[key], resample_rel_pos_bias(source.state_dict()[key], 4, 3))


@pytest.mark.parametrize(("value", "message"), [
    ("/nonexistent/weights.pth", "model.pretrained: weights not found: /nonexistent/weights.pth"),
    ("garbage", "model.pretrained: .*garbage.* is not a PyTorch/safetensors checkpoint"),
    ("other-arch", "model.pretrained: checkpoint does not fit this pretraining model"),
])
def test_a_bad_source_is_one_line_before_the_data_is_read(value, message, tmp_path, capsys, randomize):
    if value == "garbage":
        value = tmp_path / "garbage.pth"
        value.write_bytes(b"not a checkpoint at all")
    elif value == "other-arch":  # a ViT's weights for a Swin run
        value = tmp_path / "vit.safetensors"
        atomic_save_safetensors(dict(simmim.get_model("simmim_vit-nano_test-64px").state_dict()), value)
    # the data folder does not exist either: the weights are refused first
    status = main(["pretrain", "--preset", "nano-pretrain", "--data", str(tmp_path / "no-data"),
                   "--out", str(tmp_path / "run"), "--set", f"model.pretrained={value}", *QUIET])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_own_weights(source, images, tmp_path, settings, params_of):
    first, other = _write("ours", source, tmp_path), tmp_path / "other.safetensors"
    atomic_save_safetensors({k: torch.zeros_like(v) for k, v in source.state_dict().items()}, other)

    def run(out: Path, epochs: int, *extra: str):
        cfg = load_config("nano-pretrain", overrides=settings("pretrain", images, out, f"schedule.epochs={epochs}",
                                                              *extra))
        return pretrain(cfg)

    run(tmp_path / "split", 1, f"model.pretrained={first}")
    shutil.copytree(tmp_path / "split", tmp_path / "copy")
    kept = run(tmp_path / "copy", 2, f"model.pretrained={first}", "checkpoint.resume=auto")
    # resumed with another source named (all zeros): the run continues from its checkpoint, not from it
    resumed = run(tmp_path / "split", 2, f"model.pretrained={other}", "checkpoint.resume=auto")
    a, b = params_of(kept.checkpoint), params_of(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["decoder.0.weight"], torch.zeros_like(b["decoder.0.weight"]))


def test_a_run_folder_is_its_newest_checkpoint(images, tmp_path, settings, params_of):
    run = pretrain(load_config("nano-pretrain", overrides=settings("pretrain", images, tmp_path / "a",
                                                                   "schedule.epochs=1")))
    model = _task(images, tmp_path / "b", settings, f"model.pretrained={tmp_path / 'a'}").build_model(resuming=False)
    assert all(torch.equal(v, params_of(run.checkpoint)[k]) for k, v in model.state_dict().items())


def test_another_input_size_resamples_the_position_tables(tmp_path, randomize):
    vit = "simmim_vit-nano_test-64px"
    source = randomize(simmim.get_model(vit))
    path = tmp_path / "vit.safetensors"
    atomic_save_safetensors(dict(source.state_dict()), path)
    run_model = simmim.get_model(vit, img_size=96)  # a 4x4 grid of 16 px patches -> 6x6
    assert load_pretrained(run_model, str(path)) == (
        f"pretrained: encoder, decoder and mask token from {path} ({len(source.state_dict())} tensors, official "
        "layout; 1 position table resampled)")
    key = "encoder.rel_pos_bias.relative_position_bias_table"  # BEiT's shared table, with its 3 cls rows
    assert torch.equal(run_model.state_dict()[key], resample_rel_pos_bias(source.state_dict()[key], 4, 6, 3))
    assert torch.equal(run_model.decoder[0].weight, source.decoder[0].weight)
