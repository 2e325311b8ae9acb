"""What the benchmark and the planner measure alike: a training step as training runs it, the bytes a
step allocates at its peak, and the bytes a process holds between steps."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from .engine.parallelize import autocast


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: Callable[[], torch.Tensor],
                  precision: str, device: torch.device) -> Callable[[], float]:
    """One training step of `model` (or the module wrapping it): gradients freed, forward (`loss()`) under
    the training's autocast for `precision`, backward, optimizer step; returns the loss (before the update)."""
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            value = loss()
        value.backward()
        optimizer.step()
        return value.item()

    return step


def cpu_profile(**kwargs) -> profile:
    """torch's CPU profiler without kineto's lines on stderr: `USDT ... profiler_start/stop` at every
    use and, on a machine without a GPU, `ERROR: ... gpuGetDeviceCount failed`, which reads like a
    failure of the benchmark. Kineto reads KINETO_LOG_LEVEL when a profiler first starts; 6 is above
    its highest level (USDT, 5). A level the user set is kept."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return profile(activities=[ProfilerActivity.CPU], **kwargs)


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Bytes the step allocates on top of what was held before it (weights, optimizer state), at its peak.

    CUDA: the caching allocator's max_memory_allocated. CPU: the same quantity from the profiler's
    record of every CPU tensor allocation and free with the running total; unlike the process's RSS it
    does not depend on what the malloc keeps cached (jemalloc with decay off keeps every freed page)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with cpu_profile(profile_memory=True) as prof:
        step()
    allocations = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not allocations:
        return 0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]  # the running total just before the first event
    return max(total for _, _, total in allocations) - start


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *tensors: torch.Tensor) -> int:
    """Bytes of this process's parameters, buffers, optimizer state and `tensors` (its local shards of
    FSDP2's DTensors)."""
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    local = (t.to_local() if hasattr(t, "to_local") else t
             for t in [*model.parameters(), *model.buffers(), *state, *tensors])
    return sum(t.numel() * t.element_size() for t in local)
