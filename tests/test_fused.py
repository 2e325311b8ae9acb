"""models/fused.py against the plain ops: every autograd function gradchecked in float64, and whole
models on the fused path against the reference path (roll, pad, partition) on the same random weights."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from simmim.config import load_config
from simmim.engine.builders import build_network
from simmim.models import (
    SimMIM,
    SwinConfig,
    SwinTransformer,
    SwinTransformerV2,
    SwinV2Config,
    VisionTransformer,
    ViTConfig,
    fused,
    kernels,
    swin,
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


def _simmim_pair(decoder: str, dtype: torch.dtype):
    """A fused and a plain SimMIM Swin with the same random weights (the decoder's state-dict keys alike)."""
    models = [SimMIM(SwinTransformer(SwinConfig(**SMALL, img_size=48, window_size=4, use_mask_token=True, fused=f)),
                     mask_patch_size=16, decoder=decoder).to(dtype) for f in (True, False)]
    for p in models[0].parameters():
        torch.nn.init.normal_(p, std=0.3)
    models[1].load_state_dict(models[0].state_dict(), strict=True)
    return models


def _ops_run(model, images, mask) -> set[str]:
    with torch.profiler.profile() as prof:
        model(images, mask).loss.backward()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("decoder", ["linear", "mlp"])
def test_the_plain_simmim_model_equals_the_fused_one_and_runs_no_fused_or_private_op(decoder, monkeypatch):
    fast, plain = _simmim_pair(decoder, torch.float64)
    assert not [m for m in plain.modules() if type(m).__module__ == fused.__name__]
    ours = {name for name, value in vars(fused).items()  # the autograd functions, named in the profile
            if isinstance(value, type) and issubclass(value, torch.autograd.Function)}
    images, mask = torch.randn(2, 3, 48, 48, dtype=torch.float64), torch.rand(2, 12, 12) < 0.5
    outs = [model(images, mask) for model in (fast, plain)]
    torch.testing.assert_close(outs[0].reconstruction, outs[1].reconstruction, atol=1e-10, rtol=1e-8)
    for out in outs:
        out.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert q.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), name
    # float32 on the CPU, where the fused path takes oneDNN's private linear if the route says so
    monkeypatch.setenv("SIMMIM_GEMM_ROUTE", "onednn" if kernels.ONEDNN else "aten")
    fast, plain = _simmim_pair(decoder, torch.float32)
    names = _ops_run(plain, images.float(), mask)
    assert not [n for n in names if n.startswith("mkldnn::") or any(f in n for f in ours)]
    if kernels.ONEDNN:  # what the scan looks for is there on the fused path
        assert "mkldnn::_linear_pointwise" in _ops_run(fast, images.float(), mask)


@pytest.fixture
def geometry(monkeypatch):
    """An empty window-geometry cache, and a count of the geometries built (index orders and shift masks)."""
    monkeypatch.setattr(swin, "_geometry", {})
    built = []

    def counted(build):
        def spy(*args, **kwargs):
            built.append(args[:4])
            return build(*args, **kwargs)
        return spy

    for name in ("window_order", "shift_mask"):
        monkeypatch.setattr(swin, name, counted(getattr(swin, name)))
    return built


@pytest.mark.parametrize("fused_path", [True, False])
@pytest.mark.parametrize("model_class, config_class",
                         [(SwinTransformer, SwinConfig), (SwinTransformerV2, SwinV2Config)])
def test_window_geometry_is_built_once_per_map_size_and_device(geometry, fused_path, model_class, config_class):
    encoder = model_class(config_class(**SMALL, img_size=48, window_size=4, fused=fused_path)).eval()
    assert not [b for layer in encoder.layers for b in layer.blocks if hasattr(b, "window") or hasattr(b, "shift")]
    images = torch.randn(2, 3, 56, 56)  # padded and shifted windows
    with torch.no_grad():
        first = encoder(images)
        assert geometry
        built = len(geometry)
        second = encoder(images)
        assert len(geometry) == built and torch.equal(first, second)
        encoder(torch.randn(1, 3, 48, 48))  # another map size: its own windows
        assert len(geometry) > built
    with torch.device("meta"):  # another device: its own tensors, on that device
        meta = swin.Windows.build(14, 14, 4, 2, torch.device("meta"), fused_path)
    cpu = swin.Windows.build(14, 14, 4, 2, torch.device("cpu"), fused_path)
    assert meta.mask.is_meta and cpu.mask.device.type == "cpu"


@pytest.mark.parametrize("model_class, config_class",
                         [(SwinTransformer, SwinConfig), (SwinTransformerV2, SwinV2Config)])
def test_tables_first_built_in_inference_mode_serve_a_training_step(geometry, model_class, config_class):
    # built for 64 px, run at 56: padded shifted windows, and a 7 x 7 second map whose window is clamped
    # from 8 (its bias tables looked up at the forward, cached)
    encoder = model_class(config_class(**SMALL, img_size=64, window_size=8))
    images = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        expected = encoder(images)
    out = encoder(images)  # the gathers and the bias lookups save cached tensors for the backward
    out.sum().backward()
    assert torch.equal(out.detach(), expected)
    assert not any(t.is_inference() for w in swin._geometry.values() for t in (w.mask, *(w.gather or ()))
                   if isinstance(t, torch.Tensor))


def test_windows_built_on_fake_tensors_are_not_kept(geometry):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = swin.Windows.build(14, 14, 4, 2, torch.device("cpu"))
    assert fake.gather.index.shape == (256,) and not swin._geometry
    real = swin.Windows.build(14, 14, 4, 2, torch.device("cpu"))
    assert type(real.gather.index) is torch.Tensor and swin._geometry
