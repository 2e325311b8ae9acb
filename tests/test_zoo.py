import json

import numpy as np
import pytest
import torch

import simmim
from simmim import zoo
from simmim.cli import main
from simmim.zoo import SPECS, build_model, get_spec, measure
from simmim.zoo.registry import encoder_config


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """`simmim models` caches its figures: each test starts with an empty cache of its own."""
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "cache"))

PUBLISHED = {s.name: s for s in SPECS if s.published_params}
TEST_MODELS = [s.name for s in SPECS if s.name.endswith("_test-64px")]


def test_the_seven_published_models_are_listed():
    assert len(PUBLISHED) == 7
    assert set(simmim.list_models("*simmim*")) >= set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_params_exact_and_flops_within_half_a_percent(name):
    row = measure(get_spec(name))
    assert row["params"] == row["published_params"]
    assert abs(row["flops"] / row["published_flops"] - 1) < 0.005


def reduced(spec) -> dict:
    """Overrides that shrink a zoo model (width, depth) while keeping what makes it that model: its image
    and window sizes, position embeddings and pooling; no drop path, so that every branch gets a gradient."""
    cfg = encoder_config(spec)
    if spec.arch == "vit":
        return dict(embed_dim=16, depth=min(cfg.depth, 2), num_heads=2, drop_path_rate=0.0)
    return dict(embed_dim=8, depths=tuple(min(d, 2) for d in cfg.depths),
                num_heads=tuple(1 << i for i in range(len(cfg.depths))), drop_path_rate=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_every_zoo_model_trains_at_reduced_size(name):
    """timm's test_model_backward: each registered model at reduced size, forward and backward, a finite
    non-zero gradient on every parameter."""
    spec = get_spec(name)
    model = build_model(spec, **reduced(spec)).train()
    assert (spec.task == "pretrain") == isinstance(model, simmim.models.SimMIM)
    if spec.arch == "swinv2":  # its zero-initialised post-norms would zero every branch's gradient
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
    size = model.encoder.cfg.img_size
    images = torch.randn(2, 3, size, size)
    if isinstance(model, simmim.models.SimMIM):
        out = model(images, model.random_mask(2, np.random.default_rng(0)))
        assert out.reconstruction.shape == images.shape
        loss = out.loss
    else:
        logits = model(images)
        assert logits.shape == (2, spec.num_classes)
        loss = logits.logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (p.grad is None or not p.grad.isfinite().all() or not p.grad.any())]
    assert not bad


def test_official_swin_large_clamps_where_mmpretrain_pads():
    official = measure(get_spec("simmim_finetune__swin_large__img224_window14__800ep"))
    padded = measure(get_spec("swin-large-w14_simmim-800e-pre_8xb256-coslr-100e_in1k"))
    assert official["params"] == 196_794_556  # stage 4 table is 13x13 (window 7), not 27x27
    assert padded["params"] - official["params"] == (27**2 - 13**2) * 48 * 2


@pytest.mark.slow
@pytest.mark.parametrize("name", TEST_MODELS)
def test_tiny_variant_trains_one_step(name):
    model = simmim.get_model(name).train()
    if get_spec(name).arch == "swinv2":  # its zero-initialised post-norms would zero every branch's gradient
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                torch.nn.init.ones_(module.weight)
    images = torch.randn(8, 3, 64, 64)  # drop path would drop a whole branch of a batch of 2 one time in 100
    if isinstance(model, simmim.models.SimMIM):
        loss = model(images, model.random_mask(8, np.random.default_rng(0))).loss
    else:
        loss = torch.nn.functional.cross_entropy(model(images), torch.arange(8) % 3)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_pretraining_model_returns_loss_and_reconstruction_in_input_space():
    model = simmim.get_model("simmim_swin-nano_test-64px").eval()
    images = torch.randn(3, 3, 64, 64)
    mask = model.random_mask(3)
    out = model(images, mask)
    assert out.loss.ndim == 0 and out.reconstruction.shape == images.shape
    # a flattened (B, L) mask is the same mask
    assert torch.equal(model(images, mask.flatten(1)).reconstruction, out.reconstruction)
    # the official loss: L1 over masked pixels / (masked pixels + 1e-5) / channels
    pixel = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = ((out.reconstruction - images).abs() * pixel).sum() / (pixel.sum() + 1e-5) / 3
    assert torch.allclose(out.loss, expected)


