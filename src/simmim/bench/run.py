"""The benchmark runs: the quick comparison, the full one (comparison, cost curve, data pipeline), and
the `simmim bench` command."""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from ..fsutil import atomic_write_text
from ..hardware import cpu_model
from ..measure import peak_memory
from ..zoo import build_model, get_spec
from ..zoo.flops import count_macs
from . import measure, ops, peers, report
from .pair import build_sides, use_compile_cache

TINY, SMALL, BASE, LARGE = (
    "simmim_swin-tiny-w6_in1k-192px", "simmim_swin-small-w6_in1k-192px",
    "simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px", "simmim_swin-large-w12_16xb128-amp-coslr-800e_in1k-192px",
)
SHORT = {TINY: "Swin-T", SMALL: "Swin-S", BASE: "Swin-B", LARGE: "Swin-L"}
MB = 2**20
T = TypeVar("T")


@dataclass(frozen=True)
class BenchPlan:
    """Sizes of a full run on one kind of device."""

    batch: int
    """Batch of the comparison with HF."""
    batches: tuple[int, ...]
    """Batch sizes of the cost curve (Swin-T, 192 px)."""
    image_batch: int
    """Batch of the image-size points (Swin-T at 192/w6 and 224/w7)."""
    model_batch: int
    """Batch of the model-size points (T/S/B/L at 192 px)."""
    gemm_size: int
    warmup: int
    repeats: int
    compiled: tuple[str, ...] = ()
    """Models of the comparison also measured compiled (`--mode compiled` or `both`): on the CPU Swin-T
    alone, whose blocks take minutes per side to compile on a few cores."""


PLANS = {"cpu": BenchPlan(8, (1, 2, 4, 8), 4, 2, 2048, 1, 5, compiled=(TINY,)),
         "cuda": BenchPlan(64, (16, 32, 64, 128), 64, 32, 8192, 2, 8, compiled=(TINY, BASE))}
QUICK_GEMM = 1024
"""The dense product whose rate a --quick --page run records (a bf16 one without bf16 units is emulated, slow)."""
MODES = {"eager": ("eager",), "compiled": ("compiled",), "both": ("eager", "compiled")}
METHOD = [
    "- A step is one SimMIM pretraining step as training runs it: forward (under `torch.autocast` for bf16), "
    "L1 loss on masked pixels, backward, fused AdamW; every side in one process on the same seeded images, "
    "masks and weights (ours written in HF's on-disk layout and read by `from_pretrained`), HF with "
    "`attn_implementation=\"sdpa\"`, dropout and drop path 0 on all.",
    "- mmpretrain 1.2.0 (its SimMIM: SimMIMSwinTransformer, linear decoder, L1 head), where its environment "
    "exists (`make bench-peers`): our weights converted to its checkpoint layout and loaded, the row run by "
    "that venv's python with this package first on its path, so the three sides are timed in one process.",
    "- Modes: eager, and compiled (`--mode compiled` or `both`): every residual block of every side (our "
    "SwinBlock, HF's SwinLayer, mmpretrain's SwinBlock) under `torch.compile` with the backend named (Inductor by "
    "default), the loss, decoder, optimizer and the rest eager. First compile: a side's first step less its steady "
    "step, cold with an empty Inductor cache (`TORCHINDUCTOR_CACHE_DIR`, one fresh folder and process per side), "
    "warm in a new process on the cache the cold one filled; the compiled row's steps are timed in that process.",
    "- Step time: median over steps timed alternately (ours, HF[, mmpretrain], ours, HF, ...) after untimed "
    "warm-up rounds, so that other load on the machine slows every side alike; all use the same torch threads "
    "(`--threads`: on a CPU shared with other jobs one thread gives steadier times than OpenMP regions "
    "that wait for a busy core).",
    "- System time: the kernel's CPU time within a timed step (median); a row where it passes a tenth of a "
    "step is named under the table.",
    "- On the CPU each comparison row and cost-curve point runs in a fresh process: measured after other rows in "
    "one process, Swin-B's bf16 steps ran 1.2-1.5x slower (HF's more than ours), in page-fault system time.",
    "- Peak memory: bytes allocated during one step on top of what was held before it (weights, optimizer "
    "state): on CUDA `torch.cuda.max_memory_allocated`; on the CPU the same quantity from the profiler's "
    "record of every tensor allocation and free with the running total (RSS would measure the malloc's "
    "cache instead: jemalloc with decay off keeps every page it ever used).",
    "- FLOP rate: 6 x forward multiply-adds x batch / step time, i.e. one MAC = 2 FLOPs and a training step = "
    "3 forwards (the backward costs about two); MACs from simmim's counter (linear, conv and attention "
    "matmuls on padded windows, as the published tables count them).",
    "- GEMM time (CPU): the self time of the matrix-product operators (mm, addmm, bmm, baddbmm, oneDNN "
    "linear and convolution, convolution backward) in one profiled step; the rest of the step is "
    "elementwise work (norms, activations, softmax, casts, AdamW), data movement and overhead. "
    "HF's step divided by our GEMM time bounds the speedup that trimming our non-GEMM work could reach.",
    "- Kernels: on the CPU our linear layers run their float32 GEMMs through the route a calibration "
    "chose for the machine (the header's GEMM route: oneDNN, or torch's default, MKL's sgemm, which takes "
    "its AVX2 path on AMD CPUs: compare the fp32 and fp32_onednn GEMM rates below), HF's through torch's "
    "default; in bf16 both sides' GEMMs are oneDNN's.",
]


