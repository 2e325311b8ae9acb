"""Where a benchmark ran, and its results as JSON and as Markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from ..fsutil import atomic_write_text
from ..hardware import cpu_fields, cpu_model, isa_names
from ..models.kernels import gemm_route
from ..runtime import allocator_description


def environment(device: torch.device) -> dict:
    """Date, machine (the CPU by name, family/model and ISA; `cpu_key` without the ISA is what tells one CPU's
    runs from another's on the page), library versions and allocator of this run."""
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    try:
        import mmpretrain  # the peer's environment only (`make bench-peers`)

        mm_version = mmpretrain.__version__
    except ImportError:
        mm_version = None
    fields = cpu_fields()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(fields),
        "cpu_key": cpu_model(fields, isa=False),
        "isa": isa_names(fields),
        "cores": cpus,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": hf_version,
        "mmpretrain": mm_version,
        "allocator": allocator_description(),
        "gemm_route": gemm_route() if device.type == "cpu" else None,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n", "benchmark results")
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
    ("mmpretrain s/step", "mm_step_s", ".3f"), ("speedup mmpretrain/ours", "mm_speedup", ".2f"),
    ("ours peak MB", "ours_peak_mb", ".0f"), ("HF peak MB", "ref_peak_mb", ".0f"),
    ("mmpretrain peak MB", "mm_peak_mb", ".0f"),
    ("memory ours/HF", "memory_ratio", ".2f"), ("ours GEMM s", "ours_gemm_s", ".3f"),
    ("HF GEMM s", "ref_gemm_s", ".3f"), ("ours TFLOP/s", "ours_tflops", ".3f"),
    ("HF TFLOP/s", "ref_tflops", ".3f"), ("loss ours", "ours_loss", ".5f"), ("loss HF", "ref_loss", ".5f"),
    ("loss mmpretrain", "mm_loss", ".5f"),
]
SIDES = {"ours": "ours", "ref": "HF", "mm": "mmpretrain"}
"""Key prefix of each side's figures in a comparison row, and its name."""


def comparison_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """COMPARISON, without mmpretrain's columns where no row has them (its environment was absent)."""
    if any(row.get("mm_step_s") is not None for row in rows):
        return COMPARISON
    return [column for column in COMPARISON if not column[1].startswith("mm_")]
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
        for side, label in SIDES.items():
            system, step = row.get(f"{side}_system_s"), row.get(f"{side}_step_s")
            if system is not None and system > share * step:
                notes.append(f"- {row['model']} {row['precision']}: {label} spent {system:.3f} s of its {step:.3f} s "
                             "step in the kernel (page faults, mostly); that row's ratio is less certain.")
    return notes or [f"System (kernel) time stayed under {share:.0%} of every step on every side."]


def cpu_key(results: dict) -> str:
    """The CPU a run was measured on: name and family/model (a run from before `cpu_key`: its `cpu`)."""
    env = results["environment"]
    return env.get("cpu_key") or env["cpu"]


def merge_runs(page: dict | None, results: dict) -> dict:
    """The page's runs, one per CPU, with `results` in place of the earlier run on the same CPU (or added);
    a page from before the runs were kept per CPU is one run."""
    runs = [] if page is None else page.get("runs", [page])
    key = cpu_key(results)
    kept = [run for run in runs if cpu_key(run) != key]
    at = next((i for i, run in enumerate(runs) if cpu_key(run) == key), len(runs))
    return {"runs": kept[:at] + [results] + kept[at:]}


def _run_section(results: dict) -> list[str]:
    env, gemm = results["environment"], results["gemm_tflops"]
    libraries = ", ".join(f"{name} {env[name]}" for name in ("torch", "transformers", "mmpretrain") if env.get(name))
    lines = [
        f"## {env['cpu']}",
        "",
        f"Run {env['date']}, {env['cores']} cores (torch threads: {env['threads']}), device {env['device']}; "
        f"{libraries}; allocator {env['allocator']}; load average {env['load_average']:.2f} at the start"
        + (f"; fp32 GEMM route {env['gemm_route']}." if env.get("gemm_route") else "."),
        f"Produced by `{results.get('command', 'simmim bench')}`.",
        *([results["note"]] if results.get("note") else []),
        "",
        "Dense GEMM on this device in the same run (TFLOP/s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in gemm.items()) + ".",
        "",
        "### Ours against the references (same configuration, weights, input and mask)",
        "",
        *table(results["comparison"], comparison_columns(results["comparison"])),
        "",
        *kernel_time_notes(results["comparison"]),
        "",
        "### Cost curve (ours)",
        "",
        *table(results["cost_curve"], CURVE),
        "",
        "### Data pipeline",
        "",
    ]
    pipe = results["pipeline"]
    if "skipped" in pipe:
        return [*lines, f"Skipped: {pipe['skipped']}.", "", *_demo_pipeline(results.get("demo_pipeline"))]
    return [
        *lines,
        f"JPEG decode + RandomResizedCrop + flip + normalize + mask, {pipe['size']} px, batches of "
        f"{pipe['batch_size']}, {pipe['images']} images: {pipe['per_worker_images_per_s']:.1f} img/s per worker; "
        f"{pipe['loader_images_per_s']:.1f} img/s through a DataLoader with the default {pipe['workers']} "
        f"worker(s){_started(pipe)}, against {pipe['consumer_images_per_s']:.1f} img/s consumed by the "
        f"{pipe['consumer']} step "
        f"({'keeps up' if pipe['keeps_up'] else 'does NOT keep up'}).",
        "",
        *_demo_pipeline(results.get("demo_pipeline")),
    ]


def _started(pipe: dict) -> str:
    """When the loader's rate leaves out the workers' start (paid once per epoch): how long that took."""
    return f" once started (first batch after {pipe['first_batch_s']:.1f} s)" if "first_batch_s" in pipe else ""


def _demo_pipeline(demo: dict | None) -> list[str]:
    if demo is None:  # a run from before the demo's pipeline was measured
        return []
    if "skipped" in demo:
        return [f"The demo's pipeline: skipped ({demo['skipped']}).", ""]
    return [
        f"The demo's pipeline (`{demo['preset']}`: Fashion-MNIST, its transform and masks, {demo['size']} px, "
        f"batches of {demo['batch_size']}, {demo['images']} images): {demo['per_worker_images_per_s']:.1f} img/s "
        f"per worker, {demo['loader_images_per_s']:.1f} img/s through its DataLoader with {demo['workers']} "
        f"worker(s){_started(demo)}, against {demo['step_images_per_s']:.1f} img/s consumed by its "
        f"{demo['precision']} step "
        f"({demo['threads']} thread(s), measured after the loader) "
        f"({'keeps up' if demo['keeps_up'] else 'does NOT keep up'}).",
        "",
    ]


def markdown(page: dict) -> str:
    """The benchmark page: how it is measured (as the newest run states it), then one section per CPU."""
    runs = page["runs"]
    newest = max(runs, key=lambda run: run["environment"]["date"])
    return "\n".join([
        "# Benchmark: SimMIM pretraining step, ours against HF transformers (and mmpretrain)",
        "",
        "One section per CPU the benchmark ran on (`simmim bench` replaces only the section of the CPU it runs on); "
        "the numbers are in `benchmark.json`.",
        "",
        "## How it is measured",
        "",
        *newest["method"],
        "",
        *(line for run in runs for line in _run_section(run)),
    ])
