"""Where a benchmark ran, and its results as JSON and as Markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from ..hardware import cpu_description
from ..models.fused import gemm_route
from ..runtime import allocator_description


def cpu_model() -> str:
    """The CPU's model name, family/model and the ISA flags that matter to its kernels (AVX-512, AMX...)."""
    return cpu_description()


def environment(device: torch.device) -> dict:
    """Date, machine, library versions and allocator of this run."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": cpus,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": hf_version,
        "allocator": allocator_description(),
        "gemm_route": gemm_route() if device.type == "cpu" else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown table lines; columns are (header, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], spec) if row.get(key) is not None else "-" for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COMPARISON = [
    ("model", "model", ""), ("px", "img_size", "d"), ("batch", "batch", "d"), ("precision", "precision", ""),
    ("ours s/step", "ours_step_s", ".3f"), ("HF s/step", "ref_step_s", ".3f"), ("speedup HF/ours", "speedup", ".2f"),
    ("ours img/s", "ours_images_per_s", ".1f"), ("HF img/s", "ref_images_per_s", ".1f"),
    ("ours peak MB", "ours_peak_mb", ".0f"), ("HF peak MB", "ref_peak_mb", ".0f"),
    ("memory ours/HF", "memory_ratio", ".2f"), ("ours GEMM s", "ours_gemm_s", ".3f"),
    ("HF GEMM s", "ref_gemm_s", ".3f"), ("ours TFLOP/s", "ours_tflops", ".3f"),
    ("HF TFLOP/s", "ref_tflops", ".3f"), ("loss ours", "ours_loss", ".5f"), ("loss HF", "ref_loss", ".5f"),
]
CURVE = [
    ("model", "model", ""), ("px", "img_size", "d"), ("window", "window", "d"), ("batch", "batch", "d"),
    ("precision", "precision", ""), ("s/step", "step_s", ".3f"), ("img/s", "images_per_s", ".1f"),
    ("peak MB", "peak_mb", ".0f"), ("TFLOP/s", "tflops", ".3f"),
]


def kernel_time_notes(rows: list[dict], share: float = 0.1) -> list[str]:
    """A line for each side of a comparison whose steps spent more than `share` of their time in the
    kernel (system CPU time: page faults, mostly), which makes that row's ratio less certain."""
    notes = []
    for row in rows:
        for side, label in (("ours", "ours"), ("ref", "HF")):
            system, step = row.get(f"{side}_system_s"), row[f"{side}_step_s"]
            if system is not None and system > share * step:
                notes.append(f"- {row['model']} {row['precision']}: {label} spent {system:.3f} s of its {step:.3f} s "
                             "step in the kernel (page faults, mostly); that row's ratio is less certain.")
    return notes or [f"System (kernel) time stayed under {share:.0%} of every step on both sides."]


def markdown(results: dict) -> str:
    """The full benchmark as a Markdown page."""
    env, gemm = results["environment"], results["gemm_tflops"]
    lines = [
        "# Benchmark: SimMIM pretraining step, ours against HF transformers",
        "",
        f"Run {env['date']} on {env['cpu']}, {env['cores']} cores (torch threads: {env['threads']}), device "
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}; allocator "
        f"{env['allocator']}; load average {env['load_average']:.2f} at the start"
        + (f"; fp32 GEMM route {env['gemm_route']}." if env.get("gemm_route") else "."),
        f"Produced by `{results.get('command', 'simmim bench')}`; the numbers are in `benchmark.json`.",
        "",
        "## How it is measured",
        "",
        *results["method"],
        "",
        "Dense GEMM on this device in the same run (TFLOP/s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in gemm.items()) + ".",
        "",
        "## Ours against HF (same configuration, weights, input and mask)",
        "",
        *table(results["comparison"], COMPARISON),
        "",
        *kernel_time_notes(results["comparison"]),
        "",
        "## Cost curve (ours)",
        "",
        *table(results["cost_curve"], CURVE),
        "",
        "## Data pipeline",
        "",
    ]
    pipe = results["pipeline"]
    if "skipped" in pipe:
        return "\n".join([*lines, f"Skipped: {pipe['skipped']}.", ""])
    lines += [
        f"JPEG decode + RandomResizedCrop + flip + normalize + mask, {pipe['size']} px, batches of "
        f"{pipe['batch_size']}, {pipe['images']} images: {pipe['per_worker_images_per_s']:.1f} img/s per worker; "
        f"{pipe['loader_images_per_s']:.1f} img/s through a DataLoader with the default {pipe['workers']} "
        f"worker(s), against {pipe['consumer_images_per_s']:.1f} img/s consumed by the {pipe['consumer']} step "
        f"({'keeps up' if pipe['keeps_up'] else 'does NOT keep up'}).",
        "",
    ]
    return "\n".join(lines)