def forward_macs(name: str, **overrides) -> int:
    """Multiply-adds of one image's SimMIM forward (encoder and decoder), counted on the meta device."""
    with torch.device("meta"):
        model = build_model(get_spec(name), **overrides)
        size = model.encoder.cfg.img_size
        return count_macs(model, torch.zeros(1, 3, size, size), model.random_mask(1).to("meta")).total


def _label(name: str, batch_size: int, precision: str, compile: str | None) -> str:
    return f"{SHORT.get(name, name)} batch {batch_size} {precision}" + (f" compiled ({compile})" if compile else "")


def _sides(name: str, batch_size: int, precision: str, device: torch.device, plan: BenchPlan, reference: bool,
           compile: str | None, peer: bool = False, compile_cache: str | None = None, **overrides) -> dict[str, dict]:
    """Times and measures our model (and HF's twin if `reference`, mmpretrain's if `peer`) on one configuration;
    compiled, each side's first compile uses Inductor's cache in compile_cache/side (`use_compile_cache`)."""
    if compile:
        torch.compiler.reset()  # a process that compiled other models before (the GPU's rows run in one)
    models, steps = build_sides(name, batch_size, precision, device, reference, compile, peer, **overrides)
    label = _label(name, batch_size, precision, compile)
    print(f"  {label}: {' and '.join(steps)} built; {plan.warmup} warm-up + {plan.repeats} timed steps each",
          flush=True)
    losses, first = {}, {}
    for side, step in steps.items():  # first step: same weights on every side; compiled, it compiles
        if compile and compile_cache:
            use_compile_cache(compile_cache, side)
        losses[side], first[side] = measure.timed_call(step, device)
    timings = measure.alternate(steps, device, plan.warmup, plan.repeats)
    print(f"  {label}: timed; measuring peak memory and GEMM time (one profiled step each)", flush=True)
    flops = 6 * forward_macs(name, **overrides) * batch_size
    out = {}
    for side, step in steps.items():
        models[side].zero_grad(set_to_none=True)  # memory measured on top of weights and optimizer state
        seconds = measure.median(timings.wall[side])
        peak_mb = peak_memory(step, device) / MB
        gemm_s, profiled_s = measure.gemm_seconds(step, device)
        out[side] = {"step_s": seconds, "images_per_s": batch_size / seconds, "tflops": flops / seconds / 1e12,
                     "peak_mb": peak_mb, "gemm_s": gemm_s, "profiled_s": profiled_s,
                     "system_s": measure.median(timings.system[side]), "loss": losses[side],
                     "first_step_s": first[side], "times": timings.wall[side]}
    return out


