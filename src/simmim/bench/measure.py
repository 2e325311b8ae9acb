"""Step times, peak memory and dense-GEMM rates, measured the same way for every side."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from ..measure import cpu_profile
from ..models.kernels import ONEDNN, matmul_nt

T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """fn's result and the wall-clock seconds of the call, the device's queue drained before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call, the device's queue drained before and after."""
    return timed_call(fn, device)[1]


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


GEMM_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise",
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
})
"""The matrix products of a step on the CPU (a convolution's backward is its two products; a convolution
oneDNN does not take runs as ATen's slow_conv2d, im2col and a GEMM)."""


def gemm_seconds(step: Callable[[], object], device: torch.device) -> tuple[float, float] | tuple[None, None]:
    """(seconds one step spends inside matrix products on the CPU (their self time in the profiler), the
    profiled step's own seconds): the rest of the step is elementwise work, data movement and overhead; the
    second, profiler overhead included, is what the first is a part of. (None, None) on other devices."""
    if device.type != "cpu":
        return None, None
    with cpu_profile() as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMM_OPS) / 1e6, seconds


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
    if device.type == "cpu" and ONEDNN:
        rates["fp32_onednn"] = gemm_rate(device, torch.float32, size, fn=lambda a, b: matmul_nt(a, b, route="onednn"))
    return rates
