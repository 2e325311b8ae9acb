"""Sharded checkpoints: every rank writes its own shards of the model and optimizer with
torch.distributed.checkpoint (DCP), so no process ever holds the full state of a billion-parameter run.

    RUN_DIR/ckpt-<step>/
        .metadata, __<rank>_0.distcp   model and optimizer (DCP), keyed by parameter name
        state.pt                       position, counters, every rank's RNG, config (rank 0, written last)

DCP reshards on load, so a checkpoint written by N processes (FSDP2, DDP or one process) resumes at
any world size; `consolidate` reads one into a full state dict in one process, without a process group.
A save goes to RUN_DIR/.ckpt-<step>.tmp (fsynced file by file), and rank 0 renames the directory to
its final name only after state.pt is in it: a save cut short leaves the previous checkpoints as they were.
DCP is imported on first use: loading weights (`transfer.py`) is on the commands' start-up path, DCP is
slow to import.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..fsutil import fsync_directory
from .io import atomic_save

METADATA = ".metadata"
STATE_FILE = "state.pt"
"""The non-tensor part of a sharded checkpoint, written last: a directory without it is incomplete."""


@contextmanager
def single_process_allowed() -> Iterator[None]:
    """Silences DCP's warning that it reads or writes in one process: without a process group, that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a DCP checkpoint directory."""
    return (Path(path) / METADATA).is_file()


def consolidate(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in this process alone (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint: no {METADATA} (a torch.distributed.checkpoint "
                                "directory written by a run with checkpoint.sharded)")
    reader = dcp.FileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in entries.items() if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    if not model:
        raise UsageError(f"{path}: the sharded checkpoint holds no model weights")
    with single_process_allowed():
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer state (plain tensors in a single process),
    keyed by parameter name; for loading, the templates DCP fills in place."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def wait_for_all_ranks() -> None:
    """A barrier over the default process group, the one DCP's collectives use (none without one)."""
    if dist.is_initialized():
        dist.barrier()


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path,
                 is_main: bool) -> None:
    """Writes a sharded checkpoint at `path` (collective: every rank writes its shards; `state`, the
    non-tensor rest, is rank 0's, written by the process with `is_main`)."""
    import torch.distributed.checkpoint as dcp

    tmp = temporary_path(path)
    if is_main:  # what a killed save left behind
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    wait_for_all_ranks()
    with single_process_allowed():
        dcp.save(tensors(model, optimizer), storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if is_main:
        atomic_save(state, tmp / STATE_FILE)
        fsync_directory(tmp)
        replace_directory(tmp, path)
    wait_for_all_ranks()


def replace_directory(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`; an existing `dst` (the same step saved again) is moved aside first."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads the model and optimizer of a sharded checkpoint, resharded to this run's layout
    (collective under a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = tensors(model, optimizer)
    with single_process_allowed():
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
