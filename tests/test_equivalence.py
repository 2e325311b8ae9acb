"""Our encoders and SimMIM against independent implementations (HF transformers, timm) on the same
random weights, in float32 on the CPU (or the device SIMMIM_TEST_DEVICE names, e.g. cuda)."""


import numpy as np
import pytest
import safetensors.torch
import torch

from simmim.checkpoint.formats import HF as HF_SWIN
from simmim.models import (
    Classifier,
    FeatureMaps,
    SimMIM,
    SwinConfig,
    SwinTransformer,
    VisionTransformer,
    ViTConfig,
)
from simmim.zoo.hub import get_model

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TOL = 1e-4


def hf_checkpoint(model, tmp_path) -> dict:
    """The state dict as transformers writes it to disk (the layout of published HF checkpoints)."""
    model.save_pretrained(tmp_path)
    return safetensors.torch.load_file(tmp_path / "model.safetensors")
SWIN_CASES = {
    # stage 4 map equals the window: official clamp, no shift
    "192-w6": dict(img_size=192, window_size=6),
    # 56 / 28 / 14 / 7 maps with window 6: every stage padded, stage 4 shifted on a padded map
    "224-w6-padded": dict(img_size=224, window_size=6),
    # stage 4 map (4x4) smaller than the window: clamped, its table sized as the official code sizes
    # it (HF >= 5 keeps the configured table there, so timm, which follows the official code, is the
    # reference; timm pads after the shift, unlike HF and mmpretrain, so no case here pads for it)
    "128-w8-clamped": dict(img_size=128, window_size=8),
}
SMALL = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def _images_and_mask(model: SimMIM, size: int, device: torch.device, batch: int = 2):
    images = torch.randn(batch, 3, size, size)
    return images.to(device), model.random_mask(batch, np.random.default_rng(0)).to(device)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("case", ["192-w6", "224-w6-padded"])
def test_swin_simmim_matches_hf_masked_image_modeling(case, fused, tmp_path, randomize, device):
    cfg = SwinConfig(**SMALL, **SWIN_CASES[case], drop_path_rate=0.0, use_mask_token=True, fused=fused)
    hf_cfg = transformers.SwinConfig(
        image_size=cfg.img_size, patch_size=4, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
        num_heads=list(cfg.num_heads), window_size=cfg.window_size, drop_path_rate=0.0, encoder_stride=32,
    )
    hf = randomize(transformers.SwinForMaskedImageModeling(hf_cfg)).eval()
    ours = SimMIM(SwinTransformer(cfg), mask_patch_size=32).eval()
    ours.load_state_dict(HF_SWIN.to_ours(hf_checkpoint(hf, tmp_path)), strict=True)
    hf, ours = hf.to(device), ours.to(device)

    images, mask = _images_and_mask(ours, cfg.img_size, device)
    with torch.no_grad():
        ref = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        out = ours(images, mask)
    assert torch.allclose(out.reconstruction, ref.reconstruction, atol=TOL, rtol=0)
    assert abs(out.loss.item() - ref.loss.item()) < TOL
    assert out.reconstruction.std() > 0.01  # a comparison of non-trivial outputs


