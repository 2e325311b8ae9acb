"""Everything that wraps the pure nn.Module for training: device placement, mixed precision,
torch.compile, DDP or FSDP2, and gradient-sync control for accumulation. The models themselves know
none of it (activation checkpointing is the encoder's own `use_checkpoint` switch)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..hardware import auto_precision
from .distributed import DistEnv

# the models' buffers are index tables, equal on every rank: no broadcast before each forward
# (torch 2.14 renamed DDP's broadcast_buffers to forward_sync_buffers)
BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPU and on CPUs with native bf16 matrix units (AMX-BF16, AVX512-BF16), fp32 on
    other CPUs (`hardware.auto_precision` says why)."""
    return auto_precision(device)[0] if precision == "auto" else precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context for 'fp32' (none), 'bf16' or 'fp16'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device, sharded: bool) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 only; bf16 has fp32's range and needs none."""
    if precision != "fp16":
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks (children of every ModuleList named `blocks`), FSDP2's sharding units."""
    return [block for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "blocks" for block in module]


def shard(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """Applies FSDP2 in place: each block a sharding unit, then the root (the embeddings, norms and
    decoder). In bf16 the parameters are gathered in bf16 (half the traffic and memory of the
    unsharded blocks) while the sharded parameters, hence the optimizer, stay fp32 and gradients are
    reduced in fp32. Every block frees its gathered parameters after its forward except the last,
    whose backward comes next (FSDP2 keeps the root's for the same reason)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model


def parallelize(model: nn.Module, env: DistEnv, parallel: str = "ddp", compile: bool = False,
                precision: str = "fp32") -> nn.Module:
    """Moves `model` to the device and returns the module to train: compiled if asked, then replicated
    (DDP) or sharded (FSDP2, `shard`) across processes. `model` itself stays the module whose
    state_dict is saved (FSDP2 shards it in place)."""
    model.to(env.device)
    if parallel == "fsdp" and env.distributed:
        shard(model, precision)
        return torch.compile(model) if compile else model
    wrapped = torch.compile(model) if compile else model
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids, **{BUFFER_SYNC: False})
    return wrapped


def unwrap_ddp(wrapped: nn.Module) -> nn.Module:
    """The module DDP wraps (evaluation needs no gradient hooks); others are returned as they are."""
    return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skips the gradient all-reduce on accumulation micro-steps that do not end in an optimizer step."""
    if isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
        return
    sharded = getattr(wrapped, "_orig_mod", wrapped)
    if hasattr(sharded, "set_requires_gradient_sync"):  # an FSDP2 module
        sharded.set_requires_gradient_sync(enabled)
    yield
