"""What a run reports, from rank 0 only: plain progress lines (no carriage returns, so logs stay
readable), metrics.jsonl (one JSON object per record) and TensorBoard scalars."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05'."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """Prints and records metrics on the main process; a silent no-op on the others."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.run_dir, self.enabled, self.tensorboard = Path(run_dir), enabled, tensorboard
        self.writer = None  # created with the first record: nothing is written before the run starts

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def record(self, kind: str, step: int, **values: Any) -> None:
        """Appends {"kind", "step", "time", **values} to metrics.jsonl; numbers also go to TensorBoard
        as '<kind>/<name>'."""
        if not self.enabled:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path, kind: str) -> list[dict[str, Any]]:
    """Records of one kind from metrics.jsonl, one per step (a resumed run re-logs the steps after its
    checkpoint; the later record wins), in step order."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == kind:
            by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


class Progress:
    """Throughput and ETA from wall time between progress lines; time spent outside training steps
    (evaluation, checkpoints) is left out of the throughput, not of the ETA."""

    def __init__(self, total_steps: int, images_per_step: int, done_steps: int = 0):
        self.total, self.images_per_step = total_steps, images_per_step
        self.start_steps, self.start_time = done_steps, time.perf_counter()
        self.last_steps, self.last_time = done_steps, self.start_time
        self.excluded = self.excluded_since_tick = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Work inside is not training: its time does not count against images/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.excluded += spent
            self.excluded_since_tick += spent

    def tick(self, steps: int) -> tuple[float, float]:
        """-> (images/s since the previous tick, seconds left at the run's average pace)."""
        now = time.perf_counter()
        training = now - self.last_time - self.excluded_since_tick
        rate = (steps - self.last_steps) * self.images_per_step / max(training, 1e-9)
        per_step = (now - self.start_time) / max(steps - self.start_steps, 1)
        self.last_steps, self.last_time, self.excluded_since_tick = steps, now, 0.0
        return rate, per_step * (self.total - steps)

    def images_per_second(self, steps: int) -> float:
        """Average training throughput of this process's run so far."""
        elapsed = time.perf_counter() - self.start_time - self.excluded
        return (steps - self.start_steps) * self.images_per_step / max(elapsed, 1e-9)
