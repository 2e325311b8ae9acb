"""models/fused.py against the plain ops: every autograd function gradchecked in float64, and whole
models on the fused path against the reference path (roll, pad, partition) on the same random weights."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from simmim.config import load_config
from simmim.engine.builders import build_network
from simmim.models import (
    SwinConfig,
    SwinTransformer,
    SwinTransformerV2,
    SwinV2Config,
    VisionTransformer,
    ViTConfig,
    fused,
)
from simmim.models.swin import Windows


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_linear_function_gradchecks_against_f_linear():
    x, w, b = _double(2, 3, 5), _double(4, 5), _double(4)
    assert torch.allclose(fused._Linear.apply(x, w, b), F.linear(x, w, b))
    assert gradcheck(fused._Linear.apply, (x, w, b))
    # many rows and K < N: the weight gradient takes its other route (x first)
    assert gradcheck(fused._Linear.apply, (_double(64, 2), _double(9, 2), None))


def test_norm_linear_gradchecks_with_and_without_a_gather():
    norm, layer = torch.nn.LayerNorm(6).double(), torch.nn.Linear(6, 4).double()
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = _double(2, 9, 6)
    windows = Windows.build(3, 3, 2, 1, x.device)  # padded to 4x4 and shifted
    for gather in (None, windows.gather):
        tokens = norm(x) if gather is None else gather(norm(x))
        assert torch.allclose(fused.norm_linear(x, norm, layer, gather), layer(tokens))

        def function(x, norm_weight, norm_bias, weight, bias, gather=gather):
            return fused._NormLinear.apply(x, norm_weight, norm_bias, norm.eps, weight, bias, gather)
        assert gradcheck(function, (x, norm.weight, norm.bias, layer.weight, layer.bias))


def test_token_gather_gradchecks_and_inverts_with_padding():
    windows = Windows.build(3, 3, 2, 1, torch.device("cpu"))  # 3x3 padded to 4x4, shifted
    x = _double(2, 9, 3)
    gathered = windows.gather(x)
    assert gathered.shape == (2, 16, 3) and (gathered == 0).all(-1).sum() == 2 * 7
    assert torch.equal(windows.reverse(gathered, 2), x)
    assert gradcheck(windows.gather, (x,))


def test_gelu_linear_gradchecks_against_the_plain_ops():
    h, w, b = _double(2, 3, 8), _double(5, 8), _double(5)
    assert torch.allclose(fused.gelu_linear(h, w, b), F.linear(F.gelu(h), w, b))
    assert gradcheck(fused._GeluLinear.apply, (h, w, b))


def test_biased_attention_gradchecks_against_softmax_attention():
    groups, n, heads, d = 4, 3, 2, 2
    qkv, bias = _double(groups, n, 3 * heads * d), _double(2, heads, n, n)  # group i uses bias[i % 2]
    q, k, v = qkv.view(groups, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1) * 0.5).view(-1, *bias.shape) + bias
    plain = (scores.view(groups, heads, n, n).softmax(-1) @ v).transpose(1, 2).reshape(groups, n, -1)
    assert torch.allclose(fused.biased_attention(qkv, bias, heads, 0.5), plain)
    assert gradcheck(fused._BiasedAttention.apply, (qkv, bias, heads, 0.5))


SMALL = dict(embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 2), drop_path_rate=0.0)
MODELS = {
    # 12x12 map, window 4: shifted in every stage; the 3x3 last stage is clamped
    "swin-shifted": (SwinTransformer, SwinConfig, dict(img_size=48, window_size=4), 48),
    # 14 / 7 / 4 maps with window 4: padded and shifted, odd maps merged with padding
    "swin-padded-odd": (SwinTransformer, SwinConfig, dict(img_size=48, window_size=4), 56),
    # the last maps smaller than the window keep it, padded, and shift
    "swin-pad-small-map": (SwinTransformer, SwinConfig, dict(img_size=48, window_size=8, pad_small_map=True), 48),
    "swinv2-padded-odd": (SwinTransformerV2, SwinV2Config, dict(img_size=48, window_size=4), 56),
    "swinv2-pad-small-map": (SwinTransformerV2, SwinV2Config, dict(img_size=48, window_size=8, pad_small_map=True),
                             48),
}


def _pair(model_class, config_class, **kwargs):
    fast = model_class(config_class(**kwargs)).double()
    plain = model_class(config_class(**kwargs, fused=False)).double()
    for p in fast.parameters():  # zero-initialised norms and biases would hide errors
        torch.nn.init.normal_(p, std=0.3)
    plain.load_state_dict(fast.state_dict(), strict=True)
    return fast, plain


def _compare(fast, plain, images, mask=None):
    outs = [model(images, mask) for model in (fast, plain)]
    assert torch.allclose(outs[0], outs[1], atol=1e-10, rtol=1e-8)
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert q.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name


@pytest.mark.parametrize("case", list(MODELS))
def test_swin_fused_path_equals_the_reference_path(case):
    model_class, config_class, extra, size = MODELS[case]
    fast, plain = _pair(model_class, config_class, **SMALL, **extra, use_mask_token=True)
    assert all(not isinstance(m, fused.Linear) for m in plain.modules())
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    mask = torch.rand(2, size // 4, size // 4) < 0.5
    _compare(fast, plain, images, mask)


def test_vit_fused_path_equals_the_reference_path():
    fast, plain = _pair(VisionTransformer, ViTConfig, img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                        drop_path_rate=0.0)
    _compare(fast, plain, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_reference_path_in_float32_training_mode_with_dropout_off():
    fast, plain = (SwinTransformer(SwinConfig(**SMALL, img_size=48, window_size=4, fused=f)).train()
                   for f in (True, False))
    plain.load_state_dict(fast.state_dict())
    images = torch.randn(2, 3, 56, 56)
    assert torch.allclose(fast(images), plain(images), atol=1e-5, rtol=1e-5)


def test_the_config_key_builds_the_reference_path():
    cfg = load_config("nano-pretrain", overrides=["model.fused=false"])
    encoder = build_network(cfg).encoder
    assert not encoder.cfg.fused and not any(isinstance(m, fused.Linear) for m in encoder.modules())
