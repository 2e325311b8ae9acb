"""The detection backbone: its maps are `features_only`'s, torchvision's Faster R-CNN, Mask R-CNN and
RetinaNet train and predict on it unchanged, checkpoints of every format load into it, frozen stages
stay fixed, and the detector's lr groups follow the fine-tuning recipe's layer ids."""

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import simmim
from simmim.checkpoint.convert import convert
from simmim.config import load_config
from simmim.detection import detector_param_groups
from simmim.engine import pretrain
from simmim.engine.optim import layer_id, num_layers, param_groups
from simmim.models import Classifier
from simmim.models.detection import DetectionBackbone
from simmim.models.layers import DropPath
from simmim.zoo.hub import export

SWIN = "simmim_swin-nano_test-64px"
SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def batch(count: int = 2, masks: bool = False) -> tuple[list[torch.Tensor], list[dict]]:
    """Dark images, each with one bright square (class 1) and one mid-grey bar (class 2)."""
    images, targets = [], []
    for i in range(count):
        image = torch.full((3, SIZE, SIZE), 0.1)
        boxes = torch.tensor([[8.0 + 4 * i, 10.0, 30.0 + 4 * i, 32.0], [36.0, 40.0 - 2 * i, 60.0, 52.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        m = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
        for k, ((x1, y1, x2, y2), value) in enumerate(zip(boxes.int().tolist(), (0.9, 0.5), strict=True)):
            image[:, y1:y2, x1:x2] = value
            m[k, y1:y2, x1:x2] = 1
        if masks:
            target["masks"] = m
        images.append(image)
        targets.append(target)
    return images, targets


SMALL = dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32,
             box_detections_per_img=10)


def train_steps(detector: torch.nn.Module, images, targets, steps: int = 10) -> list[dict[str, float]]:
    """The loss terms of `steps` AdamW steps on one batch."""
    optimizer = torch.optim.AdamW(detector_param_groups(detector, 0.05, 0.9), lr=3e-4)
    detector.train()
    losses = []
    for _ in range(steps):
        with torch.random.fork_rng():  # the RPN and RoI heads sample the same way at every step
            torch.manual_seed(0)
            terms = detector(images, targets)
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        losses.append({k: v.item() for k, v in terms.items()})
    return losses


def rpn_loss(terms: dict[str, float]) -> float:
    """The RPN's loss: on fixed anchors, so one objective throughout (the RoI heads' terms change meaning
    as the proposals improve: more of them become foreground and add box-regression terms)."""
    return terms["loss_objectness"] + terms["loss_rpn_box_reg"]


@pytest.mark.parametrize("name", [SWIN, "simmim_swinv2-nano_test-64px", "simmim_swin-micro-w6_fashion-mnist-48px"])
def test_maps_before_the_fpn_are_features_only_and_the_fpn_is_torchvisions(name, randomize):
    model = randomize(simmim.get_model(name))
    backbone = simmim.detection_backbone(model, out_channels=16).eval()
    reference = simmim.get_model(name, features_only=True)
    reference.encoder.load_state_dict(model.encoder.state_dict())
    images = torch.randn(2, 3, 96, 96)  # another size than the built one
    with torch.no_grad():
        maps = backbone.body(images)
        expected = reference(images)
        out = backbone(images)
    assert len(maps) == len(expected)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # torchvision's own FPN with LastLevelMaxPool on the same maps and weights, for the stages' levels
    fpn = FeaturePyramidNetwork(reference.channels, 16, extra_blocks=LastLevelMaxPool())
    fpn.load_state_dict(backbone.fpn.state_dict())
    with torch.no_grad():
        want = fpn({str(i): m for i, m in enumerate(expected)})
    for key in map(str, range(len(expected))):
        torch.testing.assert_close(out[key], want[key])
    assert list(out) == ["0", "1", "2", "3", "pool"] and backbone.out_channels == 16
    assert [m.shape[-1] for m in out.values()] == [24, 12, 6, 3, 2]  # strides 4 .. 64 (rounded up)


def test_vit_goes_through_a_simple_pyramid_to_strides_4_to_32():
    backbone = simmim.detection_backbone("vit-nano_test-64px", out_channels=16)
    assert backbone.reductions == [4, 8, 16, 32] and backbone.pyramid.channels == [12, 24, 48, 48]
    out = backbone(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(m.shape) for m in out.values()] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2),
                                                     (2, 16, 1, 1)]
    with pytest.raises(ValueError, match="built for 64 px"):
        backbone(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="last block only"):
        simmim.detection_backbone("vit-nano_test-64px", out_indices=(0,))


