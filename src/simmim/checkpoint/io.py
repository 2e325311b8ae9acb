"""Checkpoint file I/O: atomic saves, loads that never run code from the file, published-hash checks.

Loading goes through torch's weights-only unpickler, which builds only allowlisted types and refuses
every other global *before* calling it. On top of torch's defaults we allow:
- `yacs.config.CfgNode` (the `config` of every official microsoft/SimMIM checkpoint), mapped to a stub
  that builds plain dicts, so yacs is neither imported nor executed;
- numpy scalars and numeric dtypes (mmengine `meta` sometimes holds them): their reconstruction only
  copies raw bytes into a numeric value;
- `argparse.Namespace` (training args saved by many repos): rebuilt as `object.__new__` + `__dict__`
  update, which runs no code of the file's choosing.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import pickle
import re
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ..errors import UsageError
from ..fsutil import PathLike, atomic_write

# torch hub / mmpretrain naming: `<name>-<first hex digits of sha256>.<ext>`.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.(pth|pt|bin|safetensors)$")
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# Legacy (pre-zip) torch files and bare pickles start with the PROTO opcode and a protocol number.
_PICKLE_PROTOCOLS = range(2, 6)
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint asked for a type or function outside the allowlist; nothing from it was executed."""


class _CfgNodeStub(dict):
    """Stands in for `yacs.config.CfgNode`; `__new__` returns an OrderedDict that is recorded for conversion.

    torch's weights-only unpickler fills a dict only if its type is exactly dict/OrderedDict/Counter and
    applies pickled instance state (CfgNode's `__immutable__` flags etc.) only to allowlisted types,
    OrderedDict included, so a dict subclass cannot hold the node but an OrderedDict can.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict[str, Any]:  # type: ignore[misc]
        node: OrderedDict[str, Any] = OrderedDict()
        _loaded_cfg_nodes.nodes.append(node)
        return node


# Per thread, so that concurrent loads do not convert each other's nodes.
_loaded_cfg_nodes = threading.local()


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar and numeric-dtype reconstructors, under the names numpy 1.x and 2.x pickle them with."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2 keeps it under numpy.core
        from numpy.core.multiarray import scalar
    # Numeric and bool dtypes only: object/void dtypes are left out so no object payload is accepted.
    dtype_classes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


def _safe_globals() -> list[Any]:
    """Globals allowed on top of torch's weights-only defaults (see the module docstring)."""
    return [(_CfgNodeStub, "yacs.config.CfgNode"), argparse.Namespace, *_numpy_safe_globals()]


def atomic_save(obj: Any, path: PathLike) -> None:
    """torch.save `obj` to `path` atomically: readers see the old file or the whole new one, never a mix."""
    atomic_write(path, lambda writer: torch.save(obj, writer))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save `tensors` (and string `metadata`) as a safetensors file at `path` atomically."""
    atomic_write(path, lambda writer: writer.write(safetensors.torch.save(tensors, metadata=metadata)))


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors files start with a little-endian u64 header length followed by a JSON object."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_len <= size - 8


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, reporting a malformed one as not a checkpoint."""
    try:
        return safetensors.torch.load_file(path)
    except safetensors.SafetensorError as exc:
        raise UsageError(f"{path} is not a PyTorch/safetensors checkpoint ({exc})") from None


def _convert_cfg_nodes(obj: Any, nodes: set[int]) -> Any:
    """Replace the OrderedDicts that stood in for CfgNodes (ids in `nodes`) by plain dicts, in place."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _convert_cfg_nodes(value, nodes)
        return dict(obj) if id(obj) in nodes else obj
    if isinstance(obj, list):
        obj[:] = [_convert_cfg_nodes(item, nodes) for item in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(_convert_cfg_nodes(item, nodes) for item in obj)
    return obj


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True plus our allowlist, turning refusals into UnsafeCheckpointError."""
    _loaded_cfg_nodes.nodes = []
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch re-raises the unpickler's error with a long multi-line explanation; the original,
        # one-line reason is kept as the context.
        raw = str(exc.__context__ or exc)
        match = _GLOBAL_IN_MESSAGE.search(raw)
        if match:
            # torch shortens builtins ("builtins.exec" -> "exec"); name them in full.
            refused = match.group(1) if "." in match.group(1) else f"builtins.{match.group(1)}"
            raise UnsafeCheckpointError(
                f"{path}: refused to load global {refused!r} (not on the weights-only allowlist); "
                "it was not executed"
            ) from None
        reason = next((line.strip() for line in raw.splitlines() if line.strip()), "unknown reason")
        # Also what a corrupt legacy-format file gets: the unpickler cannot tell damage from intent.
        raise UnsafeCheckpointError(
            f"{path}: refused by the weights-only unpickler ({reason}): not a PyTorch/safetensors "
            "checkpoint, or one that needs code execution; nothing in it was executed"
        ) from None
    # What torch raises for damaged files: RuntimeError/OSError from its zip reader (a truncated archive
    # gives EINVAL), EOFError/struct.error from the legacy reader.
    except (RuntimeError, OSError, EOFError, struct.error) as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path} is not a PyTorch/safetensors checkpoint ({first_line})") from None
    finally:
        nodes = _loaded_cfg_nodes.nodes
        del _loaded_cfg_nodes.nodes
    return _convert_cfg_nodes(obj, {id(node) for node in nodes}) if nodes else obj


def load_checkpoint_file(path: PathLike) -> dict[str, Any]:
    """Load a .safetensors or torch checkpoint on the CPU without ever unpickling arbitrary objects."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", str(file))
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(16)
    if file.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        return _load_safetensors(file)
    is_pickle = len(head) >= 2 and head[0] == pickle.PROTO[0] and head[1] in _PICKLE_PROTOCOLS
    if not (head[:4] in _ZIP_MAGICS or is_pickle):
        raise UsageError(f"{file} is not a PyTorch/safetensors checkpoint (unrecognised file header)")
    obj = _torch_load(file)
    if not isinstance(obj, dict):
        raise UsageError(f"{file} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop leading `module.` (DDP) and `_orig_mod.` (torch.compile) from keys, in any order and number."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new_key = key
        while new_key.startswith(("module.", "_orig_mod.")):
            new_key = new_key.split(".", 1)[1]
        if new_key in out:
            raise UsageError(f"keys collide after stripping prefixes: {new_key!r} (from {key!r})")
        out[new_key] = value
    return out


def _sha256(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_in_name(name: str) -> str | None:
    """The sha256 prefix a published file name carries (`<name>-<hex>.<ext>`), None if it has none."""
    match = _HASH_IN_NAME.search(Path(name).name)
    return match.group(1) if match else None


def sha256_prefix_matches(path: PathLike, name: str) -> bool | None:
    """Whether the file's sha256 starts with the hash fragment in file name `name`; None if it has none."""
    prefix = hash_in_name(name)
    return None if prefix is None else _sha256(path).startswith(prefix)


def check_hash_in_name(path: PathLike, name: str | None = None) -> bool:
    """Verify the file against the hash in its name (or `name`); True if checked, False if no hash."""
    published = Path(name).name if name is not None else Path(path).name
    matches = sha256_prefix_matches(path, published)
    if matches is None:
        return False
    if not matches:
        expected = hash_in_name(published)
        raise UsageError(
            f"{path}: sha256 does not start with {expected!r} from its name {published!r}; "
            "the file is corrupt or not the published one"
        )
    return True
