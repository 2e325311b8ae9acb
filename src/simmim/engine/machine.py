"""What a run decides about the machine at its start, once: how a CPU process splits its cores between
compute threads and loader workers (from the measured loading and step rates), and which kernels the
fused layers compute with. Under torchrun rank 0 measures and calibrates, and every rank takes its
choice, so that all ranks run alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..config import RuntimeConfig
from ..data.datasets import cpus_per_rank, seeded
from ..models import kernels
from .distributed import DistEnv, broadcast_object
from .parallelize import autocast

PROBE_IMAGES = 32
"""Images of the timed step: enough for its per-image rate to be the run's, few enough to take a
fraction of the start-up of a large model."""


class CoreSplit(NamedTuple):
    """Intra-op threads and loader workers of one CPU process, and why (for the run's header)."""

    threads: int
    workers: int
    why: str

    def counts(self) -> str:
        return (f"{self.threads} thread{'s' if self.threads > 1 else ''}, {self.workers} loader "
                f"worker{'s' if self.workers != 1 else ''}")

    def describe(self) -> str:
        return f"{self.counts()} ({self.why})"


def expected_rate(cores: int, threads: int, workers: int, load_rate: float, step_rate: float) -> float:
    """Images/s of a process computing on `threads` threads at `step_rate` beside `workers` loader
    workers that each load `load_rate` images/s on a core. Loading that fits on the cores the threads
    leave free runs beside the step; the share of it that runs on the threads' cores stalls the step,
    since the OpenMP thread it preempts holds up every GEMM (so it adds its time to the step's), and
    without workers the process loads between steps."""
    if workers == 0:
        return 1 / (1 / step_rate + 1 / load_rate)
    shared = max(0, workers - (cores - threads)) / workers
    return min(workers * load_rate, 1 / (1 / step_rate + shared / load_rate))


def split_cores(cores: int, load_rate: float | None, step_rates: Mapping[int, float] | None,
                threads: int | None = None, workers: int | None = None) -> CoreSplit:
    """Threads and workers for `cores` cores, where one process loads `load_rate` images/s and the step
    consumes `step_rates[t]` images/s computing on t threads (None: not measured): the split whose
    `expected_rate` is the highest, among the measured thread counts and every count that leaves cores
    to up to 8 workers (its step rate scaled from the nearest larger measured count), with 1 to 8
    workers (none on one core). A given `threads` or `workers` is kept, the other chosen around it."""
    if threads is not None and workers is not None:
        return CoreSplit(threads, workers, "runtime.threads and data.num_workers as set")
    if load_rate is None or not step_rates:  # no rates: a worker per core but one, the rest computes
        workers = max(0, min(8, cores - 1)) if workers is None else workers
        return CoreSplit(threads or max(1, cores - workers), workers, "rates not measured")

    def step_rate(t: int) -> float:
        measured = min((m for m in step_rates if m >= t), default=max(step_rates))
        return step_rates[measured] * min(1.0, t / measured)

    leaving_cores = (cores - w for w in range(1, min(8, cores - 1) + 1))
    thread_counts = [threads] if threads else sorted({*step_rates, *leaving_cores})
    worker_counts = [workers] if workers is not None else [0] if cores == 1 else range(1, 9)
    # ties go to more threads and fewer workers (past what loading needs, more workers add nothing)
    rate, threads, workers = max(((expected_rate(cores, t, w, load_rate, step_rate(t)), t, w)
                                  for t in thread_counts for w in worker_counts), key=lambda c: (c[0], c[1], -c[2]))
    steps = ", ".join(f"{r:.0f} img/s on {t} thread{'s' * (t > 1)}" for t, r in sorted(step_rates.items()))
    return CoreSplit(threads, workers, f"{cores} core{'s' * (cores > 1)}; step {steps}; loading {load_rate:.0f} "
                                       f"img/s per process; expected {rate:.0f} img/s with this split")


def measure_rates(dataset: Any, collate: Callable[[list], Any], count: int, step: Callable[[Any], None],
                  thread_counts: Sequence[int], budget_s: float = 1.0) -> tuple[float, dict[int, float]]:
    """(images/s that this process loads, {threads: images/s that `step` consumes on that many}) on up
    to `count` samples of `dataset` (loaded for at most `budget_s`, keyed (index, seed) as the samplers
    key them) and up to PROBE_IMAGES of them: after a warm-up step (allocator, oneDNN primitives), the
    best of two steps per thread count (one where the warm-up took longer than `budget_s`). Every random
    stream is left as it was; the thread count is the caller's to set after."""
    with seeded(0):  # transforms, dropout, drop path and Mixup draw here as in a run; its streams are restored
        samples, start = [], time.perf_counter()
        while len(samples) < min(count, len(dataset)) and (len(samples) < 2 or time.perf_counter() - start < budget_s):
            samples.append(dataset[(len(samples), len(samples))])
        collate(samples)
        load_rate = len(samples) / (time.perf_counter() - start)
        size = min(len(samples), PROBE_IMAGES)
        size -= size % 2 if size > 1 else 0  # Mixup pairs the images of a batch
        probe = collate(samples[:size])
        torch.set_num_threads(thread_counts[0])
        repeats = 1 if _timed(step, probe) > budget_s else 2
        rates = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            rates[threads] = size / min(_timed(step, probe) for _ in range(repeats))
    return load_rate, rates


def _timed(step: Callable[[Any], None], batch: Any) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def choose_split(env: DistEnv, threads: int | None, workers: int | None,
                 measure: Callable[[Sequence[int]], tuple[float, dict[int, float]]]) -> CoreSplit | None:
    """The core split of a CPU run (None on a GPU, whose loaders keep their defaults), set as this
    process's thread count: rank 0 measures (`measure(thread counts)`: `threads`, else every core and
    one less) unless both are given, and every rank takes its split."""
    if env.device.type != "cpu":
        return None
    split = None
    if env.is_main:
        cores = cpus_per_rank(env.local_world_size)
        rates: tuple[float | None, dict[int, float] | None] = (None, None)
        if threads is None or workers is None:
            rates = measure([threads] if threads else sorted({cores, max(1, cores - 1)}, reverse=True))
        split = split_cores(cores, *rates, threads=threads, workers=workers)
    split = broadcast_object(split, env)
    torch.set_num_threads(split.threads)
    return split


def decide_kernels(runtime: RuntimeConfig, env: DistEnv) -> kernels.Kernels:
    """The kernels of this run from runtime.gemm_route / runtime.recompute and their environment
    variables, rank 0's on every rank (it calibrates an 'auto' route at its thread count, others wait)."""
    choice = kernels.resolve(runtime.gemm_route, runtime.recompute, env.device.type == "cpu") if env.is_main else None
    return broadcast_object(choice, env)


def forward_step(model: torch.nn.Module, precision: str, device: torch.device) -> Callable[[Any], None]:
    """A step to time for inference: the forward of a batch's images, without gradients."""

    def step(batch: Any) -> None:
        with torch.no_grad(), autocast(precision, device):
            model(batch[0].to(device))

    return step


def inference_split(env: DistEnv, dataset: Any, collate: Callable[[list], Any], batch_size: int,
                    model: torch.nn.Module, precision: str, threads: int | None = None,
                    workers: int | None = None) -> CoreSplit | None:
    """`choose_split` for a pass of `model` in eval mode over `dataset` (evaluation, probe features)."""
    was_training = model.training
    model.eval()
    step = forward_step(model, precision, env.device)
    try:
        return choose_split(env, threads, workers,
                            lambda counts: measure_rates(dataset, collate, batch_size, step, counts))
    finally:
        model.train(was_training)


def loss_step(loss: Callable[[Any], torch.Tensor], parameters: Sequence[torch.nn.Parameter]) -> Callable[[Any], None]:
    """A step to time: forward and backward of `loss` on a batch, the gradients dropped after."""

    def step(batch: Any) -> None:
        loss(batch).backward()
        for p in parameters:
            p.grad = None

    return step
