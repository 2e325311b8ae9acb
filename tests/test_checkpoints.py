"""Checkpoints of every published format load into our models and give the same outputs; conversions
round trip; pretraining weights transfer into classifiers; export, inference and reconstruction."""

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

import simmim
from simmim.checkpoint.formats import MMPRETRAIN
from simmim.checkpoint.resample import resample_rel_pos_bias
from simmim.checkpoint.transfer import load_weights
from simmim.cli import main
from simmim.data.photos import load_photo
from simmim.models.layers import relative_position_index
from simmim.zoo import hub, sources

PRE, CLS = "simmim_swin-nano_test-64px", "swin-nano_test-64px"


def _pair(randomize, name, **kw):
    """A random model and an independent copy of its architecture."""
    a = randomize(simmim.get_model(name, **kw))
    return a, simmim.get_model(name, **kw)


def _outputs(model, seed=0):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        if isinstance(model, simmim.models.SimMIM):
            return model(images, model.random_mask(2, np.random.default_rng(seed))).reconstruction
        return model(images)


def _with_official_buffers(model) -> dict:
    """The state dict as the official code saves it: with index and shift-mask buffers."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_bias_table") and hasattr(module, "window"):
            state[f"{name}.relative_position_index"] = relative_position_index(module.window, module.window)
    state["encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    return state


def test_official_pretraining_checkpoint_with_yacs_config(tmp_path, randomize):
    yacs_config = pytest.importorskip("yacs.config")
    src, dst = _pair(randomize, PRE)
    cfg = yacs_config.CfgNode({"MODEL": {"TYPE": "swin"}, "DATA": {"IMG_SIZE": 64}})
    torch.save({"model": _with_official_buffers(src), "config": cfg, "epoch": 99}, tmp_path / "ckpt.pth")
    report = load_weights(dst, tmp_path / "ckpt.pth")
    assert report.format == "official" and not report.initialized
    assert torch.allclose(_outputs(dst), _outputs(src), atol=1e-5)


def test_official_finetuned_checkpoint_without_encoder_prefix(tmp_path, randomize):
    src, dst = _pair(randomize, CLS)
    state = {k.removeprefix("encoder."): v for k, v in src.state_dict().items()}
    assert "head.weight" in state and "layers.0.blocks.0.attn.qkv.weight" in state
    torch.save({"model": state, "epoch": 3}, tmp_path / "ft.pth")
    load_weights(dst, tmp_path / "ft.pth")
    assert torch.allclose(_outputs(dst), _outputs(src), atol=1e-5)


class UnfoldPatchMerging(torch.nn.Module):
    """mmpretrain's PatchMerging, written independently: nn.Unfold(2, stride 2) orders the 4C
    channels as (channel, row, column)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4 * dim)
        self.reduction = torch.nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):  # (B, H, W, C)
        cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L)
        b, h, w = x.shape[0], x.shape[1] // 2, x.shape[2] // 2
        return self.reduction(self.norm(cols.transpose(1, 2))).view(b, h, w, -1)


def test_mmpretrain_patch_merging_reorder_against_unfold(randomize):
    ours = randomize(simmim.get_model(PRE)).encoder.layers[0].downsample
    theirs = UnfoldPatchMerging(24)
    converted = MMPRETRAIN.from_ours({f"encoder.layers.0.downsample.{k}": v for k, v in ours.state_dict().items()})
    theirs.load_state_dict({k.removeprefix("backbone.stages.0.downsample."): v for k, v in converted.items()})
    x = torch.randn(2, 8, 8, 24)
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)


@pytest.mark.parametrize("name", [PRE, CLS])
def test_mmpretrain_checkpoint(tmp_path, name, randomize):
    src, dst = _pair(randomize, name)
    state = MMPRETRAIN.from_ours(src.state_dict())
    assert any(k.startswith("backbone.stages.0.blocks.0.attn.w_msa.qkv") for k in state)
    # mmpretrain files carry index buffers and the data preprocessor's statistics
    state["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = relative_position_index(4, 4)
    state["data_preprocessor.mean"] = torch.zeros(3, 1, 1)
    torch.save({"meta": {"epoch": 100, "mmengine_version": "0.10"}, "state_dict": state}, tmp_path / "mm.pth")
    assert load_weights(dst, tmp_path / "mm.pth").format == "mmpretrain"
    assert torch.allclose(_outputs(dst), _outputs(src), atol=1e-5)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_hf_checkpoint_written_by_transformers(tmp_path, suffix, randomize):
    transformers = pytest.importorskip("transformers")
    # 128 px: no stage map is smaller than the window (HF >= 5 mis-sizes the tables of such stages)
    cfg = transformers.SwinConfig(image_size=128, patch_size=4, embed_dim=24, depths=[1, 1, 2, 1],
                                  num_heads=[1, 2, 3, 6], window_size=4, encoder_stride=32)
    hf = randomize(transformers.SwinForMaskedImageModeling(cfg)).eval()
    hf.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    if suffix == "bin":  # the older pytorch_model.bin: the same flat state dict, pickled
        file = tmp_path / "pytorch_model.bin"
        torch.save(safetensors.torch.load_file(tmp_path / "model.safetensors"), file)
    ours = simmim.get_model(PRE, img_size=128, pretrained=file)
    images = torch.randn(2, 3, 128, 128)
    mask = ours.random_mask(2, np.random.default_rng(0))
    with torch.no_grad():
        ref = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        out = ours(images, mask)
    assert torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-5)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5


