"""SwinV2 with SimMIM against HF transformers (Swinv2ForMaskedImageModeling) and timm (swinv2) on the same
random weights in float32 (on the CPU, or the device SIMMIM_TEST_DEVICE names), the official and HF key
layouts, window transfer without table resampling, the zoo's published sizes, and the training engine's
parameter groups."""

import math

import numpy as np
import pytest
import safetensors.torch
import torch

from simmim.checkpoint import training as ckpt
from simmim.checkpoint.convert import convert
from simmim.checkpoint.formats import HF, OFFICIAL
from simmim.checkpoint.transfer import load_weights, read_checkpoint
from simmim.config import load_config
from simmim.engine import finetune, pretrain
from simmim.engine.optim import layer_id, param_groups
from simmim.models import Classifier, FeatureMaps, SimMIM, SwinTransformerV2, SwinV2Config
from simmim.models.swin import Windows
from simmim.models.swinv2 import log_spaced_coords
from simmim.zoo import SPECS, build_model, get_spec, measure
from simmim.zoo.hub import export, load_directory

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-4
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
CASES = {
    # 32/16/8/4 maps with window 4: stage 4 equals the window (no shift); normalised by pretrained windows
    "128-w4-pretrained": dict(img_size=128, window_size=4, pretrained_window_sizes=(3, 3, 2, 2)),
    # 40/20/10/5 maps with window 4: stages 3 and 4 padded, and shifted on the padded map
    "160-w4-padded": dict(img_size=160, window_size=4),
}


def hf_config(cfg: SwinV2Config, **extra):
    return transformers.Swinv2Config(
        image_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
        num_heads=list(cfg.num_heads), window_size=cfg.window_size, drop_path_rate=0.0,
        encoder_stride=cfg.encoder_stride, pretrained_window_sizes=list(cfg.pretrained_window_sizes or [0] * 4),
        **extra)


def hf_checkpoint(model, tmp_path) -> dict:
    """The state dict as transformers writes it (HF 5 keeps other names in memory than on disk)."""
    model.save_pretrained(tmp_path)
    return safetensors.torch.load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_simmim_swinv2_matches_hf_masked_image_modeling(case, fused, tmp_path, randomize, device):
    cfg = SwinV2Config(**SMALL, **CASES[case], use_mask_token=True, fused=fused)
    hf = randomize(transformers.Swinv2ForMaskedImageModeling(hf_config(cfg))).eval()
    ours = SimMIM(SwinTransformerV2(cfg), mask_patch_size=32).eval()
    ours.load_state_dict(HF.to_ours(hf_checkpoint(hf, tmp_path)), strict=True)
    hf, ours = hf.to(device), ours.to(device)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=device)
    mask = ours.random_mask(2, np.random.default_rng(0)).to(device)
    with torch.no_grad():
        ref = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        out = ours(images, mask)
    assert (out.reconstruction - ref.reconstruction).abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert out.reconstruction.std() > 0.01  # a comparison of non-trivial outputs


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_odd_maps_are_padded_for_merging_as_hf_does(fused, tmp_path, randomize, device):
    # 72 px: 18 -> 9 -> 5 tokens a side; the 9x9 map is padded for its windows and for the merging
    cfg = SwinV2Config(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0, img_size=72,
                       window_size=2, use_mask_token=True, fused=fused)
    hf = randomize(transformers.Swinv2ForMaskedImageModeling(hf_config(cfg))).eval()
    ours = SimMIM(SwinTransformerV2(cfg), mask_patch_size=8).eval()
    ours.load_state_dict(HF.to_ours(hf_checkpoint(hf, tmp_path)), strict=True)
    hf, ours = hf.to(device), ours.to(device)
    images = torch.randn(2, 3, 72, 72, device=device)
    mask = ours.random_mask(2, np.random.default_rng(1)).to(device)
    with torch.no_grad():
        expected = hf.swinv2(pixel_values=images, bool_masked_pos=mask.flatten(1).bool()).last_hidden_state
        got = ours.encoder(images, mask)
    assert got.shape == (2, 64, 5, 5)
    assert (got.flatten(2).transpose(1, 2) - expected).abs().max() < TOL