def compare(name: str, batch_size: int, precision: str, device: torch.device, plan: BenchPlan,
            compile: str | None = None, peer: bool = False, compile_cache: str | None = None, **overrides) -> dict:
    """One row of the comparison with HF (and mmpretrain if `peer`): the sides' figures side by side, with
    their ratios to ours; `compile`: every block compiled with that backend (`compiled_compare` adds the
    compile times)."""
    sides = _sides(name, batch_size, precision, device, plan, reference=True, compile=compile, peer=peer,
                   compile_cache=compile_cache, **overrides)
    cfg = {**get_spec(name).encoder, **overrides}
    row = {"model": SHORT.get(name, name), "name": name, "img_size": cfg["img_size"], "window": cfg["window_size"],
           "batch": batch_size, "precision": precision, "device": device.type,
           "mode": "compiled" if compile else "eager", "compile": compile}
    for side, figures in sides.items():
        row.update({f"{side}_{key}": value for key, value in figures.items()})
    row["speedup"] = row["ref_step_s"] / row["ours_step_s"]
    if peer:
        row["mm_speedup"] = row["mm_step_s"] / row["ours_step_s"]
    row["memory_ratio"] = row["ours_peak_mb"] / row["ref_peak_mb"] if row["ref_peak_mb"] else None
    return row


def cost_point(name: str, batch_size: int, precision: str, device: torch.device, plan: BenchPlan,
               **overrides) -> dict:
    """One point of our cost curve."""
    figures = _sides(name, batch_size, precision, device, plan, reference=False, compile=None, **overrides)["ours"]
    cfg = {**get_spec(name).encoder, **overrides}
    return {"model": SHORT.get(name, name), "img_size": cfg["img_size"], "window": cfg["window_size"],
            "batch": batch_size, "precision": precision, **figures}


def cost_curve(precision: str, device: torch.device, plan: BenchPlan) -> list[dict]:
    """Step time and memory against batch size, image size and model size."""
    points = [(TINY, b, ()) for b in plan.batches]
    points += [(TINY, plan.image_batch, ()), (TINY, plan.image_batch, (("img_size", 224), ("window_size", 7)))]
    points += [(name, plan.model_batch, ()) for name in (TINY, SMALL, BASE, LARGE)]
    measure_row = row_runner(device)
    return [measure_row(cost_point, name, b, precision, device, plan, **dict(overrides))
            for name, b, overrides in dict.fromkeys(points)]  # each point once, in order


def cold_first_step(name: str, batch_size: int, precision: str, device: torch.device, backend: str,
                    cache_root: str, side: str, **overrides) -> float:
    """Seconds of `side`'s first step with its blocks compiled by `backend` (the compilation of its forward
    and backward, then the step) on an empty Inductor cache in cache_root/side; run in a fresh process,
    where nothing compiled is held in memory either."""
    torch.compiler.reset()
    _, steps = build_sides(name, batch_size, precision, device, reference=side == "ref", compile=backend,
                           peer=side == "mm", **overrides)
    folder = use_compile_cache(cache_root, side)
    if folder.exists() and any(folder.iterdir()):
        raise RuntimeError(f"{folder}: a cold compile needs an empty Inductor cache")
    print(f"  {_label(name, batch_size, precision, backend)}: {report.SIDES[side]}'s first compile, empty cache",
          flush=True)
    return measure.timed(steps[side], device)


@dataclass(frozen=True)
class Runners:
    """Where comparison rows run."""

    eager: Callable[..., dict]
    """Runs an eager row (`isolated`, the peers' python, or in this process)."""
    fresh: Callable[..., T]
    """Runs each call in a fresh process (the peers' python where mmpretrain is a side): a compiled row's
    processes, since a warm compile is one in a new process on a filled cache, not a second in one process."""
    peer: bool
    """mmpretrain is a side."""


def runners(venv: str, here: Callable[..., dict]) -> Runners:
    """The Runners of a run whose eager rows run with `here` where mmpretrain is absent (`peer_runner`)."""
    peer = peer_runner(venv, here)
    if peer is None:
        return Runners(here, isolated, False)
    return Runners(peer, isolated if peer is here else peer, True)


