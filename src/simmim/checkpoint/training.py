"""Training checkpoints: everything needed to continue exactly where a run stopped.

A checkpoint holds the model and optimizer, the grad scaler, the position (epoch, next micro-batch,
optimizer step), every rank's RNG states (torch, CUDA, numpy, python), counters and the resolved
config, all as plain data that weights-only loading accepts. It is either one file `ckpt-<step>.pt`
with full, unsharded state dicts keyed by parameter name, or a directory `ckpt-<step>/` in which every
rank wrote its shards with torch.distributed.checkpoint (`sharded.py`) beside `state.pt`, the rest.
Either kind is read by DDP, FSDP2 and single-process runs of any world size, and written atomically:
a process killed while saving leaves the previous checkpoints, and no partial one under a final name.
A run resumes from the newest complete one in its folder (`resume_path`); there is no pointer file to update.
"""

from __future__ import annotations

import os
import random
import re
import shutil
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

from ..errors import UsageError
from .io import atomic_save, load_checkpoint_file
from .sharded import STATE_FILE, load_sharded, save_sharded

FORMAT = "simmim-train-v1"
NAME = re.compile(r"^ckpt-(\d+)(\.pt)?$")
TEMPORARY = re.compile(r"^\.ckpt-\d+.*\.(tmp|deleting)$")
"""Names of a save or a deletion in progress (or cut short)."""
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    """RUN_DIR/ckpt-<step>.pt, or the directory RUN_DIR/ckpt-<step> of a sharded checkpoint."""
    return Path(run_dir) / f"ckpt-{step:08d}{'' if sharded else '.pt'}"


def is_complete(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint directory whose save finished."""
    return path.is_file() or (path / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (files and directories), oldest first; the temporary names of
    interrupted saves are not matched."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m[1]), p.name, p) for p in run_dir.iterdir() if (m := NAME.match(p.name)) and is_complete(p)]
    return [p for *_, p in sorted(found)]


def resume_path(resume: str | None, run_dir: str | Path) -> Path | None:
    """'auto' -> the newest checkpoint of the run folder (None if there is none); a path -> that
    file or sharded checkpoint directory."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    if not is_complete(path):
        raise UsageError(f"{path} is not a complete sharded checkpoint: no {STATE_FILE} (an interrupted save?)")
    return path


def resume_batch(state: dict[str, Any], batch_size: int, world_size: int, accumulation: int) -> int:
    """The next micro-batch of this run in the checkpoint's epoch. Checkpoints are taken at optimizer
    steps, so the samples consumed by all ranks together are a whole number of effective batches; with
    the same effective batch they are the same number of this run's micro-batches at any world size
    (the sampler's k-th micro-batches of all ranks are the k-th slice of the epoch's permutation)."""
    saved = state["config"]
    per_rank, world, steps = saved["data"]["batch_size"], state["world_size"], saved["optim"]["accumulation_steps"]
    before, now = per_rank * world * steps, batch_size * world_size * accumulation
    if before != now:
        hint = (f"; --batch-size {before // (world_size * accumulation)} keeps it"
                if before % (world_size * accumulation) == 0 else "")
        raise UsageError(f"checkpoint.resume: the checkpoint was trained with an effective batch of {before} "
                         f"({per_rank} per process x {world} x {steps} accumulation steps), this run has {now} "
                         f"({batch_size} x {world_size} x {accumulation}): resuming needs the same (it sets the "
                         f"learning rate, the schedule and the data order){hint}")
    return state["batch"] * per_rank * world // (batch_size * world_size)


RESUMABLE_KEYS = ("out_dir", "preset", "schedule.epochs", "data.batch_size", "data.num_workers",
                  "optim.accumulation_steps", "model.pretrained", "checkpoint.", "runtime.")
"""Config keys a resumed run may change: where and how it runs, more (or fewer) epochs, and the batch split
as long as the effective batch stays (`resume_batch` checks it). The rest (model, data, optimizer, mask,
augmentation, the seed) would continue one run under another's recipe."""
FIXED_KEYS = ("runtime.seed",)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return flat


def check_same_recipe(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuses to resume the checkpoint at `path` (config `saved`) under a config that changes its recipe,
    naming every changed key."""
    before, after = _flat(saved), _flat(now)
    changed = [key for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key) and
               (key in FIXED_KEYS or not key.startswith(RESUMABLE_KEYS))]
    if changed:
        diffs = "; ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in changed)
        raise UsageError(f"checkpoint.resume: {path} was trained with other settings ({diffs}); resume with its own "
                         "config (--resume auto --out RUN_DIR, without --preset/--config/--set for these keys) or "
                         "start a new run in another folder")


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


def prune(run_dir: str | Path, keep: int) -> None:
    """Deletes all but the newest `keep` checkpoints; a directory is first renamed out of resume's
    sight, so a deletion cut short never leaves a partial checkpoint under a final name."""
    for old in list_checkpoints(run_dir)[:-keep]:
        if old.is_dir():
            trash = old.with_name(f".{old.name}.deleting")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            shutil.rmtree(trash)
        else:
            old.unlink(missing_ok=True)


def load(path: str | Path) -> dict[str, Any]:
    """A training checkpoint, loaded weights-only (of a sharded one: all but the model and optimizer);
    other files are refused with a one-line error."""
    path = Path(path)
    state = load_checkpoint_file(path / STATE_FILE if path.is_dir() else path)
    if state.get("format") != FORMAT:
        raise UsageError(f"{path} is not a simmim training checkpoint (no {FORMAT!r} format tag)")
    return state


def write(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
          *, sharded: bool, keep: int, is_main: bool) -> Path:
    """Writes the checkpoint of optimizer step `step` into `run_dir`: the model, the optimizer and `state`
    (the run's position, counters, RNG and config), as one file or `sharded`; then deletes all but the
    newest `keep`. Collective: every rank takes part, the process with `is_main` writes the files."""
    path = checkpoint_path(run_dir, step, sharded)
    if sharded:
        save_sharded(model, optimizer, {"format": FORMAT, **state}, path, is_main)
    else:  # gathering the full state of an FSDP2 model is collective
        full = {"model": get_model_state_dict(model, options=FULL),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=FULL)}
        if is_main:
            atomic_save({"format": FORMAT, **full, **state}, path)
    if is_main:
        prune(run_dir, keep)
    return path


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
           world_size: int) -> tuple[dict[str, Any], int]:
    """Loads the checkpoint at `path` (of either kind, written at any world size) into `model` and
    `optimizer` (collective under a process group), once checked that a run of `config` (its TrainConfig
    as plain data) on `world_size` processes may continue it: the same recipe and effective batch.
    Returns the checkpoint's state and this run's next micro-batch in the checkpoint's epoch."""
    state = load(path)
    check_same_recipe(path, state["config"], config)
    batch = resume_batch(state, config["data"]["batch_size"], world_size, config["optim"]["accumulation_steps"])
    if path.is_dir():
        load_sharded(path, model, optimizer)
    else:
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    return state, batch
