"""`simmim bench --ops`: where each side's pretraining step spends its time, operator by operator, so
that a speed gap between ours and HF's or mmpretrain's step can be read as the operators that make it.

Each side's step is timed without the profiler (the step time, as the comparison times it), then
profiled (the operators' self CPU time: time inside an operator and not inside the operators it calls,
so the times of a step add up without double counting). The sides alternate in both."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..measure import cpu_profile
from .measure import GEMM_OPS, alternate
from .pair import build_sides

SIDE_NAMES = {"ours": "ours", "ref": "HF", "mm": "mmpretrain"}

# operator name -> category; an operator without the aten:: prefix is an autograd function's or the
# engine's own record (Python and bookkeeping), and the aten:: operators not named here are elementwise
CATEGORIES: dict[str, frozenset[str]] = {
    "GEMM": GEMM_OPS,
    "softmax": frozenset({"aten::_softmax", "aten::_softmax_backward_data"}),
    "layer norm": frozenset({"aten::native_layer_norm", "aten::native_layer_norm_backward"}),
    "GELU": frozenset({"aten::gelu", "aten::gelu_backward"}),
    "copies and layout": frozenset({
        "aten::copy_", "aten::clone", "aten::cat", "aten::index_select", "aten::index", "aten::gather",
        "aten::roll", "aten::constant_pad_nd", "aten::fill_", "aten::zero_", "aten::im2col", "aten::col2im",
        "aten::repeat_interleave", "aten::pixel_shuffle", "aten::index_put_", "aten::scatter_add_"}),
    "reductions": frozenset({"aten::sum", "aten::mean"}),
    "optimizer": frozenset({"aten::_fused_adamw_"}),
}
ELEMENTWISE, FRAMEWORK, UNPROFILED = "elementwise and other aten", "autograd functions and engine", "outside operators"
CATEGORY_ORDER = (*CATEGORIES, ELEMENTWISE, FRAMEWORK, UNPROFILED)


@dataclass(frozen=True)
class OpTime:
    name: str
    seconds: float
    """Self CPU seconds per step."""
    calls: int
    """Calls per step."""


@dataclass(frozen=True)
class StepProfile:
    """One side's step: its time without the profiler and its operators' self times with it."""

    side: str
    step_s: float
    """Median seconds of an unprofiled step."""
    profiled_s: float
    """Median seconds of a profiled step: the operators' self times plus what lies outside any operator."""
    ops: tuple[OpTime, ...]


def category(op: str) -> str:
    for name, members in CATEGORIES.items():
        if op in members:
            return name
    return ELEMENTWISE if op.startswith("aten::") else FRAMEWORK


def by_category(profile: StepProfile) -> dict[str, float]:
    """Seconds per step by category; they add up to the profiled step (UNPROFILED: Python and waiting
    outside any operator, what the profiled step takes beyond its operators' self times)."""
    seconds = dict.fromkeys(CATEGORY_ORDER, 0.0)
    for op in profile.ops:
        seconds[category(op.name)] += op.seconds
    seconds[UNPROFILED] = profile.profiled_s - sum(op.seconds for op in profile.ops)
    return seconds


def differences(a: StepProfile, b: StepProfile, top: int = 15) -> list[tuple[str, OpTime, OpTime]]:
    """The `top` operators whose per-step self time differs most between a and b, largest first, each as
    (name, a's, b's); an operator one side does not run has zero time and calls there."""
    ops_a, ops_b = ({op.name: op for op in p.ops} for p in (a, b))
    rows = [(name, ops_a.get(name, OpTime(name, 0.0, 0)), ops_b.get(name, OpTime(name, 0.0, 0)))
            for name in ops_a.keys() | ops_b.keys()]
    return sorted(rows, key=lambda r: (-abs(r[1].seconds - r[2].seconds), r[0]))[:top]


def _profiled(step: Callable[[], object]) -> tuple[float, dict[str, tuple[float, int]]]:
    with cpu_profile() as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return seconds, {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}


def profile_steps(steps: dict[str, Callable[[], object]], repeats: int = 4, warmup: int = 1,
                  progress: Callable[[str], None] = print) -> dict[str, StepProfile]:
    """Each side's StepProfile (CPU steps): the steps timed as the comparison times them (`warmup` rounds,
    then `repeats` alternating rounds), then `repeats` alternating rounds of profiled steps; per operator
    the median over the profiled steps."""
    progress(f"  timing {repeats} steps per side")
    walls = alternate(steps, torch.device("cpu"), warmup, repeats).wall
    profiled = {side: [] for side in steps}
    records = {side: [] for side in steps}
    for i in range(repeats):
        progress(f"  profiling round {i + 1}/{repeats}: {', '.join(SIDE_NAMES[s] for s in steps)}")
        for side, step in steps.items():
            seconds, ops = _profiled(step)
            profiled[side].append(seconds)
            records[side].append(ops)
    out = {}
    for side in steps:
        names = set().union(*records[side])
        ops = tuple(OpTime(name, statistics.median(r.get(name, (0.0, 0))[0] for r in records[side]),
                           max(r.get(name, (0.0, 0))[1] for r in records[side])) for name in sorted(names))
        out[side] = StepProfile(side, statistics.median(walls[side]), statistics.median(profiled[side]), ops)
    return out