@pytest.mark.slow
@pytest.mark.parametrize("masks", [False, True], ids=["faster_rcnn", "mask_rcnn"])
def test_torchvision_rcnn_trains_and_predicts_on_the_backbone(masks):
    backbone = simmim.detection_backbone(SWIN, out_channels=32)
    heads = dict(box_head=TwoMLPHead(32 * 49, 64), box_predictor=FastRCNNPredictor(64, 3))
    if masks:
        heads.update(mask_head=MaskRCNNHeads(32, (32,), 1), mask_predictor=MaskRCNNPredictor(32, 32, 3))
        detector = MaskRCNN(backbone, None, **heads, **SMALL)
    else:
        detector = FasterRCNN(backbone, None, **heads, **SMALL)
    images, targets = batch(masks=masks)
    torch.manual_seed(0)
    before = backbone.encoder.patch_embed.proj.weight.detach().clone()
    losses = train_steps(detector, images, targets)
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in losses)
    assert rpn_loss(losses[-1]) < 0.97 * rpn_loss(losses[0]), losses
    assert losses[-1]["loss_classifier"] < losses[0]["loss_classifier"]
    if masks:
        assert losses[-1]["loss_mask"] < losses[0]["loss_mask"]
    grad = backbone.encoder.layers[0].blocks[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert not torch.equal(before, backbone.encoder.patch_embed.proj.weight)
    detector.eval()
    with torch.no_grad():
        predictions = detector(images)
    assert len(predictions) == 2
    for p in predictions:
        assert p["boxes"].shape[1:] == (4,) and p["labels"].shape == p["scores"].shape == p["boxes"].shape[:1]
        if masks:
            assert p["masks"].shape == (len(p["boxes"]), 1, SIZE, SIZE)


@pytest.mark.slow
def test_retinanet_and_defaults_take_the_backbone():
    # the detectors' own defaults: five levels for their anchors, '0'..'3' for RoI pooling
    backbone = simmim.detection_backbone(SWIN, out_channels=16)
    images, targets = batch()
    retina = RetinaNet(backbone, num_classes=3, min_size=SIZE, max_size=SIZE).train()
    losses = retina(images, targets)
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        assert {"boxes", "labels", "scores"} <= set(retina.eval()(images)[0])
    faster = FasterRCNN(simmim.detection_backbone(SWIN, out_channels=16), num_classes=3, min_size=SIZE,
                        max_size=SIZE).train()
    assert torch.isfinite(sum(faster(images, targets).values()))


def _encoder_equal(backbone: DetectionBackbone, reference: torch.nn.Module) -> None:
    got, want = backbone.encoder.state_dict(), reference.encoder.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("fmt", ["official", "mmpretrain", "hf", "simmim"])
def test_a_checkpoint_of_each_format_loads(fmt, tmp_path, randomize):
    model = randomize(simmim.get_model(SWIN))
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    convert(tmp_path / "ours.pth", tmp_path / f"{fmt}.pth", to=fmt)
    _encoder_equal(simmim.detection_backbone(tmp_path / f"{fmt}.pth", model=SWIN), model)


@pytest.mark.slow
def test_training_checkpoints_run_folders_and_exported_folders_load(tmp_path, image_folder, settings):
    run = tmp_path / "run"
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", image_folder(tmp_path / "data"), run,
                                                          "schedule.epochs=1", "data.heldout_images=0"))
    result = pretrain(cfg)
    trained = simmim.get_model(SWIN, pretrained=result.checkpoint)
    for source in (result.checkpoint, run):
        _encoder_equal(simmim.detection_backbone(source), trained)
    export(trained, tmp_path / "exported")
    _encoder_equal(simmim.detection_backbone(tmp_path / "exported"), trained)
    with pytest.raises(ValueError, match="brings its own weights"):
        simmim.detection_backbone(run, pretrained=True)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        simmim.detection_backbone(tmp_path / "missing.pth", model=SWIN)


def test_frozen_stages_get_no_gradient_and_stay_in_eval():
    backbone = simmim.detection_backbone("swin-nano_test-64px", out_channels=16, frozen_stages=1)
    frozen = [backbone.encoder.patch_embed, backbone.encoder.layers[0]]
    backbone.train()
    assert not any(m.training for f in frozen for m in f.modules())
    assert backbone.encoder.layers[1].training and backbone.fpn.training
    sum(m.square().mean() for m in backbone(torch.randn(2, 3, SIZE, SIZE)).values()).backward()
    for f in frozen:
        assert all(not p.requires_grad and p.grad is None for p in f.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.encoder.layers[1].parameters())
    with pytest.raises(ValueError, match="frozen_stages=5: expected 0 to 4"):
        simmim.detection_backbone(SWIN, frozen_stages=5)


def test_detector_lr_groups_follow_the_fine_tuning_layer_ids():
    backbone = simmim.detection_backbone("swin-nano_test-64px", out_channels=16, frozen_stages=0)
    detector = FasterRCNN(backbone, num_classes=3)
    encoder = backbone.encoder
    n = num_layers(encoder)
    scale = {id(p): g["lr_scale"] for g in detector_param_groups(detector, 0.05, 0.8) for p in g["params"]}
    # the same encoder in a classifier: the fine-tuning recipe's groups
    classifier = {id(p): g["lr_scale"] for g in param_groups(Classifier(encoder, 10), 0.05, 0.8) for p in g["params"]}
    for name, p in encoder.named_parameters():
        if name.startswith("patch_embed"):
            assert id(p) not in scale  # frozen: in no group
        else:
            assert scale[id(p)] == pytest.approx(0.8 ** (n + 1 - layer_id("encoder." + name, encoder)))
            assert scale[id(p)] == classifier[id(p)]
    others = [p for name, p in detector.named_parameters() if not name.startswith("backbone.body.")]
    assert others and all(scale[id(p)] == 1.0 for p in others)
    assert len({g["lr_scale"] for g in detector_param_groups(detector, 0.05, 0.8)}) == n + 1  # layers 1 .. n + 1
    with pytest.raises(TypeError, match="holds no DetectionBackbone"):
        detector_param_groups(torch.nn.Linear(2, 2), 0.05)


def test_drop_path_carries_over_or_is_set():
    kept = simmim.detection_backbone("swin-nano_test-64px")  # the classifier's 0.1
    rates = [m.p for m in kept.encoder.modules() if isinstance(m, DropPath)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    changed = simmim.detection_backbone("swin-nano_test-64px", drop_path_rate=0.3)
    rates = [m.p for m in changed.encoder.modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.3 * i / 4 for i in range(5)]) and changed.encoder.cfg.drop_path_rate == 0.3
