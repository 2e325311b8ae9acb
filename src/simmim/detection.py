"""`simmim.detection_backbone`: any encoder we can read, as the backbone of torchvision's detectors.

    backbone = simmim.detection_backbone("runs/pretrain")          # a run folder: its newest checkpoint
    detector = torchvision.models.detection.MaskRCNN(backbone, num_classes=11)
    optimizer = torch.optim.AdamW(detector_param_groups(detector, 0.05, layer_decay=0.9), lr=1e-4)

The optimizer's lrs are multiplied by each group's `lr_scale` (as `LRSchedule.apply` does).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .engine.optim import param_groups
from .engine.probe import load_encoder
from .errors import UsageError
from .models.detection import DetectionBackbone
from .zoo.hub import get_model


def encoder_of(source: str | Path | nn.Module, pretrained: bool | str | Path = False,
               model: str | None = None) -> nn.Module:
    """The encoder of a model you hold (SimMIM, classifier or bare encoder), a simmim training checkpoint
    or run folder (its newest checkpoint), an exported folder, a checkpoint of any supported format
    (official, mmpretrain, HF, ours) with `model` naming its zoo architecture, or a zoo name (with
    `pretrained` as `get_model` takes it: False for random weights)."""
    if isinstance(source, nn.Module):
        return getattr(source, "encoder", source)
    if Path(source).exists():  # a run folder resolves to its newest checkpoint inside load_encoder
        if pretrained is not False:
            raise UsageError(f"pretrained={pretrained!r}: {source} is a file or folder, which brings its own weights")
        return load_encoder(str(source), model)
    if model is not None:
        raise FileNotFoundError(f"{source}: no such checkpoint file (model={model!r} names the architecture of a file)")
    return get_model(str(source), pretrained=pretrained).encoder


def detection_backbone(model_or_name: str | Path | nn.Module, pretrained: bool | str | Path = False,
                       model: str | None = None, out_channels: int = 256, out_indices: tuple[int, ...] | None = None,
                       levels: int = 5, frozen_stages: int | None = None,
                       drop_path_rate: float | None = None) -> DetectionBackbone:
    """A `DetectionBackbone` (maps through torchvision's FPN, `out_channels` each) on the encoder of
    `model_or_name` (see `encoder_of`), in training mode. `drop_path_rate` None keeps the encoder's
    stochastic depth; `frozen_stages=k` holds the patch embedding and k stages fixed."""
    encoder = encoder_of(model_or_name, pretrained, model)
    return DetectionBackbone(encoder, out_channels, out_indices, levels, frozen_stages, drop_path_rate).train()


def detector_param_groups(detector: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups of a detector built on a `DetectionBackbone`: the encoder's layers get the
    fine-tuning recipe's layer-wise lr decay (`engine.optim.layer_id`), the FPN and heads the full lr."""
    where = next((name for name, m in detector.named_modules() if isinstance(m, DetectionBackbone)), None)
    if where is None:
        raise TypeError(f"{type(detector).__name__} holds no DetectionBackbone: build it on simmim.detection_backbone")
    return param_groups(detector, weight_decay, layer_decay, encoder=f"{where}.body.encoder".lstrip("."))
