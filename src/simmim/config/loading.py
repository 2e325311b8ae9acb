"""Resolving a run's config: a preset or a checkpoint's config, then a YAML file, then dotted
`key=value` overrides from the command line."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from .recipes import preset
from .schema import TrainConfig, all_keys, unknown_key
from .values import merge


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


def load_config(preset_name: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolves a config: `base` (e.g. a checkpoint's config) or the preset, then the YAML file (which
    may name its own `preset`), then dotted `key=value` overrides."""
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
    data = merge(data, file_data)
    if preset_name:
        data["preset"] = preset_name
    for text in overrides:
        data = merge(data, parse_override(text))
    return TrainConfig.from_dict(data)
