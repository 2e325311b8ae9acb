"""Plain data to typed config values: every YAML string, command-line string and Python value goes
through `convert`, so each error is one line naming the dotted key and what was expected."""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from typing import Any

from ..errors import UsageError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NONE = ("none", "null", "~", "")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (the configs use postponed annotations)."""
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a comma-separated list of " + {int: "integers", float: "numbers"}.get(typing.get_args(tp)[0], "values")
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "none"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (a Python value or a command-line/YAML string) as type `tp`, or a one-line error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = UsageError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE)):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner, key)
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removeprefix("(").removesuffix("]").removesuffix(")")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise UsageError(f"{key}: expected {len(args)} values, got {value!r}")
        return origin(convert(v, args[i] if fixed else args[0], key) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise fail
    if tp in (int, float):
        if isinstance(value, bool):
            raise fail
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise fail from None
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise fail
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def plain(obj: Any) -> Any:
    """Tuples as lists, recursively: data that YAML and weights-only loading accept."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict `base` updated by `update`, section by section."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
