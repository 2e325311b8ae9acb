"""torch.distributed.checkpoint (DCP) directories read in one process, without a process group: the
sharded checkpoints of training runs (`engine/sharded.py` writes them) as one full model state dict."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

METADATA = ".metadata"


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
    # imported here: checkpoint loading is on the commands' start-up path, DCP is slow to import
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
        raise ValueError(f"{path}: the sharded checkpoint holds no model weights")
    with single_process_allowed():
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
