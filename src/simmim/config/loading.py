"""Resolving a run's config: a preset or a checkpoint's config, then a YAML file, then dotted
`key=value` overrides from the command line."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from .recipes import preset
from .schema import TASKS, ScheduleConfig, TrainConfig, all_keys, ignored_keys, key_task, unknown_key
from .values import convert, merge


def parse_override(text: str) -> dict[str, Any]:
    """'optim.lr=1e-4' -> {'optim': {'lr': '1e-4'}}; the value is converted when the config is built."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    if key not in all_keys():
        sections = {k.split(".")[0] for k in all_keys() if "." in k}
        if key in sections:
            raise UsageError(f"--set {key}: {key!r} is a section; set one of its keys, e.g. {key}.<name>=VALUE")
        raise unknown_key(key)
    *path, leaf = key.split(".")
    out: dict[str, Any] = {leaf: value}
    for part in reversed(path):
        out = {part: out}
    return out


def _dotted(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        keys += _dotted(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [prefix + str(key)]
    return keys


def task_overrides(overrides: Iterable[str], task: str) -> list[str]:
    """The `key=value` overrides that a run of `task` reads (for overrides given to several runs at once,
    as `simmim demo --set` does)."""
    return [text for text in overrides if key_task(text.partition("=")[0].strip()) in (None, task)]


def _fit_warmup(data: dict[str, Any], recipe: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """Shortens the recipe's warm-up with a run whose epochs the user shortened below it without setting
    the warm-up, keeping its share of the schedule (said in one line)."""
    mine, schedule = explicit.get("schedule", {}), recipe.get("schedule", {})
    if "epochs" not in mine or "warmup_epochs" in mine:
        return data
    defaults = ScheduleConfig()
    epochs = convert(mine["epochs"], int, "schedule.epochs")
    before = convert(schedule.get("epochs", defaults.epochs), int, "schedule.epochs")
    warmup = convert(schedule.get("warmup_epochs", defaults.warmup_epochs), float, "schedule.warmup_epochs")
    if not 0 < epochs < warmup:
        return data
    shorter = round(warmup * epochs / before, 4)
    print(f"note: schedule.warmup_epochs {warmup:g} -> {shorter:g}: the recipe's warm-up share of {before} epochs "
          f"kept for {epochs} (set schedule.warmup_epochs to choose)", file=sys.stderr)
    return merge(data, {"schedule": {"warmup_epochs": shorter}})


def load_config(preset_name: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolves a config: `base` (e.g. a checkpoint's config) or the preset, then the YAML file (which
    may name its own `preset`), then dotted `key=value` overrides. A key of the file or the overrides
    that the run's task does not read is refused by name; a warm-up longer than epochs shortened there
    is shortened with them (`_fit_warmup`)."""
    data: dict[str, Any] = dict(base or {})
    file_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            file_data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(file_data, dict):
            raise UsageError(f"{path}: expected a mapping of config keys, got {type(file_data).__name__}")
    name = preset_name or file_data.get("preset")
    if name:
        data = merge(data, preset(name))
    recipe = data
    explicit = dict(file_data)
    for text in overrides:
        explicit = merge(explicit, parse_override(text))
    data = merge(data, explicit)
    if preset_name:
        data["preset"] = preset_name
    if not explicit.get("checkpoint", {}).get("resume"):  # a resumed run keeps its schedule (resuming names a change)
        data = _fit_warmup(data, recipe, explicit)
    cfg = TrainConfig.from_dict(data)
    ignored = ignored_keys(cfg, [k for k in _dotted(explicit) if k in all_keys()])
    if ignored:
        other = next(t for t in TASKS if t != cfg.task)
        words = {"pretrain": "pretraining", "finetune": "fine-tuning"}
        them = "them" if len(ignored) > 1 else "it"
        raise UsageError(f"{', '.join(ignored)}: read by {words[other]} runs only; this {words[cfg.task]} run "
                         f"would ignore {them} (remove {them}, or run `simmim {other}`)")
    return cfg
