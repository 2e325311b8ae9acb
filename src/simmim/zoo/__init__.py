"""The named models: build them, list them, and measure them against their published figures."""

from __future__ import annotations

import torch
from torch import nn

from .flops import count_macs
from .registry import SPECS, ModelSpec, build_model, get_spec, list_models

__all__ = ["SPECS", "ModelSpec", "build_model", "get_spec", "list_models", "measure", "published_flops_fn"]


def published_flops_fn(model: nn.Module):
    """What the published tables count: the encoder's forward, plus average pooling for classifiers
    (mmpretrain's `extract_feat`); never the decoder or the classification head."""
    return model.forward_features if hasattr(model, "forward_features") else model.encoder


def measure(spec: ModelSpec) -> dict:
    """Parameters and multiply-adds of a spec's model, counted on the meta device (no memory, no
    weights): `flops` the published way at `spec.flops_size`, `flops_train` the whole forward
    (decoder or head included) at the training resolution."""
    with torch.device("meta"):
        model = build_model(spec).eval()
        images = torch.zeros(1, 3, spec.flops_size, spec.flops_size)
        flops = count_macs(published_flops_fn(model), images).total
        images = torch.zeros(1, 3, spec.img_size, spec.img_size)
        if spec.task == "pretrain":
            flops_train = count_macs(model, images, model.random_mask(1).to("meta")).total
        else:
            flops_train = count_macs(model, images).total
    return {
        "name": spec.name,
        "task": spec.task,
        "arch": spec.arch,
        "input_size": spec.img_size,
        "flops_input_size": spec.flops_size,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "flops": flops,
        "flops_train": flops_train,
        "published_params": spec.published_params,
        "published_flops": spec.published_flops,
        "published_size": spec.published_size,
        "top1": spec.top1,
        "weights": spec.weights,
        "source": spec.source,
        "notes": spec.notes,
    }
