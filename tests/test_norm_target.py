"""The SwinV2 releases' normalized target against a direct computation of the official formula, and
its switch through the config, the zoo and the loss."""

import numpy as np
import pytest
import torch

from simmim.config import load_config
from simmim.engine.builders import build_network
from simmim.models.simmim import masked_reconstruction_loss, normalized_target
from simmim.zoo import build_model, get_spec


def direct_normalized_target(x: np.ndarray, window: int) -> np.ndarray:
    """Per pixel and channel: mean and unbiased variance of the window's pixels inside the image,
    then (x - mean) / sqrt(var + 1e-6), written as a plain loop."""
    out = np.empty_like(x)
    half = window // 2
    _, _, height, width = x.shape
    for b, c, i, j in np.ndindex(*x.shape):
        patch = x[b, c, max(i - half, 0):i + half + 1, max(j - half, 0):j + half + 1]
        var = patch.var(ddof=1) if patch.size > 1 else 0.0
        out[b, c, i, j] = (x[b, c, i, j] - patch.mean()) / np.sqrt(max(var, 0.0) + 1e-6)
    return out


@pytest.mark.parametrize(("size", "window"), [((2, 3, 9, 7), 5), ((1, 2, 12, 12), 47)])
def test_matches_a_direct_loop_over_windows(size, window):
    x = np.random.default_rng(0).normal(size=size) * 2 + 0.5
    got = normalized_target(torch.from_numpy(x).float(), window).double().numpy()
    assert np.abs(got - direct_normalized_target(x, window)).max() < 1e-3


def test_hand_checked_corner():
    # 3x3 window at the corner of a 2x2 image: the 4 pixels 0, 1, 2, 3 -> mean 1.5, unbiased var 5/3
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    expected = (0 - 1.5) / (5 / 3 + 1e-6) ** 0.5
    assert abs(normalized_target(x, 3)[0, 0, 0, 0].item() - expected) < 1e-5


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="window 4: expected an odd size"):
        normalized_target(torch.zeros(1, 1, 8, 8), 4)


def test_simmim_loss_uses_the_normalized_target():
    model = build_model(get_spec("simmim_swin-nano_test-64px"), norm_target_window=15).eval()
    images = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(2, np.random.default_rng(0))
    with torch.no_grad():
        out = model(images, mask)
    expected = masked_reconstruction_loss(normalized_target(images, 15), out.reconstruction, mask, model.patch_size)
    plain = masked_reconstruction_loss(images, out.reconstruction, mask, model.patch_size)
    assert abs(out.loss.item() - expected.item()) < 1e-6 and abs(out.loss.item() - plain.item()) > 1e-3


def test_config_switch_and_the_swinv2_releases():
    assert get_spec("swinv2_base_1k_500k").norm_target_window == 47
    assert get_spec("simmim_swin-nano_test-64px").norm_target_window == 0
    on = build_network(load_config("nano-pretrain", overrides=["model.norm_target=true",
                                                               "model.norm_target_patch_size=31"]))
    assert on.norm_target_window == 31
    assert build_network(load_config("nano-pretrain")).norm_target_window == 0
    with pytest.raises(ValueError, match="model.norm_target_patch_size: expected an odd window"):
        load_config("nano-pretrain", overrides=["model.norm_target_patch_size=46"])


def test_swinv2_finetuning_preset_of_the_releases():
    cfg = load_config("swinv2-base-finetune-224")
    spec = get_spec(cfg.model.name)
    assert (spec.img_size, spec.encoder["window_size"], spec.encoder["pretrained_window_sizes"]) == (
        224, 14, (12, 12, 12, 6))
    assert cfg.optim.layer_decay == 0.75


def test_pictures_map_the_reconstruction_back_to_the_input_space():
    model = build_model(get_spec("simmim_swin-nano_test-64px"), norm_target_window=15)
    images = torch.randn(2, 3, 64, 64) * 0.7 + 0.3
    back = model.in_input_space(images, normalized_target(images, 15))
    assert (back - images).abs().max() < 1e-4
    plain = build_model(get_spec("simmim_swin-nano_test-64px"))
    assert torch.equal(plain.in_input_space(images, images * 2), images * 2)  # pixel targets: as they are