@pytest.mark.parametrize("name", [PRE, CLS])
def test_conversions_round_trip_bit_exact(tmp_path, name, randomize):
    model = randomize(simmim.get_model(name))
    hub.export(model, tmp_path / "ours", name=name)
    src = tmp_path / "ours" / "model.safetensors"
    chain = [("official", "a.pth"), ("mmpretrain", "b.pth"), ("hf", "c.safetensors"), ("hf", "d.bin"),
             ("official", "e.pth"), ("simmim", "f.safetensors")]
    for fmt, file in chain:
        assert main(["convert", str(src), str(tmp_path / file), "--to", fmt]) == 0
        src = tmp_path / file
    back = simmim.get_model(name, pretrained=src).state_dict()
    original = model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_vit_checkpoints_have_no_hf_or_mmpretrain_layout(tmp_path, capsys):
    hub.export(simmim.get_model("simmim_vit-nano_test-64px"), tmp_path)
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "x.pth"), "--to", "hf"]) == 2
    assert "no counterpart in the hf format: encoder.blocks" in capsys.readouterr().err


def test_pretrain_to_finetune_transfer_with_window_change(randomize):
    pre = randomize(simmim.get_model(PRE, window_size=4))
    clf = simmim.get_model(CLS, window_size=5, img_size=80)
    report = load_weights(clf, {"model": pre.state_dict()})
    assert set(report.initialized) == {"head.weight", "head.bias"}
    assert {"encoder.mask_token", "decoder.0.weight"} <= set(report.dropped)
    key = "encoder.layers.2.blocks.1.attn.relative_position_bias_table"  # 4x4 map at 64 px, 5x5 at 80
    assert clf.state_dict()[key].shape == (81, 3)
    assert torch.allclose(clf.state_dict()[key], resample_rel_pos_bias(pre.state_dict()[key], 4, 5))
    assert torch.equal(clf.state_dict()["encoder.layers.2.blocks.0.mlp.fc1.weight"],
                       pre.state_dict()["encoder.layers.2.blocks.0.mlp.fc1.weight"])


def test_vit_transfer_copies_the_shared_table_into_every_block(randomize):
    pre = randomize(simmim.get_model("simmim_vit-nano_test-64px"))
    clf = simmim.get_model("vit-nano_test-64px")
    report = load_weights(clf, {"model": pre.state_dict()})
    shared = pre.state_dict()["encoder.rel_pos_bias.relative_position_bias_table"]
    for i in range(2):
        assert torch.equal(clf.state_dict()[f"encoder.blocks.{i}.attn.relative_position_bias_table"], shared)
    assert {"fc_norm.weight", "head.weight"} <= set(report.initialized)


def test_checkpoint_of_another_architecture_names_keys_and_shapes():
    vit = simmim.get_model("simmim_vit-nano_test-64px")
    with pytest.raises(ValueError, match=r"does not fit this pretraining model: missing .* keys \(decoder|encoder"):
        load_weights(simmim.get_model(PRE), {"model": vit.state_dict()})
    wide = simmim.get_model(PRE, embed_dim=48)
    with pytest.raises(ValueError, match=r"other shapes: .*\(48.*vs \(24"):
        load_weights(simmim.get_model(PRE), {"model": wide.state_dict()})


def test_prefixes_of_ddp_and_compile_are_stripped(randomize):
    src, dst = _pair(randomize, CLS)
    state = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    load_weights(dst, {"model": state})
    assert torch.equal(_outputs(dst), _outputs(src))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the bare pickle below is meant to be odd
