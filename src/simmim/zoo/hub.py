"""Models with their weights: zoo names with published or given weights (`sources.py` finds them),
and self-describing directories exported and loaded again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..checkpoint.io import atomic_save_safetensors
from ..checkpoint.transfer import load_weights
from ..fsutil import atomic_write_text
from ..models import Classifier, FeatureMaps, SimMIM
from .registry import CLASSIFIER_KEYS, SIMMIM_KEYS, SPECS, arch_of, build_model, get_spec
from .sources import published_weights, resolve

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
def model_config(model: nn.Module, name: str | None = None, classes: list[str] | None = None) -> dict:
    """Plain-data description from which `build_from_config` rebuilds the same architecture."""
    if not isinstance(model, SimMIM | Classifier):
        raise TypeError(f"cannot describe a {type(model).__name__}; expected a SimMIM or Classifier model")
    encoder = dataclasses.asdict(model.encoder.cfg)
    config = {"name": name, "arch": arch_of(model.encoder.cfg), "encoder": encoder}
    if isinstance(model, SimMIM):
        config.update(task="pretrain", mask_patch_size=model.mask_generator.mask_patch_size,
                      mask_ratio=model.mask_generator.mask_ratio, loss=model.loss_kind, decoder=model.decoder_kind,
                      norm_target_window=model.norm_target_window)
    else:
        config.update(task="classification", num_classes=model.num_classes, classes=classes)
    return config


def build_from_config(config: dict) -> nn.Module:
    """Inverse of `model_config` (random weights)."""
    spec = get_spec(config["name"]) if config.get("name") else None
    head = SIMMIM_KEYS if config["task"] == "pretrain" else CLASSIFIER_KEYS
    if spec is None:  # a model outside the zoo: any zoo entry of the same arch and task is a template
        spec = next(s for s in SPECS if (s.arch, s.task) == (config["arch"], config["task"]))
    overrides = {k: v for k, v in config["encoder"].items() if k != "use_mask_token"}
    model = build_model(spec, **overrides, **{k: config[k] for k in head if config.get(k) is not None})
    if config.get("classes"):
        model.classes = list(config["classes"])
    return model


def export(model: nn.Module, out_dir: str | Path, name: str | None = None, classes: list[str] | None = None) -> Path:
    """Writes `model.safetensors` (our layout) and `config.json` to out_dir; `classes` defaults to
    the model's own class names (a fine-tuning run's, set by `load_run_model`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "simmim"})
    config = model_config(model, name, classes or getattr(model, "classes", None))
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n", "exported config")
    return out


def is_exported(path: str | Path) -> bool:
    """Whether `path` is a folder that `export` wrote."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_directory(path: str | Path) -> nn.Module:
    """A model exported with `export`."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an exported model: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
        model = build_from_config(config)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{config_file}: not a simmim model config ({err})") from None
    load_weights(model, path / WEIGHTS_FILE)
    return model


def get_model(name: str | Path, pretrained: bool | str | Path = False, features_only: bool = False,
              out_indices: tuple[int, ...] | None = None, **overrides) -> nn.Module:
    """A zoo model by name (case-insensitive) or an exported directory, in eval mode.
    pretrained=True downloads the published weights (cached); any other weights source (`sources.py`:
    a checkpoint file or folder of any supported format, official, mmpretrain, HF or ours, or a zoo
    name) is loaded, adapting windows as needed. features_only=True
    returns its encoder as `FeatureMaps`: a list of NCHW maps, one per stage (or ViT block) in
    `out_indices` (all when None)."""
    if out_indices is not None and not features_only:
        raise TypeError("out_indices applies only with features_only=True")
    model = load_directory(name) if Path(name).is_dir() else _zoo_model(str(name), pretrained, **overrides)
    return (FeatureMaps(model.encoder, out_indices) if features_only else model).eval()


def _zoo_model(name: str, pretrained: bool | str | Path, **overrides) -> nn.Module:
    spec = get_spec(str(name))
    model = build_model(spec, **overrides)
    if pretrained:
        report = load_weights(model, published_weights(spec.name) if pretrained is True else resolve(pretrained))
        print(f"{spec.name}: {report.summary()}")
    return model
