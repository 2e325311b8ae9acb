"""Exports other libraries load as they are: HF `from_pretrained` directories and timm files, each
loaded by the library itself and compared with our model on the same input."""

import json

import numpy as np
import pytest
import torch

from simmim.checkpoint.convert import convert
from simmim.checkpoint.ecosystem import export_hf
from simmim.cli import main
from simmim.models import Classifier, SimMIM, SwinConfig, SwinTransformer, SwinTransformerV2, SwinV2Config
from simmim.zoo import build_model, get_spec
from simmim.zoo.hub import export

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-4
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
# HF >= 5 fails on maps smaller than the window, so stage 4 is exactly one window in each case
SWIN = dict(**SMALL, img_size=192, window_size=6)
SWINV2 = dict(**SMALL, img_size=128, window_size=4, pretrained_window_sizes=(3, 3, 2, 2))


def _images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("encoder", "cfg", "hf_class"), [
    (SwinTransformer, SwinConfig(**SWIN, use_mask_token=True), "SwinForMaskedImageModeling"),
    (SwinTransformerV2, SwinV2Config(**SWINV2, use_mask_token=True), "Swinv2ForMaskedImageModeling"),
])
def test_simmim_export_loads_in_hf_with_the_same_outputs(encoder, cfg, hf_class, tmp_path, randomize):
    ours = randomize(SimMIM(encoder(cfg), mask_patch_size=32)).eval()
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [hf_class]
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path).eval()
    auto = transformers.AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    base = transformers.AutoModel.from_pretrained(tmp_path).eval()  # the encoder alone
    assert type(auto) is type(hf)
    images = _images(cfg.img_size)
    mask = ours.random_mask(2, np.random.default_rng(0))
    with torch.no_grad():
        out = ours(images, mask)
        ref = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        features = ours.encoder(images).flatten(2).transpose(1, 2)
        hidden = base(pixel_values=images).last_hidden_state
    assert (out.reconstruction - ref.reconstruction).abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert (features - hidden).abs().max() < TOL
    assert out.reconstruction.std() > 0.01  # non-trivial outputs


@pytest.mark.parametrize(("encoder", "cfg", "hf_class"), [
    (SwinTransformer, SwinConfig(**SWIN), "SwinForImageClassification"),
    (SwinTransformerV2, SwinV2Config(**SWINV2), "Swinv2ForImageClassification"),
])
def test_classifier_export_loads_in_hf_with_the_same_logits_and_labels(encoder, cfg, hf_class, tmp_path, randomize):
    ours = randomize(Classifier(encoder(cfg), num_classes=3)).eval()
    export_hf(ours, tmp_path, classes=["cat", "dog", "fox"])
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == hf_class
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "fox"}
    images = _images(cfg.img_size)
    with torch.no_grad():
        assert (ours(images) - hf(pixel_values=images).logits).abs().max() < TOL


def test_models_without_an_hf_counterpart_are_refused(tmp_path):
    vit = build_model(get_spec("simmim_vit-nano_test-64px"))
    with pytest.raises(ValueError, match="HF export covers Swin and SwinV2"):
        export_hf(vit, tmp_path)
    padded = Classifier(SwinTransformer(SwinConfig(**SWIN, pad_small_map=True)), num_classes=2)
    with pytest.raises(ValueError, match="pad_small_map=True"):
        export_hf(padded, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_cli_export_and_convert_write_hf_folders(tmp_path, capsys, randomize):
    ours = randomize(SimMIM(SwinTransformer(SwinConfig(**SWIN, use_mask_token=True))))
    export(ours, tmp_path / "ours")  # a simmim folder names its own architecture
    weights, arch = str(tmp_path / "ours" / "model.safetensors"), str(tmp_path / "ours")
    assert main(["export", weights, str(tmp_path / "a"), "--model", arch, "--format", "hf"]) == 0
    assert main(["convert", weights, str(tmp_path / "b"), "--to", "hf", "--model", arch]) == 0
    for folder in ("a", "b"):
        hf = transformers.SwinForMaskedImageModeling.from_pretrained(tmp_path / folder)
        assert hf.config.embed_dim == ours.encoder.cfg.embed_dim
        assert torch.equal(hf.decoder[0].weight, ours.decoder[0].weight)
    # the 64 px test model's last map (2x2) is smaller than its window 4
    nano = build_model(get_spec("simmim_swin-nano_test-64px"))
    torch.save({"model": nano.state_dict()}, tmp_path / "nano.pth")
    assert main(["export", str(tmp_path / "nano.pth"), str(tmp_path / "c"), "--format", "hf",
                 "--model", "simmim_swin-nano_test-64px"]) == 2
    assert "simmim: error: stage 4's 2px map is smaller than window 4" in capsys.readouterr().err


def test_timm_reads_the_timm_file_through_its_pretrained_file_overlay(tmp_path, randomize):
    cfg = SwinConfig(**SWIN)
    ours = randomize(Classifier(SwinTransformer(cfg), num_classes=5)).eval()
    torch.save({"model": ours.state_dict()}, tmp_path / "ours.pth")
    assert convert(tmp_path / "ours.pth", tmp_path / "timm.pth", to="timm") == ("official", "timm")
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=5,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.pth"), num_classes=5),
                            img_size=cfg.img_size, window_size=cfg.window_size, embed_dim=cfg.embed_dim,
                            depths=cfg.depths, num_heads=cfg.num_heads).eval()
    images = _images(cfg.img_size)
    with torch.no_grad():
        assert (ours(images) - ref(images)).abs().max() < TOL


def test_timm_file_of_a_pretraining_checkpoint_is_its_encoder(tmp_path, randomize):
    cfg = SwinV2Config(**SWINV2, use_mask_token=True)
    ours = randomize(SimMIM(SwinTransformerV2(cfg))).eval()
    torch.save({"model": ours.state_dict()}, tmp_path / "pretrain.pth")
    convert(tmp_path / "pretrain.pth", tmp_path / "timm.safetensors", to="timm")
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.safetensors")),
                            img_size=cfg.img_size, window_size=cfg.window_size, embed_dim=cfg.embed_dim,
                            depths=cfg.depths, num_heads=cfg.num_heads,
                            pretrained_window_sizes=cfg.pretrained_window_sizes).eval()
    images = _images(cfg.img_size)
    with torch.no_grad():
        assert (ours.encoder(images).permute(0, 2, 3, 1) - ref.forward_features(images)).abs().max() < TOL
