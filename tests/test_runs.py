"""From one step to the next without reading config.yaml: every command that takes a model takes a
run folder, its checkpoint or an exported folder and reads the architecture from it; a checkpoint of
another architecture, a demo recipe shortened to one epoch and an encoder-only file shown as
reconstructions each end in one line that names what to change."""

from __future__ import annotations

import json

import pytest
import torch

from simmim import get_model, inference_model
from simmim.checkpoint.convert import convert
from simmim.cli import main
from simmim.data.photos import load_photo

PRETRAIN, CLASSIFIER = "simmim_swin-nano_test-64px", "swin-nano_test-64px"
DEMO_CLASSIFIER = "swin-micro-w6_fashion-mnist-48px"
QUIET = ["--epochs", "1", "--batch-size", "4", "--set", "data.num_workers=0", "--set", "runtime.threads=1",
         "--set", "runtime.tensorboard=false", "--set", "runtime.vis_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder):
    """A nano pretraining run and a fine-tuning run started from its checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    data = image_folder(root / "data", train_per_class=4, val_per_class=2, size=64)
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(data), "--out", str(root / "pre"), *QUIET]) == 0
    assert main(["finetune", "--preset", "nano-finetune", "--pretrained", str(_checkpoint(root / "pre")),
                 "--data", str(data), "--out", str(root / "ft"), *QUIET]) == 0
    load_photo("coffee").resize((64, 64)).save(root / "photo.png")
    return root


def _checkpoint(run):
    return sorted(run.glob("ckpt-*.pt"))[-1]


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a note may come first (a shortened warm-up)
    assert err[-1].startswith("simmim: error: ") and not any("error" in line for line in err[:-1]), err
    return err[-1]


def test_reconstruct_takes_a_run_folder_and_its_checkpoint(runs, capsys):
    lines = []
    for model in (runs / "pre", _checkpoint(runs / "pre")):
        assert main(["reconstruct", str(model), str(runs / "photo.png"), "--out", str(runs / "r.png")]) == 0
        lines.append(capsys.readouterr().out.splitlines()[-1].split(";")[0])
    # the same trained weights and run mask as the long way round, the zoo name with --weights
    assert main(["reconstruct", PRETRAIN, str(runs / "photo.png"), "--out", str(runs / "r.png"),
                 "--weights", str(_checkpoint(runs / "pre"))]) == 0
    assert lines == [capsys.readouterr().out.splitlines()[-1].split(";")[0]] * 2


def test_get_model_and_inference_model_take_a_run_folder(runs):
    state = torch.load(_checkpoint(runs / "pre"), weights_only=True)["model"]
    model = get_model(runs / "pre")
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    photo = load_photo("coffee")
    assert inference_model(str(runs / "pre"), photo)["loss"] == inference_model(model, photo)["loss"]
    tuned = get_model(runs / "ft")
    assert tuned.classes == ["class_0", "class_1"] and tuned.encoder.cfg.embed_dim == 24
    with pytest.raises(ValueError, match="carries its own architecture and weights"):
        get_model(runs / "pre", pretrained=_checkpoint(runs / "pre"))


def test_every_model_command_takes_a_run_folder(runs, capsys):
    data, photo = str(runs / "data"), str(runs / "photo.png")
    assert main(["predict", str(runs / "ft"), photo, "--topk", "1"]) == 0
    assert main(["evaluate", str(runs / "ft"), "--data", data]) == 0
    assert main(["export", str(runs / "ft"), str(runs / "export")]) == 0
    assert json.loads((runs / "export" / "config.json").read_text())["name"] == CLASSIFIER
    assert main(["predict", str(runs / "export"), photo, "--topk", "1"]) == 0
    assert main(["probe", str(runs / "pre"), "--data", data, "--epochs", "2"]) == 0
    assert main(["convert", str(runs / "pre"), str(runs / "pre.safetensors"), "--to", "timm"]) == 0
    out = capsys.readouterr().out
    assert "(4 images)" in out and "k-NN (k=20) top-1" in out and "(timm)" in out  # evaluate, probe, convert
    from simmim.serve import load_served_model

    model, name, weights = load_served_model(str(runs / "pre"))
    assert name == PRETRAIN and weights == str(_checkpoint(runs / "pre"))


def test_finetune_pretrained_alone_takes_the_checkpoints_architecture(runs, capsys):
    from simmim.config import load_config

    out = runs / "ft-auto"
    assert main(["finetune", "--pretrained", str(runs / "pre"), "--data", str(runs / "data"), "--out", str(out),
                 "--set", "checkpoint.every_steps=1", *QUIET]) == 0
    assert f"finetune: {CLASSIFIER} with its recipe (the architecture of {runs / 'pre'})" in capsys.readouterr().out
    cfg = load_config(path=out / "config.yaml")
    assert cfg.model.name == CLASSIFIER and cfg.preset == CLASSIFIER  # the zoo classifier of its sizes, its recipe
    assert cfg.optim.layer_decay == 0.9 and cfg.model.pretrained == str(runs / "pre")  # nano-finetune's recipe
    # the first step started from the pretrained encoder: the two differ by one AdamW step at most
    encoder = get_model(runs / "pre").encoder.state_dict()
    first = torch.load(sorted(out.glob("ckpt-*.pt"))[0], weights_only=True)["model"]
    key = "layers.0.blocks.0.attn.qkv.weight"
    assert (first[f"encoder.{key}"] - encoder[key]).abs().max() < 1e-3


def test_a_checkpoint_of_another_architecture_is_named_in_one_line(runs, capsys):
    line = _one_line_error(capsys, ["finetune", "--preset", "fashion-mnist-finetune", "--pretrained",
                                    str(_checkpoint(runs / "pre")), "--data", str(runs / "data"), "--out",
                                    str(runs / "x"), "--set", "schedule.warmup_epochs=0", "--set",
                                    "data.labels_per_class=none", *QUIET])
    assert (f"is a swin-nano model ({PRETRAIN}); {DEMO_CLASSIFIER} is a swin-micro model: "
            f"set model.name={CLASSIFIER}, or drop --preset") in line
    assert not (runs / "x").exists()  # refused before the run started
    line = _one_line_error(capsys, ["evaluate", str(_checkpoint(runs / "ft")), "--data", str(runs / "data"),
                                    "--model", DEMO_CLASSIFIER])
    assert f"is a swin-nano model ({CLASSIFIER}); {DEMO_CLASSIFIER} is a swin-micro model: name {CLASSIFIER}" in line
    assert len(line) < 300


def test_the_demo_finetuning_recipe_shortened_to_one_epoch(runs, capsys):
    # its warm-up (4 of 40 epochs) shrinks with the run; then the subset is too big for this folder
    line = _one_line_error(capsys, ["finetune", "--preset", "fashion-mnist-finetune", "--data", str(runs / "data"),
                                    "--out", str(runs / "demo-ft"), *QUIET])
    assert "schedule.warmup_epochs" not in line
    assert line.endswith("data.labels_per_class: class 0 has 4 images, fewer than the 100 asked "
                         f"({runs / 'data' / 'train'})")


def test_an_encoder_only_file_is_refused_where_reconstructions_are_shown(runs, capsys):
    encoder_only = runs / "encoder.pth"
    convert(_checkpoint(runs / "pre"), encoder_only, "timm")
    with pytest.raises(ValueError, match=r"encoder\.pth holds no decoder for .*random decoder weights"):
        get_model(PRETRAIN, pretrained=encoder_only)
    with pytest.raises(ValueError, match="random decoder weights"):
        inference_model(PRETRAIN, load_photo("coffee"), weights=encoder_only)
    from simmim.serve import load_served_model

    with pytest.raises(ValueError, match="random decoder weights"):
        load_served_model(PRETRAIN, str(encoder_only))
    line = _one_line_error(capsys, ["reconstruct", PRETRAIN, str(runs / "photo.png"), "--weights", str(encoder_only)])
    assert "--random-decoder" in line
    assert main(["reconstruct", PRETRAIN, str(runs / "photo.png"), "--weights", str(encoder_only),
                 "--out", str(runs / "r.png"), "--random-decoder"]) == 0
    # its encoder is the run's; the frozen-encoder probe reads only that
    loaded = get_model(PRETRAIN, pretrained=encoder_only, random_decoder=True)
    assert torch.equal(loaded.encoder.patch_embed.proj.weight, get_model(runs / "pre").encoder.patch_embed.proj.weight)
    assert main(["probe", str(encoder_only), "--model", PRETRAIN, "--data", str(runs / "data"), "--epochs", "2"]) == 0