def test_checkpoint_carrying_a_callable_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="system.*not executed|not executed.*system"):
        simmim.get_model(CLS, pretrained=tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, not torch's zip container
        pickle.dump({"model": {"x": Payload()}}, f)
    with pytest.raises(ValueError, match="nothing in it was executed"):
        simmim.get_model(CLS, pretrained=tmp_path / "evil.pkl")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_export_and_load_directory(tmp_path, capsys, randomize):
    model = randomize(simmim.get_model(CLS, num_classes=4))
    hub.export(model, tmp_path / "exp", name=CLS, classes=["a", "b", "c", "d"])
    loaded = simmim.get_model(tmp_path / "exp")
    assert loaded.classes == ["a", "b", "c", "d"]
    assert torch.equal(_outputs(loaded), _outputs(model.eval()))
    # four classes in the file, ten in the zoo entry: refused, naming the head
    assert main(["export", str(tmp_path / "exp" / "model.safetensors"), str(tmp_path / "exp2"), "--model", CLS]) == 2
    assert "head.weight (4, 192) vs (10, 192)" in capsys.readouterr().err
    report = load_weights(simmim.get_model(CLS), tmp_path / "exp" / "model.safetensors", new_head=True)
    assert report.dropped == ["head.weight", "head.bias"] and report.initialized == ["head.bias", "head.weight"]


def test_download_cache_hash_and_offline_error(tmp_path, monkeypatch, randomize):
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "cache"))
    model = randomize(simmim.get_model(CLS))
    torch.save({"model": model.state_dict()}, tmp_path / "w.pth")
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()[:8]
    good = tmp_path / f"w_20220829-{digest}.pth"
    (tmp_path / "w.pth").rename(good)
    path = sources.download(good.as_uri())
    assert path.parent == tmp_path / "cache" and path.read_bytes() == good.read_bytes()
    bad = tmp_path / "w_20220829-00000000.pth"
    bad.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="sha256 does not start with '00000000'"):
        sources.download(bad.as_uri())
    with pytest.raises(ConnectionError, match=r"could not download http://127\.0\.0\.1:9/x\.pth .*pretrained=PATH"):
        sources.download("http://127.0.0.1:9/x.pth")
    with pytest.raises(sources.WeightsUnavailable, match="no downloadable weights.*pretrained=PATH"):
        simmim.get_model("swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k", pretrained=True)


@pytest.fixture
def exported_classifier(tmp_path, randomize):
    model = randomize(simmim.get_model(CLS, num_classes=10))
    return hub.export(model, tmp_path / "clf", name=CLS, classes=[f"class{i}" for i in range(10)])


def test_inference_model_on_a_real_photo_file_and_a_batch(tmp_path, exported_classifier):
    photo = tmp_path / "chelsea.jpg"
    load_photo("chelsea").save(photo)
    single = simmim.inference_model(exported_classifier, str(photo))
    assert set(single) == {"pred_label", "pred_score", "pred_class", "pred_scores"}
    assert single["pred_class"] == f"class{single['pred_label']}"
    assert single["pred_scores"].shape == (10,) and abs(single["pred_scores"].sum() - 1) < 1e-5
    assert single["pred_score"] == pytest.approx(single["pred_scores"].max())
    coffee = np.asarray(load_photo("coffee"))
    batch = simmim.inference_model(exported_classifier, [str(photo), load_photo("astronaut"), coffee])
    assert len(batch) == 3
    assert np.allclose(batch[0]["pred_scores"], single["pred_scores"], atol=1e-6)
    alone = simmim.inference_model(exported_classifier, coffee)
    assert np.allclose(batch[2]["pred_scores"], alone["pred_scores"], atol=1e-6)


def test_zoo_classifier_uses_imagenet_class_names():
    from simmim.inference import class_names

    names = class_names(simmim.get_model(CLS, num_classes=1000))
    assert len(names) == 1000 and names[0].startswith("tench")


def test_predict_cli(tmp_path, exported_classifier, capsys):
    photo = tmp_path / "astronaut.png"
    load_photo("astronaut").save(photo)
    assert main(["predict", str(exported_classifier), str(photo), "--topk", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 5 and "class" in lines[2]


def test_reconstruct_writes_the_four_panels(tmp_path, randomize):
    model = randomize(simmim.get_model(PRE))
    hub.export(model, tmp_path / "pre", name=PRE)
    photo = tmp_path / "coffee.png"
    load_photo("coffee").save(photo)
    result = simmim.inference_model(tmp_path / "pre", str(photo))
    assert result["mask"].shape == (16, 16) and result["reconstruction"].size == (64, 64)
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(tmp_path / "pre"), str(photo), "--out", str(out), "--scale", "2"]) == 0
    img = np.asarray(Image.open(out))
    from simmim.viz import GAP

    tile = 128
    assert img.shape == (14 + GAP + tile + GAP, 4 * (tile + GAP) + GAP, 3)
    top = 14 + GAP
    panels = [img[top: top + tile, GAP + i * (tile + GAP): GAP + i * (tile + GAP) + tile].astype(int) for i in range(4)]
    masked = np.kron(result["mask"], np.ones((8, 8), dtype=int)).astype(bool)  # 16 -> 128 px
    assert (np.abs(panels[1][masked] - 128) <= 1).all()  # masked patches are grey
    assert (panels[1][~masked] == panels[0][~masked]).all()  # visible patches are the original
    assert (panels[3][~masked] == panels[0][~masked]).all()
    assert (panels[3][masked] == panels[2][masked]).all()


