"""Training checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint holds the model and optimizer (full, unsharded state dicts keyed by parameter name, so
DDP, FSDP2 and single-process runs read each other's files), the grad scaler, the position (epoch,
next micro-batch, optimizer step), every rank's RNG states (torch, CUDA, numpy, python), counters
and the resolved config, all as plain data that weights-only loading accepts. Files are written
atomically (`checkpoint.io.atomic_save`): a process killed while saving leaves the previous files.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.io import atomic_save, load_checkpoint_file

FORMAT = "simmim-train-v1"
NAME = re.compile(r"^ckpt-(\d+)\.pt$")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (temporary files of interrupted saves are not matched)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in run_dir.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resume_path(resume: str | None, run_dir: str | Path) -> Path | None:
    """'auto' -> the newest checkpoint of the run folder (None if there is none); a path -> that file."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    return path


def capture_rng() -> dict[str, Any]:
    """This process's random states as tensors and tuples (no numpy objects: weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of the pure (possibly FSDP2-sharded) model; collective under FSDP."""
    return get_model_state_dict(model, options=FULL)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter name; collective under FSDP."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save(state: dict[str, Any], run_dir: str | Path, step: int, keep: int) -> Path:
    """Writes `state` atomically as ckpt-<step>.pt and then deletes all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    atomic_save({"format": FORMAT, **state}, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded weights-only; other files are refused with a one-line error."""
    state = load_checkpoint_file(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a simmim training checkpoint (no {FORMAT!r} format tag)")
    return state