def profile(name: str, batch_size: int, precision: str, repeats: int, peer: bool, **overrides
            ) -> dict[str, StepProfile]:
    """The StepProfiles of ours, HF's and (if `peer`) mmpretrain's step on zoo model `name` (overrides
    change its encoder, e.g. img_size), on the CPU: the profiler's self times are CPU times."""
    _, steps = build_sides(name, batch_size, precision, torch.device("cpu"), reference=True, peer=peer, **overrides)
    print(f"  {name} batch {batch_size} {precision}: {' and '.join(SIDE_NAMES[s] for s in steps)} built", flush=True)
    return profile_steps(steps, repeats, progress=lambda line: print(line, flush=True))


def markdown(profiles: dict[str, StepProfile], title: str, top: int = 15) -> list[str]:
    """The categories side by side with ours minus each peer, then per peer the operators that differ most."""
    peers = [s for s in profiles if s != "ours"]
    ours = profiles["ours"]
    cats = {side: by_category(p) for side, p in profiles.items()}
    head = " | ".join(SIDE_NAMES[s] + " s" for s in profiles)
    diffs = " | ".join(f"ours - {SIDE_NAMES[s]}" for s in peers)
    lines = [f"### {title}", "",
             "Step without the profiler: " + ", ".join(f"{SIDE_NAMES[s]} {p.step_s:.3f} s" for s, p in profiles.items())
             + "; " + ", ".join(f"over {SIDE_NAMES[s]} {profiles[s].step_s / ours.step_s:.2f}x" for s in peers) + ".",
             "", f"| category | {head} | {diffs} |", "|---|" + "---|" * (len(profiles) + len(peers))]
    for cat in (*CATEGORY_ORDER, "profiled step"):
        value = {s: (p.profiled_s if cat == "profiled step" else cats[s][cat]) for s, p in profiles.items()}
        lines.append(f"| {cat} | " + " | ".join(f"{value[s]:.3f}" for s in profiles) + " | "
                     + " | ".join(f"{value['ours'] - value[s]:+.3f}" for s in peers) + " |")
    for peer in peers:
        name = SIDE_NAMES[peer]
        lines += ["", f"Operators that differ most, ours against {name} (self seconds per step, calls):", "",
                  f"| operator | category | ours s | calls | {name} s | calls | ours - {name} |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {op} | {category(op)} | {a.seconds:.4f} | {a.calls} | {b.seconds:.4f} | {b.calls} | "
                  f"{a.seconds - b.seconds:+.4f} |" for op, a, b in differences(ours, profiles[peer], top)]
    return lines


TITLE = "# Each side's step by operator"
INTRO = ("One section per CPU (`simmim bench --ops --markdown docs/ops.md` replaces only the section of the CPU it "
         "runs on). Self CPU seconds per step, median of the profiled steps per side, sides alternated; the step "
         "times above each table are unprofiled, as the comparison on [benchmark.md](benchmark.md) times them. "
         "[kernels.md](kernels.md) reads them.")


def section_cpu(heading: str) -> str:
    """The CPU of a section heading ('## NAME (family F, model M; ISA...), ...') as `cpu_model(isa=False)`
    names it."""
    match = re.match(r"## (.*?\(family \d+, model \d+)", heading)
    return f"{match.group(1)})" if match else heading


def merge_page(text: str | None, section: list[str], cpu: str) -> str:
    """The operator page `text` (None: a new one) with `section` (its lines, from its '## ' heading on) in place
    of the section of the same CPU (`cpu`: `cpu_model(isa=False)`), or added after the others."""
    lines = (text or f"{TITLE}\n\n{INTRO}\n").rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    head = lines[:starts[0]] if starts else lines
    sections = [lines[a:b] for a, b in zip(starts, [*starts[1:], len(lines)][:len(starts)], strict=True)]
    body = [s for s in sections if section_cpu(s[0]) != cpu]
    at = next((i for i, s in enumerate(sections) if section_cpu(s[0]) == cpu), len(body))
    merged = [*_trimmed(head), ""] + [line for s in [*body[:at], section, *body[at:]] for line in [*_trimmed(s), ""]]
    return "\n".join(merged).rstrip("\n") + "\n"


def _trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines = lines[:-1]
    return lines