def test_hf_layout_round_trips_exactly(randomize):
    ours = randomize(SimMIM(SwinTransformer(SwinConfig(**SMALL, img_size=64, window_size=4, use_mask_token=True))))
    state = ours.state_dict()
    back = HF_SWIN.to_ours(HF_SWIN.from_ours(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def _timm_swin(cfg: SwinConfig):
    return timm.models.swin_transformer.SwinTransformer(
        img_size=cfg.img_size, patch_size=4, embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
        window_size=cfg.window_size, num_classes=0, drop_path_rate=0.0,
    ).eval()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("case", ["192-w6", "128-w8-clamped"])
def test_swin_encoder_matches_timm(case, fused, randomize, device):
    cfg = SwinConfig(**SMALL, **SWIN_CASES[case], drop_path_rate=0.0, fused=fused)
    ours = randomize(SwinTransformer(cfg)).eval()
    ref = _timm_swin(cfg)
    # timm's own adapter for official-layout checkpoints reads our state dict
    filtered = timm.models.swin_transformer.checkpoint_filter_fn(ours.state_dict(), ref)
    ref.load_state_dict(filtered, strict=True)
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size, device=device)
    with torch.no_grad():
        expected = ref.forward_features(images)  # (B, h, w, C) after the final norm
        got = ours(images).permute(0, 2, 3, 1)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < TOL


def _timm_beit(cfg: ViTConfig, num_classes: int = 0):
    return timm.models.beit.Beit(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, init_values=cfg.init_values, use_abs_pos_emb=cfg.use_abs_pos_emb,
        use_rel_pos_bias=cfg.use_rel_pos_bias, use_shared_rel_pos_bias=cfg.use_shared_rel_pos_bias,
        global_pool="avg" if cfg.use_mean_pooling else "token", num_classes=num_classes, drop_path_rate=0.0,
    ).eval()


VIT = dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_vit_pretraining_encoder_matches_timm_beit_with_shared_bias(fused, randomize, device):
    cfg = ViTConfig(**VIT, use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_mean_pooling=False, fused=fused)
    ours = randomize(VisionTransformer(cfg)).eval()
    ref = _timm_beit(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        expected = ref.forward_features(images)[:, 1:]  # drop cls, as SimMIM does
        got = ours(images).flatten(2).transpose(1, 2)
    assert (got - expected).abs().max() < TOL


def test_vit_classifier_matches_timm_beit_with_mean_pooling(randomize, device):
    cfg = ViTConfig(**VIT, use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_mean_pooling=True)
    ours = randomize(Classifier(VisionTransformer(cfg), num_classes=10, fc_norm=True)).eval()
    ref = _timm_beit(cfg, num_classes=10)
    mapped = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(mapped, strict=True)
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        assert (ours(images) - ref(images)).abs().max() < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_swin_classifier_matches_hf_image_classification(fused, tmp_path, randomize, device):
    cfg = SwinConfig(**SMALL, img_size=192, window_size=6, drop_path_rate=0.0, fused=fused)
    hf_cfg = transformers.SwinConfig(image_size=192, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                     num_heads=[1, 2, 2, 4], window_size=6, num_labels=7)
    hf = randomize(transformers.SwinForImageClassification(hf_cfg)).eval()
    ours = Classifier(SwinTransformer(cfg), num_classes=7).eval()
    ours.load_state_dict(HF_SWIN.to_ours(hf_checkpoint(hf, tmp_path)), strict=True)
    hf, ours = hf.to(device), ours.to(device)
    images = torch.randn(2, 3, 192, 192, device=device)
    with torch.no_grad():
        assert (ours(images) - hf(pixel_values=images).logits).abs().max() < TOL


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_swin_feature_maps_match_timm_features_only(fused, tmp_path, randomize, device):
    cfg = SwinConfig(**SMALL, img_size=192, window_size=6, drop_path_rate=0.0, fused=fused)
    ours = FeatureMaps(randomize(SwinTransformer(cfg)), out_indices=(0, 1, 3)).eval()
    torch.save(ours.encoder.state_dict(), tmp_path / "swin.pth")
    # timm's loader reads the file through its own checkpoint filter before it wraps the model
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, features_only=True, out_indices=(0, 1, 3),
                            pretrained_cfg_overlay=dict(file=str(tmp_path / "swin.pth")), img_size=192,
                            embed_dim=16, depths=SMALL["depths"], num_heads=SMALL["num_heads"], window_size=6,
                            drop_path_rate=0.0).eval()
    assert (ours.channels, ours.reductions) == (ref.feature_info.channels(), ref.feature_info.reduction())
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, 192, 192, device=device)
    with torch.no_grad():
        got, expected = ours(images), ref(images)  # timm's Swin maps are NHWC
    assert [g.shape for g in got] == [(2, 16, 48, 48), (2, 32, 24, 24), (2, 128, 6, 6)]
    for g, e in zip(got, expected, strict=True):
        assert (g - e.permute(0, 3, 1, 2)).abs().max() < 1e-5 and g.std() > 0.01


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("size", [192, 224, 200])  # as built; padded windows; odd maps (50/25/13/7)
def test_swin_feature_maps_match_hf_reshaped_hidden_states(size, fused, tmp_path, randomize, device):
    cfg = SwinConfig(**SMALL, img_size=192, window_size=6, drop_path_rate=0.0, fused=fused)
    hf_cfg = transformers.SwinConfig(image_size=192, patch_size=4, embed_dim=16, depths=list(SMALL["depths"]),
                                     num_heads=list(SMALL["num_heads"]), window_size=6, drop_path_rate=0.0)
    hf = randomize(transformers.SwinForMaskedImageModeling(hf_cfg)).eval()
    ours = SimMIM(SwinTransformer(cfg), mask_patch_size=32)
    ours.load_state_dict(HF_SWIN.to_ours(hf_checkpoint(hf, tmp_path)), strict=False)  # HF has no mask token here
    ours = FeatureMaps(ours.encoder).eval().to(device)
    hf = hf.swin.to(device)  # the SwinModel
    images = torch.randn(2, 3, size, size, device=device)
    with torch.no_grad():
        # each stage's map before its merging, as HF's SwinBackbone asks its SwinModel for them
        expected = hf(pixel_values=images, output_hidden_states=True,
                      output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
        got = ours(images)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and (g - e).abs().max() < 1e-5


def test_vit_feature_maps_match_timm_beit_intermediates(randomize, device):
    cfg = ViTConfig(**VIT, use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_mean_pooling=True)
    ours = FeatureMaps(randomize(VisionTransformer(cfg)), out_indices=(0, -1)).eval()
    ref = _timm_beit(cfg)
    ref.load_state_dict(ours.encoder.state_dict(), strict=False)  # timm's fc_norm is the classifier's
    ours, ref = ours.to(device), ref.to(device)
    images = torch.randn(2, 3, 64, 64, device=device)
    with torch.no_grad():
        got = ours(images)
        expected = ref.forward_intermediates(images, indices=[0, 1], norm=False, intermediates_only=True)
    assert ours.out_indices == (0, 1) and [g.shape for g in got] == [(2, 48, 4, 4)] * 2
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max() < 1e-5


def test_feature_maps_name_the_valid_indices():
    expected = r"out_indices \(4,\): expected indices in \[-4, 4\) of the encoder's 4 stages"
    with pytest.raises(ValueError, match=expected):
        FeatureMaps(SwinTransformer(SwinConfig(**SMALL, img_size=64, window_size=4)), out_indices=(4,))


def test_get_model_features_only_loads_the_weights_first(tmp_path, randomize):
    classifier = randomize(get_model("swin-nano_test-64px"))
    torch.save(classifier.state_dict(), tmp_path / "ours.pt")
    backbone = get_model("swin-nano_test-64px", pretrained=tmp_path / "ours.pt", features_only=True, out_indices=(-1,))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the last stage has no merging: its map under the final norm is the encoder's output
        (last,) = backbone(images)
        assert torch.allclose(classifier.encoder.norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                              classifier.encoder(images), atol=1e-5)
    with pytest.raises(TypeError, match="out_indices applies only with features_only=True"):
        get_model("swin-nano_test-64px", out_indices=(0,))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_drop_path_draws_and_scales_as_timms(p):
    from timm.layers import DropPath as TimmDropPath

    from simmim.models.layers import DropPath

    x = torch.randn(64, 7, 5)
    ours, theirs = DropPath(p), TimmDropPath(p)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        outputs, states = [], []
        for module in (ours, theirs):
            torch.manual_seed(3)
            outputs.append(module(x))
            states.append(torch.get_rng_state())  # the same random numbers consumed
        assert torch.equal(*outputs) and torch.equal(*states)
        dropped = (outputs[0] == 0).all(dim=(1, 2)).float().mean().item()
        assert dropped == (pytest.approx(p, abs=0.15) if training else 0.0)