def cold_compiles(fresh: Callable[..., T], sides: list[str], name: str, batch_size: int, precision: str,
                  device: torch.device, backend: str, root: str | Path, **overrides) -> dict[str, dict]:
    """Each side's cold first compile (`cold_first_step`, a fresh process per side) for one configuration,
    its caches in root/CONFIGURATION/SIDE, the record of each ({first_step_s, date, load_average}) beside
    them as SIDE.cold.json: a side recorded there by an earlier run is taken from its record, not
    compiled again (its cache is no longer empty)."""
    folder = Path(root, "-".join([name, *(f"{k}{v}" for k, v in sorted(overrides.items())), f"b{batch_size}",
                                  precision, backend]))
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for side in sides:
        path = folder / f"{side}.cold.json"
        if not path.exists():
            load = os.getloadavg()[0]
            seconds = fresh(cold_first_step, name, batch_size, precision, device, backend, str(folder), side,
                            **overrides)
            atomic_write_text(path, json.dumps({"first_step_s": seconds, "date": report.now(),
                                                "load_average": max(load, os.getloadavg()[0])}), "cold compile")
        records[side] = json.loads(path.read_text())
    return {"folder": folder, **records}


def compiled_compare(fresh: Callable[..., T], name: str, batch_size: int, precision: str, device: torch.device,
                     plan: BenchPlan, backend: str, peer: bool = False, cache_root: str | None = None,
                     **overrides) -> dict:
    """A compiled row: each side's cold first compile (`cold_compiles`), then the row `compare` measures,
    compiled, in one more process on the caches those filled; per side the cold and warm compile times (the
    first step less the steady one) and when the cold one was measured. The caches live in cache_root
    (default: a temporary folder, removed after)."""
    sides = ["ours", "ref", *(["mm"] if peer else [])]
    with tempfile.TemporaryDirectory(prefix="simmim-inductor-") as tmp:
        cold = cold_compiles(fresh, sides, name, batch_size, precision, device, backend, cache_root or tmp,
                             **overrides)
        row = fresh(compare, name, batch_size, precision, device, plan, backend, peer, str(cold["folder"]),
                    **overrides)
    for side in sides:
        steady = row[f"{side}_step_s"]
        row[f"{side}_compile_cold_s"] = cold[side]["first_step_s"] - steady
        row[f"{side}_compile_cold_at"] = {k: cold[side][k] for k in ("date", "load_average")}
        row[f"{side}_compile_warm_s"] = row[f"{side}_first_step_s"] - steady
    return row


def comparison(modes: tuple[str, ...], runs: Runners, name: str, batch_size: int, precision: str,
               device: torch.device, plan: BenchPlan, backend: str, compile_cache: str | None = None,
               **overrides) -> list[dict]:
    """The comparison's rows of one configuration, one per mode (eager, compiled; its caches in compile_cache,
    default a temporary folder)."""
    rows = []
    for mode in modes:
        print(f"ours against HF{' and mmpretrain' if runs.peer else ''}: {SHORT.get(name, name)} batch {batch_size} "
              f"{precision}, {mode}", flush=True)
        if mode == "eager":
            rows.append(runs.eager(compare, name, batch_size, precision, device, plan, None, runs.peer, **overrides))
        else:
            rows.append(compiled_compare(runs.fresh, name, batch_size, precision, device, plan, backend, runs.peer,
                                         compile_cache, **overrides))
    return rows


def quick(device: torch.device, runs: Runners, precisions: tuple[str, ...] = ("fp32",),
          modes: tuple[str, ...] = ("eager",), name: str = TINY, batch_size: int = 8, backend: str = "inductor",
          warmup: int = 1, repeats: int = 3, compile_cache: str | None = None,
          progress: Callable[[dict], None] | None = None, **overrides) -> dict:
    """Ours against HF (and mmpretrain where `runs` has it) on one configuration (Swin-T 192/w6, batch 8 by
    default) in each precision and mode: about a minute per eager row; overrides change the zoo model's
    encoder (e.g. img_size); `progress` sees the results so far after each row."""
    plan = BenchPlan(batch_size, (), 0, 0, 0, warmup, repeats)
    results = {"environment": runs.eager(report.environment, device), "rows": []}
    for precision in precisions:
        for mode in modes:
            results["rows"] += comparison((mode,), runs, name, batch_size, precision, device, plan, backend,
                                          compile_cache, **overrides)
            if progress:
                progress(results)
    return results


