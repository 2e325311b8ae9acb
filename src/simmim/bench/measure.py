"""Step times, peak memory and dense-GEMM rates, measured the same way for every side."""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from ..models.fused import matmul_nt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _system_seconds() -> float:
    # getrusage counts in microseconds where os.times() counts in clock ticks (10 ms)
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class Timings(NamedTuple):
    """Per side, the wall-clock seconds of each timed step and the system CPU seconds within it (the
    kernel's share: page faults, mostly; large where the machine's memory handling slows a step)."""

    wall: dict[str, list[float]]
    system: dict[str, list[float]]


def alternate(steps: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
              repeats: int = 5) -> Timings:
    """Times the steps in turn (A B A B ...) after `warmup` untimed rounds, so that whatever else
    the machine is doing slows every side alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    timings = Timings({name: [] for name in steps}, {name: [] for name in steps})
    for _ in range(repeats):
        for name, step in steps.items():
            system = _system_seconds()
            timings.wall[name].append(timed(step, device))
            timings.system[name].append(_system_seconds() - system)
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


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


GEMM_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
    "aten::mkldnn_convolution", "aten::convolution_backward",
})
"""The matrix products of a step on the CPU (a convolution's backward is its two products)."""


def gemm_seconds(step: Callable[[], object], device: torch.device) -> float | None:
    """Seconds one step spends inside matrix products on the CPU (their self time in the profiler);
    the rest of the step is elementwise work, data movement and overhead. None on other devices."""
    if device.type != "cpu":
        return None
    with cpu_profile() as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6


def gemm_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5,
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.matmul) -> float:
    """FLOP/s of a dense size x size x size product (2 size^3 FLOPs), best of `repeats`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    fn(a, b)
    best = min(timed(lambda: fn(a, b), device) for _ in range(repeats))
    return 2 * size**3 / best


def gemm_rates(device: torch.device, size: int) -> dict[str, float]:
    """The device's dense-GEMM FLOP/s in fp32 and bf16 through torch.matmul and, for fp32 on the
    CPU, through oneDNN as our linear layers run it (torch's own fp32 path on the CPU is MKL's sgemm)."""
    rates = {"fp32": gemm_rate(device, torch.float32, size), "bf16": gemm_rate(device, torch.bfloat16, size)}
    if device.type == "cpu":
        rates["fp32_onednn"] = gemm_rate(device, torch.float32, size, fn=matmul_nt)
    return rates