def test_pretraining_model_in_predict_is_a_clear_error(tmp_path, capsys):
    hub.export(simmim.get_model(PRE), tmp_path / "pre", name=PRE)
    load_photo("coffee").save(tmp_path / "c.png")
    assert main(["predict", str(tmp_path / "pre"), str(tmp_path / "c.png")]) == 2
    assert "use `simmim reconstruct`" in capsys.readouterr().err


QUIET_RUN = ["--epochs", "1", "--batch-size", "8", "--set", "data.num_workers=0", "--set", "runtime.threads=1",
             "--set", "runtime.tensorboard=false", "--set", "runtime.vis_every=0"]


@pytest.fixture(scope="module")
def named_classes(tmp_path_factory, image_folder):
    """train/ and val/ with two classes named by their folders."""
    root = image_folder(tmp_path_factory.mktemp("named"))
    for split in ("train", "val"):
        for old, new in (("class_0", "heron"), ("class_1", "kingfisher")):
            (root / split / old).rename(root / split / new)
    return root


def test_export_of_a_finetuning_run_keeps_the_class_names(tmp_path, named_classes, capsys):
    assert main(["finetune", "--preset", "nano-finetune", "--data", str(named_classes), "--out", str(tmp_path / "f"),
                 *QUIET_RUN]) == 0
    ckpt = sorted((tmp_path / "f").glob("ckpt-*.pt"))[-1]
    assert main(["export", str(ckpt), str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["classes"] == ["heron", "kingfisher"]
    capsys.readouterr()
    image = next((named_classes / "val" / "heron").iterdir())
    assert main(["predict", str(tmp_path / "exp"), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and lines[1].split() == ["rank", "score", "label", "class"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2"] and {(r[2], r[3]) for r in rows} == {("0", "heron"), ("1", "kingfisher")}


def _masked_block_fraction(png: Path, block: int) -> float:
    """Fraction of `block`-px blocks that are grey in the masked panel of a scale-1 reconstruction grid."""
    from simmim.viz import GAP

    img = np.asarray(Image.open(png)).astype(int)
    top, tile = 14 + GAP, 64
    masked = img[top: top + tile, GAP + tile + GAP: GAP + 2 * tile + GAP]
    grey = (np.abs(masked - 128) <= 1).all(-1)
    blocks = grey.reshape(tile // block, block, tile // block, block).all(axis=(1, 3))
    return float(blocks.mean())


def test_reconstruct_uses_the_mask_of_the_checkpoint_unless_flags_say_otherwise(tmp_path, named_classes, capsys):
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(named_classes), "--out", str(tmp_path / "p"),
                 "--set", "mask.patch_size=16", "--set", "mask.ratio=0.3", *QUIET_RUN]) == 0
    ckpt = sorted((tmp_path / "p").glob("ckpt-*.pt"))[-1]
    photo = tmp_path / "coffee.png"
    load_photo("coffee").save(photo)
    out = tmp_path / "rec.png"
    assert main(["reconstruct", PRE, str(photo), "--weights", str(ckpt), "--out", str(out)]) == 0
    assert _masked_block_fraction(out, 16) == 5 / 16  # ceil(0.3 x 16 blocks of 16 px)
    assert main(["reconstruct", PRE, str(photo), "--weights", str(ckpt), "--out", str(out),
                 "--mask-ratio", "0.5", "--mask-patch-size", "32"]) == 0
    assert _masked_block_fraction(out, 32) == 2 / 4


def test_panel_titles_fit_at_scale_1():
    from PIL import ImageDraw

    from simmim.viz import PANELS, fitting_title

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for width in (64, 128, 192):
        for alternatives in PANELS:
            title = fitting_title(draw, alternatives, width)
            assert title in alternatives and draw.textlength(title) <= width
    assert [fitting_title(draw, t, 192) for t in PANELS][2] == "reconstruction"


def test_predict_and_reconstruct_on_random_weights_and_the_cli_remedy_for_missing_weights(tmp_path, capsys):
    photo = tmp_path / "coffee.png"
    load_photo("coffee").save(photo)
    assert main(["predict", CLS, str(photo), "--random-weights", "--topk", "2"]) == 0
    captured = capsys.readouterr()
    assert "output meaningless" in captured.err and len(captured.out.splitlines()) == 4
    assert main(["reconstruct", PRE, str(photo), "--random-weights", "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").is_file()
    capsys.readouterr()
    assert main(["predict", "swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k", str(photo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("simmim: error: ") and "--weights PATH" in err and "pretrained=" not in err
    with pytest.raises(SystemExit, match="2"):  # argparse: the two exclude each other
        main(["predict", CLS, str(photo), "--random-weights", "--weights", "w.pt"])