def isolated(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) in a fresh process (spawned, with this one's torch threads and environment, so
    its allocator too): a row's figures must not depend on the rows measured before it, whose freed
    pages the allocator keeps (docs/notes.md)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=torch.set_num_threads,
                             initargs=(torch.get_num_threads(),)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def row_runner(device: torch.device) -> Callable[..., dict]:
    """How the full run measures a row: on the CPU in a process of its own (`isolated`); on a GPU in this
    one, whose caching allocator hands each row's memory back (`torch.cuda.empty_cache`), where a process
    per row would add a CUDA start-up to each of the GPU check's dozen rows."""
    if device.type == "cpu":
        return isolated

    def in_process(fn: Callable[..., dict], *args, **kwargs) -> dict:
        torch.cuda.empty_cache()
        return fn(*args, **kwargs)

    return in_process


def full(device: torch.device, precisions: list[str], runs: Runners, modes: tuple[str, ...] = ("eager",),
         backend: str = "inductor", compile_cache: str | None = None) -> dict:
    """Comparison (Swin-T and Swin-B in every precision and mode; compiled, the plan's models only), cost
    curve and data pipeline; on the CPU each row and point measured in a process of its own; where `runs`
    has mmpretrain (`peers.in_peers`) the comparison rows run there, with it as a third side."""
    plan = PLANS["cuda" if device.type == "cuda" else "cpu"]
    results = {"environment": runs.eager(report.environment, device), "method": METHOD, "plan": plan.__dict__}
    print("measuring the dense-GEMM rate", flush=True)
    results["gemm_tflops"] = {k: v / 1e12 for k, v in measure.gemm_rates(device, plan.gemm_size).items()}
    results["comparison"] = [
        row for name in (TINY, BASE) for precision in precisions
        for row in comparison(tuple(m for m in modes if m == "eager" or name in plan.compiled), runs, name,
                              plan.batch, precision, device, plan, backend, compile_cache)]
    print("cost curve", flush=True)
    results["cost_curve"] = cost_curve(precisions[0], device, plan)
    print("data pipeline", flush=True)
    rows = [r for r in results["comparison"] if r["precision"] == precisions[0]]
    consumer = next((r for r in rows if r["name"] == BASE), rows[0])  # Swin-B, unless only compiled rows ran
    results["pipeline"] = data_pipeline(plan.batch, f"{consumer['model']} {precisions[0]} batch {plan.batch}",
                                        consumer["ours_images_per_s"])
    print("the demo's data pipeline against its bf16 step", flush=True)
    results["demo_pipeline"] = row_runner(device)(demo_pipeline)
    return results


def data_pipeline(batch_size: int, consumer: str, consumer_images_per_s: float) -> dict:
    """The input pipeline's throughput beside a step's consumption (skipped without scikit-image,
    whose photographs it reads)."""
    try:
        from . import pipeline
    except ImportError as err:
        return {"skipped": f"{err}"}
    pipe = pipeline.throughput(size=get_spec(BASE).img_size, batch_size=batch_size)
    pipe.update(consumer=consumer, consumer_images_per_s=consumer_images_per_s)
    pipe["keeps_up"] = pipe["loader_images_per_s"] > consumer_images_per_s
    return pipe


def demo_pipeline() -> dict:
    """The demo's loader beside its bf16 step on the CPU (skipped without the Fashion-MNIST files)."""
    from . import pipeline

    try:
        return pipeline.demo_throughput()
    except (FileNotFoundError, ImportError) as err:
        return {"skipped": f"{err}"}


