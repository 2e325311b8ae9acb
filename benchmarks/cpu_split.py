"""Throughput of the demo's training runs per split of the CPU between compute threads and loader
workers: `simmim pretrain`/`finetune` with the demo's presets, one process per setting, the settings
alternated round after round so that a load that comes and goes on a shared machine spreads over all
of them. Prints a markdown table of img/s (median of each run's progress records after the first).

    python benchmarks/cpu_split.py --task pretrain --images 12800 --rounds 2
    python benchmarks/cpu_split.py --task finetune --epochs 12 --rounds 2 --settings 1x1,2x0,2x1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = {"pretrain": "fashion-mnist-pretrain", "finetune": "fashion-mnist-finetune"}


def run_once(task: str, threads: int | None, workers: int | None, images: int | None, epochs: int, work: Path
             ) -> tuple[float, str]:
    """img/s of one run (None: the run chooses), the median of its progress records after the first
    (which holds the start-up), and the header line saying how it split the cores."""
    out = work / f"{task}-{threads}x{workers}"
    sets = [f"runtime.threads={threads}", f"data.num_workers={workers}"] if threads is not None else []
    sets += ["runtime.log_every=5",
            "runtime.tensorboard=false", "runtime.vis_every=0", f"schedule.warmup_epochs={min(1, epochs - 1)}"]
    sets += [f"data.max_images={images}"] if images else []
    sets += ["data.heldout_images=0"] if task == "pretrain" else ["runtime.eval_every=1000"]
    cmd = [sys.executable, "-m", "simmim.cli", task, "--preset", PRESETS[task], "--data", "fashion-mnist",
           "--out", str(out), "--overwrite", "--epochs", str(epochs)]
    for s in sets:
        cmd += ["--set", s]
    printed = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["img_per_s"] for r in records if r["kind"] == "train"][1:]
    return statistics.median(rates), next((line for line in printed.splitlines() if line.startswith("cores: ")), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(PRESETS), default="pretrain")
    parser.add_argument("--images", type=int, help="data.max_images (default: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="1x0,1x1,1x2,2x0,2x1,2x2",
                        help="THREADSxWORKERS,... ('auto': the run chooses both)")
    args = parser.parse_args()
    settings = [(None, None) if s == "auto" else tuple(map(int, s.split("x"))) for s in args.settings.split(",")]
    rates: dict[tuple, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as work:
        for i in range(args.rounds):
            for threads, workers in settings if i % 2 == 0 else settings[::-1]:
                rate, split = run_once(args.task, threads, workers, args.images, args.epochs, Path(work))
                rates[threads, workers].append(rate)
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
                print(f"round {i + 1}: {threads} threads, {workers} workers: {rate:.1f} img/s "
                      f"(load average {load:.1f} after it) {split}", flush=True)
    print(f"\n| threads | loader workers | {args.task} img/s per run | median |\n|---|---|---|---|")
    for (threads, workers), values in rates.items():
        print(f"| {threads or 'auto'} | {workers if workers is not None else 'auto'} | "
              f"{', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