def test_list_models_is_case_insensitive_with_wildcards():
    assert simmim.list_models("SWIN-BASE-W7*") == ["swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k"]
    assert set(simmim.list_models("swin-base")) == {n for n in PUBLISHED if n.startswith("swin-base")}
    assert simmim.list_models("no-such-model") == []
    assert simmim.get_model("SWIN-NANO_TEST-64PX", num_classes=3).head.out_features == 3


def test_overrides_use_the_usual_names():
    model = simmim.get_model("simmim_swin-nano_test-64px", img_size=128, window_size=8, depths=(1, 1, 1, 1),
                             drop_path_rate=0.2, mask_patch_size=16, mask_ratio=0.5)
    assert model.random_mask(1).shape == (1, 32, 32)
    assert model.mask_generator.mask_count == 32
    assert model(torch.randn(1, 3, 128, 128), model.random_mask(1)).reconstruction.shape == (1, 3, 128, 128)


def test_unknown_names_and_settings_are_explained():
    with pytest.raises(KeyError, match="did you mean swin-base-w7"):
        simmim.get_model("swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in")
    with pytest.raises(TypeError, match="did you mean 'window_size'"):
        simmim.get_model("swin-nano_test-64px", windw_size=7)
    with pytest.raises(ValueError, match="mask_patch_size=24 must divide input_size=64"):
        simmim.get_model("simmim_swin-nano_test-64px", mask_patch_size=24)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: [c], "expected a mapping with 'task' and an 'encoder' mapping"),
    (lambda c: {**c, "name": None, "arch": "nope"}, "no zoo model of arch 'nope' and task 'classification'"),
    (lambda c: {**c, "encoder": {**c["encoder"], "windw_size": 7}}, "unknown setting 'windw_size'"),
])
def test_a_malformed_exported_config_is_one_line_naming_the_file(edit, expected, tmp_path, capsys):
    from simmim.zoo.hub import export

    folder = export(simmim.get_model("swin-nano_test-64px"), tmp_path / "export", name="swin-nano_test-64px")
    config = folder / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    assert main(["predict", str(folder), "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"simmim: error: {config}: not a simmim model config (") and expected in err, err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_cli_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in PUBLISHED:
        row = rows[name]
        assert {"name", "params", "flops", "input_size", "published_params", "published_flops"} <= set(row)
        assert row["params"] == row["published_params"]
        assert abs(row["flops"] / row["published_flops"] - 1) < 0.005
    assert rows["swin-base-w6_simmim-800e-pre_8xb256-coslr-100e_in1k-192px"]["input_size"] == 224


def test_cli_pattern_without_match_lists_nothing(capsys):
    assert main(["models", "--json", "nothing-like-this"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_models_are_measured_once_then_read_from_the_cache(monkeypatch, capsys):
    specs = [get_spec(n) for n in TEST_MODELS[:3]]
    first = zoo.measured(specs)
    assert first == [measure(s) for s in specs]
    assert "measuring the parameters and FLOPs of 3 models (once; kept in" in capsys.readouterr().err

    def fail(spec):
        raise AssertionError(f"{spec.name} measured again")

    monkeypatch.setattr(zoo, "measure", fail)
    assert zoo.measured(specs) == first
    assert main(["models", "--json", TEST_MODELS[0]]) == 0
    assert json.loads(capsys.readouterr().out) == first[:1]
    monkeypatch.setattr(zoo, "_torch_version", lambda: "0.0.0")  # another torch: figures measured afresh
    with pytest.raises(AssertionError, match="measured again"):
        zoo.measured(specs)