def _timm(cfg: SwinV2Config, num_classes: int = 0):
    return timm.models.swin_transformer_v2.SwinTransformerV2(
        img_size=cfg.img_size, patch_size=4, embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
        window_size=cfg.window_size, num_classes=num_classes, drop_path_rate=0.0,
        pretrained_window_sizes=cfg.pretrained_window_sizes or (0,) * len(cfg.depths)).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_encoder_and_classifier_match_timm(fused, randomize, device):
    # timm pads after the shift (the official code never pads), so no padded map here
    cfg = SwinV2Config(**SMALL, **CASES["128-w4-pretrained"], fused=fused)
    ours = randomize(Classifier(SwinTransformerV2(cfg), num_classes=10)).eval()
    ref = _timm(cfg, num_classes=10)
    official = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items()}
    # timm's own adapter for official-layout checkpoints reads ours
    ref.load_state_dict(timm.models.swin_transformer_v2.checkpoint_filter_fn(official, ref), strict=True)
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, 128, 128, device=device)
    with torch.no_grad():
        features = ours.encoder(images).permute(0, 2, 3, 1)
        assert (features - ref.forward_features(images)).abs().max() < TOL
        assert (ours(images) - ref(images)).abs().max() < TOL


def test_official_layout_with_its_buffers_and_rpe_mlp_alias_loads_and_round_trips(randomize):
    cfg = SwinV2Config(**SMALL, img_size=64, window_size=4, use_mask_token=True)
    ours = randomize(SimMIM(SwinTransformerV2(cfg))).eval()
    state = ours.state_dict()
    official = OFFICIAL.from_ours(state)
    assert official.keys() == state.keys()  # ours is the official pretraining layout
    # as released: the index buffers saved, and some SimMIM SwinV2 files call the bias MLP rpe_mlp
    released = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in official.items()}
    released["encoder.layers.0.blocks.1.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    released["encoder.layers.0.blocks.1.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    released["encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    back, fmt, _ = read_checkpoint({"model": released})
    assert fmt.name == "official" and back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # a fine-tuned (encoder-less) official file goes into a classifier
    classifier = Classifier(SwinTransformerV2(SwinV2Config(**SMALL, img_size=64, window_size=4)), num_classes=0)
    report = load_weights(classifier, {"model": {k.removeprefix("encoder."): v for k, v in released.items()
                                                 if not k.startswith("decoder.")}})
    assert report.dropped == ["encoder.mask_token"] and not report.initialized


def test_hf_layout_round_trips_through_convert(tmp_path, randomize):
    cfg = SwinV2Config(**SMALL, img_size=64, window_size=4, use_mask_token=True)
    ours = randomize(SimMIM(SwinTransformerV2(cfg)))
    state = ours.state_dict()
    torch.save({"model": state}, tmp_path / "ours.pt")
    assert convert(tmp_path / "ours.pt", tmp_path / "hf.safetensors", to="hf") == ("official", "hf")
    hf_keys = safetensors.torch.load_file(tmp_path / "hf.safetensors")
    assert "swinv2.encoder.layers.0.blocks.0.attention.self.continuous_position_bias_mlp.2.weight" in hf_keys
    assert "swinv2.encoder.layers.0.blocks.0.attention.self.key.bias" not in hf_keys  # V2 has no key bias
    # the file HF would write loads into HF's own model
    hf = transformers.Swinv2ForMaskedImageModeling(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(hf_keys, strict=False)
    assert not unexpected and all("relative_" in k for k in missing)
    convert(tmp_path / "hf.safetensors", tmp_path / "back.pt", to="simmim")
    back = torch.load(tmp_path / "back.pt")["model"]
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_window_12_weights_fine_tune_at_window_24_without_resampling(tmp_path, randomize):
    small = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
    pretrain = randomize(SimMIM(SwinTransformerV2(SwinV2Config(**small, img_size=192, window_size=12,
                                                                use_mask_token=True))))
    torch.save({"model": pretrain.state_dict()}, tmp_path / "w12.pt")
    # the official fine-tuning recipe: a larger window, its coordinates normalised by the pretraining ones
    cfg = SwinV2Config(**small, img_size=384, window_size=24, pretrained_window_sizes=(12, 12, 12, 6))
    classifier = Classifier(SwinTransformerV2(cfg), num_classes=5)
    report = load_weights(classifier, tmp_path / "w12.pt")
    assert not report.resampled and report.initialized == ["head.bias", "head.weight"]
    before = pretrain.encoder.layers[0].blocks[0].attn
    after = classifier.encoder.layers[0].blocks[0].attn
    # the offsets the pretraining window had keep their bias exactly; the others extrapolate the MLP
    rows = torch.arange(47).view(-1, 1) * 47 + torch.arange(47)
    inner = rows[12:35, 12:35].flatten()  # offsets -11..11 of the 47 x 47 offsets of window 24
    assert torch.equal(log_spaced_coords(24, 12)[inner], log_spaced_coords(12, 12))
    with torch.no_grad():
        extrapolated = after.cpb_mlp(log_spaced_coords(24, 12))[inner]
        assert torch.allclose(extrapolated, before.cpb_mlp(log_spaced_coords(12, 12)))
        logits = classifier.eval()(torch.randn(1, 3, 384, 384))
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    # and into another input size with a smaller window: nothing to interpolate either
    other = SimMIM(SwinTransformerV2(SwinV2Config(**small, img_size=96, window_size=6, use_mask_token=True)))
    assert not load_weights(other, tmp_path / "w12.pt").resampled


def test_blocks_start_as_the_identity_and_the_extra_norm_follows_its_period():
    cfg = SwinV2Config(embed_dim=16, depths=(2, 12), num_heads=(1, 2), img_size=32, window_size=4,
                       extra_norm_period=6)
    encoder = SwinTransformerV2(cfg).eval()
    blocks = encoder.layers[1].blocks
    assert [i for i, b in enumerate(blocks) if b.norm3 is not None] == [5, 11]
    block, x = encoder.layers[0].blocks[1], torch.randn(2, 8, 8, 16)
    windows = Windows.build(8, 8, 4, 2, x.device)
    with torch.no_grad():
        assert torch.equal(block(x, windows), x)  # the official zero-initialised post-norms
    with pytest.raises(ValueError, match="pretrained_window_sizes"):
        SwinV2Config(depths=(2, 2), num_heads=(1, 2), img_size=32, window_size=4, pretrained_window_sizes=(4,))


def test_zoo_sizes_match_the_published_figures():
    specs = [s for s in SPECS if s.published_size]
    assert len(specs) == 10
    for spec in specs:  # backbone only, as the release counts it; rounded to the figure's last digit
        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(spec).encoder.parameters())
        value, unit = float(spec.published_size[:-1]), {"M": 1e6, "B": 1e9}[spec.published_size[-1]]
        step = 10 ** -len(spec.published_size[:-1].partition(".")[2]) * unit
        assert abs(params - value * unit) <= step / 2, (spec.name, params)
    row = measure(get_spec("swinv2_small_1k_500k"))  # what `simmim models --json` reports
    assert (row["published_size"], round(row["encoder_params"] / 1e6)) == ("49M", 49)
    # the Swin V2 paper counts SwinV2-H with its 1000-class head: 658M
    with torch.device("meta"):
        huge = Classifier(build_model(get_spec("swinv2_huge_1k_500k")).encoder, num_classes=1000)
    assert round(sum(p.numel() for p in huge.parameters()) / 1e6) == 658


def test_parameter_groups_follow_the_official_swinv2_recipe():
    model = build_model(get_spec("swinv2-nano_test-64px"))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.9)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = dict(model.named_parameters())
    for name in ("encoder.layers.2.blocks.1.attn.cpb_mlp.0.weight", "encoder.layers.2.blocks.1.attn.cpb_mlp.2.weight",
                 "encoder.layers.2.blocks.1.attn.logit_scale", "encoder.layers.2.blocks.1.attn.q_bias"):
        assert id(names[name]) in no_decay
    assert id(names["encoder.layers.2.blocks.1.attn.qkv.weight"]) not in no_decay
    # nano depths (1, 1, 2, 1): block 1 of stage 2 follows 2 blocks
    assert layer_id("encoder.layers.2.blocks.1.attn.cpb_mlp.0.weight", model.encoder) == 2 + 1 + 1
    assert layer_id("encoder.layers.1.downsample.norm.weight", model.encoder) == 2
    assert math.isclose(next(g["lr_scale"] for g in groups if g["layer"] == 0), 0.9 ** 6)


def test_engine_pretrains_swinv2_and_fine_tunes_from_it(tmp_path, no_augment, image_folder, settings):
    data = image_folder(tmp_path / "images", train_per_class=4, val_per_class=1, size=64)
    overrides = ("schedule.epochs=1", *no_augment)
    cfg = load_config("nano-pretrain", overrides=settings(
        "pretrain", data, tmp_path / "p", "model.name=simmim_swinv2-nano_test-64px", *overrides))
    result = pretrain(cfg)  # 8 images, batch 4
    assert result.steps == 2 and result.skipped_steps == 0
    cfg = load_config("nano-finetune", overrides=settings(
        "finetune", data, tmp_path / "f", "model.name=swinv2-nano_test-64px", f"model.pretrained={result.checkpoint}",
        "model.window_size=8", "model.pretrained_window_sizes=4,4,4,2", "augment.mixup=0", "augment.cutmix=0",
        *overrides))
    assert finetune(cfg).steps == 2  # at window 8 from window-4 weights
    key = "encoder.layers.2.blocks.1.attn.cpb_mlp.0.weight"
    pretrained, tuned = ckpt.load(result.checkpoint)["model"][key], ckpt.load(tmp_path / "f" / "ckpt-00000002.pt")
    assert pretrained.shape == tuned["model"][key].shape and not torch.equal(pretrained, tuned["model"][key])


def test_an_exported_swinv2_outside_the_zoo_rebuilds_from_its_config(tmp_path, randomize):
    encoder = SwinTransformerV2(SwinV2Config(**SMALL, img_size=64, window_size=4, pretrained_window_sizes=(8, 4, 2, 1),
                                             extra_norm_period=2))
    model = randomize(Classifier(encoder, num_classes=3)).eval()
    loaded = load_directory(export(model, tmp_path / "model"))
    assert isinstance(loaded.encoder, SwinTransformerV2) and loaded.encoder.cfg == encoder.cfg
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_activation_checkpointing_gives_the_same_gradients(randomize):
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        cfg = SwinV2Config(**SMALL, img_size=64, window_size=4, use_mask_token=True, use_checkpoint=use_checkpoint)
        model = randomize(SimMIM(SwinTransformerV2(cfg))).train()
        model(torch.ones(2, 3, 64, 64), model.random_mask(2, np.random.default_rng(0))).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_feature_maps_match_hf_and_timm_features_only(case, fused, tmp_path, randomize, device):
    cfg = SwinV2Config(**SMALL, **CASES[case], use_mask_token=True, fused=fused)
    hf = randomize(transformers.Swinv2ForMaskedImageModeling(hf_config(cfg))).eval()
    model = SimMIM(SwinTransformerV2(cfg), mask_patch_size=32)
    model.load_state_dict(HF.to_ours(hf_checkpoint(hf, tmp_path)), strict=True)
    ours = FeatureMaps(model.encoder).eval().to(device)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=device)
    with torch.no_grad():
        got = ours(images)
        # each stage's map before its merging, as HF's Swinv2Backbone asks the Swinv2Model's encoder for them
        hf = hf.swinv2.to(device)
        expected = hf.encoder(*hf.embeddings(images), output_hidden_states=True, return_dict=True,
                              output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
    assert [g.shape[1:] for g in got] == [(16 * 2**i, cfg.img_size // 4 // 2**i, cfg.img_size // 4 // 2**i)
                                          for i in range(4)]
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() < 1e-5 and g.std() > 0.01
    if case != "128-w4-pretrained":
        return  # timm pads after the shift (the official code never pads)
    official = {k: v for k, v in model.encoder.state_dict().items() if k != "mask_token"}
    torch.save(official, tmp_path / "swinv2.pth")
    # timm's loader reads the file through its own checkpoint filter before it wraps the model
    ref = timm.create_model("swinv2_tiny_window8_256", pretrained=True, features_only=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "swinv2.pth")), img_size=cfg.img_size,
                            embed_dim=16, depths=SMALL["depths"], num_heads=SMALL["num_heads"],
                            window_size=cfg.window_size, pretrained_window_sizes=cfg.pretrained_window_sizes,
                            drop_path_rate=0.0).eval().to(device)
    with torch.no_grad():
        for g, e in zip(got, ref(images), strict=True):  # timm's Swin maps are NHWC
            assert (g - e.permute(0, 3, 1, 2)).abs().max() < 1e-5
