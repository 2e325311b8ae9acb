"""Where a benchmark ran, and its results as JSON and as Markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

from ..fsutil import atomic_write_text
from ..hardware import cpu_fields, cpu_model, isa_caps, isa_names
from ..models.kernels import gemm_route
from ..runtime import allocator_description


def now() -> str:
    """The local time with its offset, to the second, as the page dates runs."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


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
    caps = isa_caps()
    # a run with its kernels capped to fewer instruction sets emulates another CPU: a section of its own
    capped = f", instruction sets capped ({', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": now(),
        "cpu": cpu_model(fields) + capped,
        "cpu_key": cpu_model(fields, isa=False) + capped,
        "isa": isa_names(fields),
        "isa_caps": caps,
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


def _without_absent_sides(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """columns without mmpretrain's where no row has them (its environment was absent)."""
    if any(row.get("mm_step_s") is not None or row.get("mm_compiled_s") is not None for row in rows):
        return columns
    return [column for column in columns if not column[1].startswith("mm_")]


def comparison_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """COMPARISON, with the mode where a row was compiled, without mmpretrain's columns where no row has them."""
    columns = list(_without_absent_sides(rows, COMPARISON))  # a copy: the insert must not grow COMPARISON
    if any(row.get("compile") for row in rows):
        columns.insert(4, ("mode", "mode", ""))
    return columns


def mode_rows(rows: list[dict]) -> list[dict]:
    """Per configuration that has a compiled row: each side's eager and compiled step, eager/compiled (above 1:
    compiling pays), its cold- and warm-cache first compile, and the speedup over each peer with every side
    in its faster mode."""
    configs: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        key = (row["model"], row["img_size"], row["batch"], row["precision"])
        configs.setdefault(key, {})["compiled" if row.get("compile") else "eager"] = row
    out = []
    for (model, img_size, batch, precision), by_mode in configs.items():
        compiled, eager = by_mode.get("compiled"), by_mode.get("eager", {})
        if compiled is None:
            continue
        row = {"model": model, "img_size": img_size, "batch": batch, "precision": precision,
               "backend": compiled["compile"]}
        best = {}
        for side in SIDES:
            if compiled.get(f"{side}_step_s") is None:
                continue
            e, c = eager.get(f"{side}_step_s"), compiled[f"{side}_step_s"]
            best[side] = min(c, e) if e is not None else c
            row.update({f"{side}_eager_s": e, f"{side}_compiled_s": c, f"{side}_mode_ratio": e / c if e else None,
                        f"{side}_cold_s": compiled.get(f"{side}_compile_cold_s"),
                        f"{side}_warm_s": compiled.get(f"{side}_compile_warm_s")})
        for side in ("ref", "mm"):
            if side in best:
                row[f"{side}_best_speedup"] = best[side] / best["ours"]
        out.append(row)
    return out


def mode_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """The columns of `mode_rows`' table."""
    columns = [("model", "model", ""), ("px", "img_size", "d"), ("batch", "batch", "d"),
               ("precision", "precision", ""), ("backend", "backend", "")]
    for side, label in SIDES.items():
        columns += [(f"{label} eager s", f"{side}_eager_s", ".3f"),
                    (f"{label} compiled s", f"{side}_compiled_s", ".3f"),
                    (f"{label} eager/compiled", f"{side}_mode_ratio", ".2f")]
    for side, label in SIDES.items():
        columns += [(f"{label} 1st compile cold s", f"{side}_cold_s", ".1f"),
                    (f"{label} 1st compile warm s", f"{side}_warm_s", ".1f")]
    columns += [("HF/ours, faster modes", "ref_best_speedup", ".2f"),
                ("mmpretrain/ours, faster modes", "mm_best_speedup", ".2f")]
    return _without_absent_sides(rows, columns)
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


def row_key(row: dict) -> tuple:
    """What a comparison row measured: model, size, window, batch, precision and mode."""
    return row["model"], row["img_size"], row.get("window"), row["batch"], row["precision"], row.get("mode", "eager")


def merge_rows(page: dict | None, section: dict) -> dict:
    """The page with a --quick run's rows (`section`) put into its CPU's section: replacing the rows that
    measured the same (`row_key`), kept beside the others, its command added to the section's; the section
    replaced where the run measured again every row of a --quick section; a new section where the CPU has
    none (or only a reported one)."""
    runs = [] if page is None else page.get("runs", [page])
    at = next((i for i, run in enumerate(runs) if cpu_key(run) == cpu_key(section) and "reported" not in run), None)
    if at is None:
        return merge_runs(page, section)
    run = runs[at]
    keys = {row_key(row) for row in section["comparison"]}
    kept = [r for r in run["comparison"] if row_key(r) not in keys]
    if not kept and "cost_curve" not in run:  # every row measured again: the section is the new run's, note included
        return {"runs": [*runs[:at], section, *runs[at + 1:]]}
    also = {"command": section["command"], "date": section["environment"]["date"],
            "load_average": section["environment"]["load_average"]}
    seen = [{"command": run.get("command"), "date": run["environment"]["date"]},
            *({"command": a["command"], "date": a["date"]} for a in run.get("also", []))]
    merged = {**run, "comparison": kept + section["comparison"]}
    if {"command": also["command"], "date": also["date"]} not in seen:  # a run rewrites its rows after each one
        merged["also"] = [*run.get("also", []), also]
    return {"runs": [*runs[:at], merged, *runs[at + 1:]]}


def _run_section(results: dict) -> list[str]:
    """A CPU's section: as reported elsewhere (`_reported_section`), or as measured; a --quick run recorded with
    --page has its comparison only, without the GEMM rates, cost curve and pipelines of a full run."""
    if "reported" in results:
        return _reported_section(results)
    env = results["environment"]
    libraries = ", ".join(f"{name} {env[name]}" for name in ("torch", "transformers", "mmpretrain") if env.get(name))
    lines = [
        f"## {env['cpu']}",
        "",
        f"Run {env['date']}, {env['cores']} cores (torch threads: {env['threads']}), device {env['device']}; "
        f"{libraries}; allocator {env['allocator']}; load average {env['load_average']:.2f} at the start"
        + (f"; fp32 GEMM route {env['gemm_route']}." if env.get("gemm_route") else "."),
        f"Produced by `{results.get('command', 'simmim bench')}`"
        + "".join(f"; rows added by `{also['command']}` (run {also['date']}, load average {also['load_average']:.2f} "
                  "at the start)" for also in results.get("also", [])) + ".",
        *([results["note"]] if results.get("note") else []),
        "",
        *([] if "gemm_tflops" not in results else [
            f"Dense GEMM ({_gemm_size(results)}) on this device in the same run (TFLOP/s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in results["gemm_tflops"].items()) + ".", ""]),
        "### Ours against the references (same configuration, weights, input and mask)",
        "",
        *table(results["comparison"], comparison_columns(results["comparison"])),
        "",
        *kernel_time_notes(results["comparison"]),
        "",
        *_modes_section(results["comparison"]),
    ]
    if "cost_curve" not in results:
        return lines
    lines += [
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


def _gemm_size(results: dict) -> str:
    n = results.get("gemm_size") or results.get("plan", {}).get("gemm_size")
    return f"{n}x{n} by {n}x{n}" if n else "size unrecorded"


def _reported_section(results: dict) -> list[str]:
    """A CPU the benchmark has not run on, with the figures another account (an issue) reported for it."""
    reported = results["reported"]
    return [f"## {results['environment']['cpu']}", "", reported["intro"], "",
            "| measurement | reported |", "|---|---|",
            *(f"| {what} | {figure} |" for what, figure in reported["figures"]), "",
            *([reported["note"], ""] if reported.get("note") else [])]


def _modes_section(rows: list[dict]) -> list[str]:
    """The eager-against-compiled table, where the run had compiled rows."""
    modes = mode_rows(rows)
    if not modes:
        return []
    return ["### Eager against compiled (training step; first compile cold and warm)", "",
            *table(modes, mode_columns(modes)), "",
            "eager/compiled above 1: the compiled step is the faster. First compile: the side's first step less "
            "its steady step, cold on an empty Inductor cache, warm in a new process on the filled one.", ""]


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
    newest = max((run for run in runs if "method" in run), key=lambda run: run["environment"]["date"])
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
