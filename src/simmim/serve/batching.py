"""Requests that arrive together go through the model as one batch."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError


@dataclass
class _Job:
    item: Any
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Batcher:
    """Collects items submitted from many threads for up to `window_s` after the first one (at most
    `max_batch`), calls `run(items) -> results` once on one worker thread and hands each caller its
    result (or the exception `run` raised). `batch_sizes` records every call's size."""

    def __init__(self, run: Callable[[list], list], window_s: float = 0.005, max_batch: int = 16):
        if max_batch < 1 or window_s < 0:
            raise UsageError(f"max_batch={max_batch}, window_s={window_s}: expected >= 1 and >= 0")
        self.run, self.window_s, self.max_batch = run, window_s, max_batch
        self.batch_sizes: list[int] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="simmim-batcher", daemon=True)
        self._worker.start()

    def submit(self, item: Any) -> Any:
        """The result of `run` for `item`, computed in a batch with whatever arrived alongside it."""
        job = _Job(item)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join()

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            jobs, deadline = [first], time.monotonic() + self.window_s
            stop = False
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[_Job]) -> None:
        self.batch_sizes.append(len(jobs))
        try:
            results = self.run([job.item for job in jobs])
        except Exception as err:  # every caller of this batch gets the error; the worker lives on
            for job in jobs:
                job.error = err
        else:
            for job, result in zip(jobs, results, strict=True):
                job.result = result
        for job in jobs:
            job.done.set()
