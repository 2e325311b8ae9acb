"""Sources that carry their architecture: a training run's folder (its newest checkpoint), a training
checkpoint (a file or a sharded directory) and an exported folder. Every command that takes a model
resolves them here, reads the architecture from them, and names it when it does not fit a model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.io import load_checkpoint_file
from ..checkpoint.sharded import STATE_FILE, consolidate, is_sharded_checkpoint
from ..checkpoint.training import FORMAT, list_checkpoints
from ..errors import UsageError
from .registry import SPECS, SWINV2_SIZES, ModelSpec, arch_of, build_model, encoder_config, get_spec

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
SIZE_KEYS = ("embed_dim", "depths", "num_heads", "depth", "patch_size", "extra_norm_period")
"""Encoder fields that make weights of one model unfit for another (resolution and windows are resampled)."""
RUN_MODEL_KEYS = ("img_size", "window_size", "pretrained_window_sizes", "drop_path_rate")
"""The run config's model keys that override the zoo model's encoder."""


def is_exported(path: str | Path) -> bool:
    """Whether `path` is a folder that `export` wrote."""
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def newest_checkpoint(source: str | Path) -> Path:
    """The newest checkpoint of a training run's folder; any other source as it is."""
    path = Path(source)
    if path.is_dir() and not is_sharded_checkpoint(path) and not is_exported(path):
        found = list_checkpoints(path)
        return found[-1] if found else path
    return path


def read_run(source: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, its contents) of the simmim training checkpoint `source` names: the newest one of a
    run folder, or a checkpoint file or sharded directory itself (without its model tensors); None for
    anything else."""
    path = newest_checkpoint(source)
    if not (path.is_file() or (path / STATE_FILE).is_file()):
        return None
    state = load_checkpoint_file(path / STATE_FILE if path.is_dir() else path)
    return (path, state) if isinstance(state, dict) and state.get("format") == FORMAT else None


def run_network(config: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """The model (random weights) of a run config given as plain data (a `TrainConfig.to_dict()` or a
    checkpoint's config): SimMIM for a pretraining run, a classifier of `num_classes` outputs else."""
    model, mask, runtime = config["model"], config.get("mask", {}), config.get("runtime", {})
    overrides = {k: model[k] for k in RUN_MODEL_KEYS if model.get(k) is not None}
    if runtime.get("activation_checkpointing"):
        overrides["use_checkpoint"] = True
    if model.get("fused") is False:
        overrides["fused"] = False
    if config.get("task", "pretrain") == "pretrain":
        head = {"mask_patch_size": mask.get("patch_size"), "mask_ratio": mask.get("ratio"),
                "decoder": model.get("decoder"), "loss": model.get("loss")}
        overrides.update({k: v for k, v in head.items() if v is not None})
        if model.get("norm_target") is not None:
            overrides["norm_target_window"] = model.get("norm_target_patch_size", 47) if model["norm_target"] else 0
    else:
        overrides["num_classes"] = num_classes
    return build_model(get_spec(model["name"]), **overrides)


def load_run(source: str | Path) -> tuple[nn.Module, dict[str, Any]] | None:
    """The trained model of a run folder or training checkpoint (see `read_run`) and its run's config
    as plain data; None where `source` is not one."""
    found = read_run(source)
    if found is None:
        return None
    path, state = found
    config = state["config"]
    weights = consolidate(path) if path.is_dir() else state["model"]
    num_classes = weights["head.weight"].shape[0] if config["task"] == "finetune" else None
    model = run_network(config, num_classes)
    model.load_state_dict(weights)
    if state.get("task", {}).get("classes"):
        model.classes = list(state["task"]["classes"])
    return model, config


def size_label(arch: str, encoder: Mapping[str, Any]) -> str:
    """A short name of an encoder's size: 'swin-micro', 'swinv2-base', else its sizes."""
    if arch in ("swin", "swinv2"):
        for size, dims in SWINV2_SIZES.items():
            if all(list(encoder.get(k) or ()) == list(v) if isinstance(v, tuple) else encoder.get(k) == v
                   for k, v in dims.items()):
                return f"{arch}-{size}"
    dims = ", ".join(f"{k} {encoder[k]}" for k in SIZE_KEYS if encoder.get(k) is not None)
    return f"{arch} ({dims})"


def _sizes(encoder: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list | tuple) else v for k, v in encoder.items() if k in SIZE_KEYS}


@dataclass(frozen=True)
class Architecture:
    """What a self-describing source says it is."""

    name: str | None
    """Its zoo model (None for an exported model outside the zoo)."""
    task: str
    """'pretrain' or 'classification'."""
    arch: str
    encoder: dict
    """Its encoder's config fields."""
    settings: dict
    """The run config's `model` keys that rebuild it (name, img_size, window_size, ...)."""

    @property
    def label(self) -> str:
        return size_label(self.arch, self.encoder)

    def counterpart(self, task: str) -> ModelSpec | None:
        """The zoo model of `task` with this encoder's sizes (its own one for its task), preferring one
        with a training recipe and this resolution."""
        if self.name and get_spec(self.name).task == task:
            return get_spec(self.name)
        same = [s for s in SPECS if s.task == task and s.arch == self.arch and
                _sizes(dataclasses.asdict(encoder_config(s))) == _sizes(self.encoder)]
        return max(same, key=lambda s: (s.recipe is not None, s.img_size == self.encoder.get("img_size")), default=None)

    def describe(self) -> str:
        return f"a {self.label} model ({self.name or 'outside the zoo'})"


def architecture_of(source: str | Path) -> Architecture | None:
    """The architecture an exported folder, a run folder or a training checkpoint names; None for
    sources that do not carry one (published files of the official, mmpretrain, HF or timm layout)."""
    path = Path(source)
    if is_exported(path):
        config = json.loads((path / CONFIG_FILE).read_text())
        settings = {"name": config["name"]} if config.get("name") else {}
        if config.get("name"):
            spec_encoder = get_spec(config["name"]).encoder
            settings.update({k: config["encoder"][k] for k in RUN_MODEL_KEYS
                             if k in config["encoder"] and config["encoder"][k] != spec_encoder.get(k)})
        return Architecture(config.get("name"), config["task"], config["arch"], config["encoder"], settings)
    found = read_run(path)
    if found is None:
        return None
    model = found[1]["config"]["model"]
    spec = get_spec(model["name"])
    settings = {"name": spec.name, **{k: model[k] for k in RUN_MODEL_KEYS if model.get(k) is not None}}
    encoder = encoder_config(spec, **{k: v for k, v in settings.items() if k != "name"})
    return Architecture(spec.name, spec.task, spec.arch, dataclasses.asdict(encoder), settings)


def check_fits(source: str | Path, model: nn.Module, model_name: str, remedy: str) -> None:
    """Refuses, in one line, to load `source` into `model` (zoo name `model_name`) when the source names
    an encoder of other sizes; `remedy` may use {name}, the zoo model of the model's task that fits."""
    found = architecture_of(source)
    cfg = model.encoder.cfg
    mine = dataclasses.asdict(cfg)
    if found is None or (found.arch == arch_of(cfg) and _sizes(found.encoder) == _sizes(mine)):
        return
    task = "pretrain" if hasattr(model, "mask_generator") else "classification"
    fit = found.counterpart(task)
    raise UsageError(f"{source} is {found.describe()}; {model_name} is a {size_label(arch_of(cfg), mine)} model: "
                     + remedy.format(name=fit.name if fit else f"a {task} model of its sizes"))
