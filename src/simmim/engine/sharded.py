"""Sharded checkpoints: every rank writes its own shards of the model and optimizer with
torch.distributed.checkpoint (DCP), so no process ever holds the full state of a billion-parameter run.

    RUN_DIR/ckpt-<step>/
        .metadata, __<rank>_0.distcp   model and optimizer (DCP), keyed by parameter name
        state.pt                       position, counters, every rank's RNG, config (rank 0, written last)

DCP reshards on load, so a checkpoint written by N processes (FSDP2, DDP or one process) resumes at
any world size; `checkpoint.dcp.consolidate` reads one into a full state dict without a process group.
A save goes to RUN_DIR/.ckpt-<step>.tmp (fsynced file by file), and rank 0 renames the directory to
its final name only after state.pt is in it: a save cut short leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.dcp import single_process_allowed
from ..fsutil import fsync_directory
from . import checkpointing
from .distributed import DistEnv, barrier


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the model and optimizer state (plain tensors in a single process),
    keyed by parameter name; for loading, the templates DCP fills in place."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path, env: DistEnv) -> None:
    """Writes a sharded checkpoint at `path` (collective: every rank writes its shards; `state`, the
    non-tensor rest, is rank 0's)."""
    tmp = temporary_path(path)
    if env.is_main:  # what a killed save left behind
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    with single_process_allowed():
        dcp.save(tensors(model, optimizer), storage_writer=FileSystemWriter(tmp, sync_files=True))
    if env.is_main:
        checkpointing.save(state, tmp / checkpointing.STATE_FILE)
        fsync_directory(tmp)
        replace_directory(tmp, path)
    barrier(env)


def replace_directory(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`; an existing `dst` (the same step saved again) is moved aside first."""
    old = dst.with_name(f".{dst.name}.old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads the model and optimizer of a sharded checkpoint, resharded to this run's layout
    (collective under a process group)."""
    state = tensors(model, optimizer)
    with single_process_allowed():
        dcp.load(state, storage_reader=FileSystemReader(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