def _print_rows(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print("\n".join(report.table(rows, columns)))


def _print_comparison(rows: list[dict]) -> None:
    _print_rows(rows, report.comparison_columns(rows))
    modes = report.mode_rows(rows)
    if modes:
        _print_rows(modes, report.mode_columns(modes))


def _command(args: argparse.Namespace) -> str:
    """The `simmim bench` command line of a run, as the page quotes it (the options that shape its rows)."""
    options = {"--quick": args.quick, "--device": args.device if args.device != "auto" else None,
               "--precision": args.precision, "--mode": args.mode if args.mode != "eager" else None,
               "--backend": args.backend if args.mode != "eager" and args.backend != "inductor" else None,
               "--threads": args.threads}
    return " ".join(["simmim bench", *(k if v is True else f"{k} {v}" for k, v in options.items() if v)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `simmim bench` / `python -m simmim.bench`."""
    parser.add_argument("--quick", action="store_true", help="ours against HF on Swin-T 192/w6, batch 8, only "
                                                             "(every precision and mode asked)")
    parser.add_argument("--ops", action="store_true",
                        help="where each side's step spends its time, by operator (Swin-T 192/w6, batch 8; CPU)")
    parser.add_argument("--json", help="write the results here (default with the full run: docs/benchmark.json)")
    parser.add_argument("--markdown", help="full run or --ops: write the tables here (full run's default: "
                                           "docs/benchmark.md; --ops prints only without it)")
    parser.add_argument("--note", help="full run or --quick --page: a line under this CPU's heading on the page "
                                       "(e.g. the machine was shared)")
    parser.add_argument("--page", action="store_true",
                        help="--quick: record its rows in this CPU's section of the benchmark page (replacing rows "
                             "of the same model, size, batch, precision and mode; --page-json, --markdown; default "
                             "docs/benchmark.json and .md)")
    parser.add_argument("--page-json", help="--quick --page: the page's JSON (default docs/benchmark.json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when there is one)")
    parser.add_argument("--precision", help="fp32, bf16 or both comma-separated (default: fp32 with --quick, "
                                            "fp32,bf16 otherwise)")
    parser.add_argument("--mode", choices=tuple(MODES), default="eager",
                        help="eager, compiled (every block of every side under torch.compile, with cold- and "
                             "warm-cache compile times; the full run's CPU rows: Swin-T only) or both "
                             "(default %(default)s)")
    parser.add_argument("--backend", default="inductor", help="the compiled mode's torch.compile backend "
                                                              "(default %(default)s)")
    parser.add_argument("--peers", default=peers.VENV, help="the venv holding mmpretrain, the third side "
                                                             "(`make bench-peers` builds it; default %(default)s; "
                                                             "'none': HF only)")
    parser.add_argument("--compile-cache", help="the compiled mode's Inductor caches, one folder per configuration "
                                                "and side, each with the record of its cold compile: a side "
                                                "recorded there is not compiled cold again (default: a temporary "
                                                "folder)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", default=TINY, help="--quick or --ops: the zoo model to compare")
    parser.add_argument("--batch", type=int, default=8, help="--quick or --ops: the batch size")
    parser.add_argument("--img-size", type=int, help="--quick or --ops: the input size (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="--quick: timed steps per side; --ops: rounds of a "
                                                               "timed and a profiled step per side")


def _here(fn: Callable[..., T], *args, **kwargs) -> T:
    return fn(*args, **kwargs)


def peer_runner(venv: str, here: Callable[..., dict]) -> Callable[..., dict] | None:
    """Where rows with mmpretrain run: as `here` runs rows when this python has mmpretrain, in the peers' venv
    when that exists, nowhere (None, said in one line) otherwise."""
    if venv == "none":
        print("mmpretrain: left out (--peers none)", flush=True)
        return None
    if peers.has_mmpretrain():
        return here
    python = peers.peers_python(venv)
    if python is None:
        print(f"mmpretrain: skipped (no {venv}; `make bench-peers` builds it)", flush=True)
        return None
    return peers.in_peers(python)


def run(args: argparse.Namespace) -> dict:
    """Runs the benchmark an argument namespace describes, prints it and writes its files."""
    from ..models.kernels import gemm_route
    from ..runtime import allocator_description

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    precisions = (args.precision or ("fp32" if args.quick or args.ops else "fp32,bf16")).split(",")
    cpu = f" ({cpu_model()}, fp32 GEMM route {gemm_route()})" if device.type == "cpu" else ""
    print(f"simmim bench on {device.type}{cpu}, {torch.get_num_threads()} threads, allocator "
          f"{allocator_description()}", flush=True)
    if args.ops:
        return operators(args, device, precisions)
    modes = MODES[args.mode]
    if args.quick:
        overrides = {"img_size": args.img_size} if args.img_size else {}
        results = quick(device, runners(args.peers, _here), tuple(precisions), modes, args.model, args.batch,
                        args.backend, repeats=args.repeats, compile_cache=args.compile_cache,
                        progress=lambda so_far: _write_quick(args, so_far), **overrides)
        _print_comparison(results["rows"])
        return results
    results = full(device, precisions, runners(args.peers, row_runner(device)), modes, args.backend,
                   args.compile_cache)
    results["command"] = _command(args)
    if args.note:
        results["note"] = args.note
    _print_comparison(results["comparison"])
    _print_rows(results["cost_curve"], report.CURVE)
    _write_page(args, results)
    return results


def _write_quick(args: argparse.Namespace, results: dict) -> None:
    """A --quick run's files (--json; with --page its CPU's section of the page), rewritten after each
    row, so that a long run interrupted keeps the rows it measured."""
    results["command"] = _command(args)
    if args.json:
        report.write_json(results, args.json)
    if args.page:
        section = {"environment": results["environment"], "method": METHOD, "command": results["command"],
                   "comparison": results["rows"], **({"note": args.note} if args.note else {})}
        if "gemm_tflops" not in results:  # once, with the first row: a smaller product than the full run's
            print(f"measuring the dense-GEMM rate ({QUICK_GEMM}^3)", flush=True)
            device = torch.device(results["rows"][0]["device"])
            results["gemm_tflops"] = {k: v / 1e12 for k, v in measure.gemm_rates(device, QUICK_GEMM).items()}
        _write_page(args, {**section, "gemm_tflops": results["gemm_tflops"], "gemm_size": QUICK_GEMM})


def _write_page(args: argparse.Namespace, section: dict) -> None:
    """The benchmark page (--json, --markdown; a --quick run: --page-json, the defaults) with `section` as its
    CPU's (a full run), or with its rows in its CPU's section (a --quick run: `report.merge_rows`)."""
    json_path = Path((args.page_json if args.quick else args.json) or "docs/benchmark.json")
    merge = report.merge_rows if args.quick else report.merge_runs
    page = merge(json.loads(json_path.read_text()) if json_path.exists() else None, section)
    report.write_json(page, json_path)
    markdown_path = Path(args.markdown or "docs/benchmark.md")
    atomic_write_text(markdown_path, report.markdown(page), "benchmark page")
    print(f"wrote {json_path} and {markdown_path}")


def operators(args: argparse.Namespace, device: torch.device, precisions: list[str]) -> dict:
    """`simmim bench --ops`: the operator account of each side's step per precision, printed, and written to
    --markdown / --json when given."""
    if device.type != "cpu":
        raise SystemExit("simmim bench --ops: profiles CPU steps (the profiler's self times are CPU times); "
                         "use --device cpu")
    peer = peer_runner(args.peers, _here)
    load_start = os.getloadavg()[0]
    profiles, lines = {}, [f"## {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}", ""]
    for precision in precisions:
        print(f"operators of each side's step: {args.model} batch {args.batch} {precision}", flush=True)
        overrides = {"img_size": args.img_size} if args.img_size else {}
        profiles[precision] = (peer or _here)(ops.profile, args.model, args.batch, precision, args.repeats,
                                              peer is not None, **overrides)
        title = f"{SHORT.get(args.model, args.model)}, batch {args.batch}, {precision}"
        lines += [*ops.markdown(profiles[precision], title), ""]
    command = " ".join(["simmim bench --ops", *(f"{k} {v}" for k, v in (
        ("--precision", args.precision), ("--threads", args.threads), ("--repeats", args.repeats)) if v)])
    lines[1:1] = ["", f"Produced by `{command}` on {datetime.date.today()} (load average {load_start:.1f} at the "
                      f"start, {os.getloadavg()[0]:.1f} at the end"
                      + ("; mmpretrain from `make bench-peers`'s venv)." if peer else ").")]
    print("\n".join(lines))
    if args.markdown:
        path = Path(args.markdown)
        atomic_write_text(path, ops.merge_page(path.read_text() if path.exists() else None, lines,
                                               cpu_model(isa=False)), "operator tables")
    if args.json:
        report.write_json({p: {side: asdict(profile) for side, profile in by_side.items()}
                           for p, by_side in profiles.items()}, args.json)
    return profiles
