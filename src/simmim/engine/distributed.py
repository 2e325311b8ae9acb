"""Processes and devices: one code path for a plain process and for torchrun.

    simmim pretrain --preset nano-pretrain                                              # 1 process
    torchrun --nproc_per_node 8 -m simmim.cli pretrain --preset swin-base-pretrain-100e --data DIR
    torchrun --nnodes 2 --node_rank R --master_addr HOST --master_port 29500 --nproc_per_node 8 \\
        -m simmim.cli pretrain --preset swin-base-pretrain-100e --data DIR              # 2 nodes x 8 GPUs

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE; a plain process is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among `world_size` processes and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    owns_group: bool = False
    """Whether `setup` created the process group (then `teardown` destroys it; a caller's group stays)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's GPU if there is one, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"runtime.device: {preference!r} requested but no CUDA device is available")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistEnv:
    """Reads the torchrun environment and joins the process group (NCCL on GPU, gloo on CPU), or takes
    rank and world size from the group the caller already made."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    joined = dist.is_available() and dist.is_initialized()
    if joined:  # e.g. torch.multiprocessing.spawn, which need not set RANK / WORLD_SIZE
        rank, world_size = dist.get_rank(), dist.get_world_size()
    env = DistEnv(rank, world_size, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                  pick_device(device, local_rank), owns_group=world_size > 1 and not joined)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.owns_group:
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=env.device if env.device.type == "cuda" else None)
    return env


def teardown(env: DistEnv) -> None:
    """Leaves the process group `setup` created; one the caller made stays theirs."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, in place (identity for one process)."""
    if env.distributed:
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, indexed by rank (picklable plain data only)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
