"""The named models: build them, list them, and measure them against their published figures.

Importing this needs no torch (`simmim models` reads cached figures without it)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..fsutil import read_json_cache, update_json_cache
from ..hardware import cache_dir
from .registry import SPECS, ModelSpec, build_model, get_spec, list_models

__all__ = ["SPECS", "ModelSpec", "build_model", "cache_dir", "get_spec", "list_models", "measure", "measured",
           "published_flops_fn"]

if TYPE_CHECKING:
    from torch import nn


def published_flops_fn(model: nn.Module):
    """What the published tables count: the encoder's forward, plus average pooling for classifiers
    (mmpretrain's `extract_feat`); never the decoder or the classification head."""
    return model.forward_features if hasattr(model, "forward_features") else model.encoder


def measure(spec: ModelSpec) -> dict:
    """Parameters and multiply-adds of a spec's model, counted on the meta device (no memory, no
    weights): `flops` the published way at `spec.flops_size`, `flops_train` the whole forward
    (decoder or head included) at the training resolution."""
    import torch

    from .flops import count_macs

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
        "hub": spec.hub,
        "source": spec.source,
        "notes": spec.notes,
    }


def _torch_version() -> str:
    return importlib.metadata.version("torch")  # without importing torch


def _measure_key() -> str:
    """What the figures depend on: the torch version and the code of the models and the zoo."""
    root = Path(__file__).parent.parent
    digest = hashlib.sha256(_torch_version().encode())
    for path in sorted([*root.glob("models/*.py"), *root.glob("zoo/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def measured(specs: Sequence[ModelSpec]) -> list[dict]:
    """`measure` of each spec, read from a cache under the weights cache dir (one file per torch
    version and model code, so a change of either measures afresh); measuring every zoo model takes
    tens of seconds on a small CPU, and `simmim models` would pay them at every call."""
    path = cache_dir() / f"measured-{_measure_key()}.json"
    cached = read_json_cache(path)
    missing = [s for s in specs if s.name not in cached]
    if missing:  # said on stderr: stdout may be --json
        print(f"measuring the parameters and FLOPs of {len(missing)} model{'s' if len(missing) > 1 else ''} "
              f"(once; kept in {path})", file=sys.stderr, flush=True)
        fresh = {s.name: measure(s) for s in missing}
        update_json_cache(path, fresh, "measured figures")
        cached.update(fresh)
    return [cached[s.name] for s in specs]
