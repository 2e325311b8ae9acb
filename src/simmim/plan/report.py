"""The plan as a terminal table, as JSON, and as the Markdown page in docs/."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .estimate import Plan
from .validate import Check

GIB = 2**30
ASSUMPTIONS = [
    "Measured on the model itself (fake tensors, no memory used): parameters, FSDP2 units (each residual "
    "block, and the root), forward multiply-adds, the activations autograd saves for the backward (on "
    "the CUDA code path, autocast applied), and what the forward+backward holds on top of them at its "
    "peak (outputs, loss, backward temporaries, gradients produced by then; replayed on the CPU path).",
    "Modelled: parameters, gradients and AdamW's two moments in fp32; DDP copies the gradients into "
    "its buckets; FSDP2 shards all three, keeps the root unit gathered through the step and the "
    "largest block plus one prefetched gathered at a time, with their unsharded gradients; AdamW's "
    "foreach step needs one more fp32 copy of the (local) parameters for a moment.",
    "Activation checkpointing (+ac) keeps what is saved outside the blocks, each block's input and "
    "one block's recomputed activations (its peak replayed with checkpointing), and costs one more forward.",
    "Estimates: step time = max(compute, communication), compute = 6 (8 with checkpointing) x forward "
    "MACs x batch / (peak dense FLOP/s x utilisation); communication = ring collectives at the link's "
    "peak one-way rate (NVLink within 8 GPUs, the node's NIC per GPU beyond), fully overlapped.",
]

LIMITS = [
    "Without a GPU, SDPA's kernel choice is emulated: the CUDA path calls the memory-efficient "
    "attention op directly (as a GPU picks it for a float bias that needs a gradient), with SDPA's "
    "padding of the bias; not yet checked against a GPU's allocator.",
    "The CPU replay runs under a dispatch mode, where our fp32 linear layers take torch's GEMM instead "
    "of oneDNN's (the same saved tensors, other backward temporaries): the largest error below (-7%).",
    "The FSDP model is checked on 2 CPU processes only (gloo, small models, where the root unit is a "
    "large part of the parameters); its GPU figures also depend on NCCL's buffers, not modelled.",
    "Step times assume the utilisation given and fully overlapped communication; they are estimates, "
    "not measurements.",
]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(plans: Sequence[Plan]) -> list[list[str]]:
    """Rows of the plan table (header first)."""
    rows = [["GPUs", "strategy", "params", "grads", "optim", "activ", "peak GiB", "fits", "compute s",
             "comm GB", "comm s", "step s", "img/s"]]
    for p in plans:
        for s in p.strategies:
            rows.append([str(p.config.gpus), s.strategy, _gib(s.params), _gib(s.grads), _gib(s.optimizer),
                         _gib(s.activations), _gib(s.peak), "yes" if s.fits else "NO", f"{s.compute_s:.3f}",
                         f"{s.comm_bytes / 1e9:.2f}", f"{s.comm_s:.3f}", f"{s.step_s:.3f}", f"{s.images_per_s:,.0f}"])
    return rows


def header(plan: Plan) -> str:
    """One paragraph: model, batch, precision, device and the assumptions behind the times."""
    c, p, g = plan.config, plan.profile, plan.gpu
    return (f"{p.name}: {p.params:,} parameters, {p.macs / 1e9:.2f} GMACs per image (training forward); "
            f"{c.batch} images per GPU, {c.precision}, AdamW; {g.name} ({g.memory / GIB:.1f} GiB, "
            f"{g.flops(c.precision) / 1e12:.0f} TFLOP/s peak at {c.precision}, utilisation {c.utilization:.0%} "
            f"assumed); FSDP gathers in {'bf16' if c.precision == 'bf16' else 'fp32'}.")


def text(plans: Sequence[Plan]) -> str:
    """The terminal table (memory per GPU in GiB)."""
    rows = table(plans)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [header(plans[0]), ""]
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(cells)))
    return "\n".join(lines)


def _markdown_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |"
                                                                               for r in rows[1:]]


def markdown_section(plans: Sequence[Plan]) -> list[str]:
    """One model's section of docs/plan.md."""
    return [f"## {plans[0].profile.name}", "", header(plans[0]), "", *_markdown_table(table(plans)), ""]


def validation_section(checks: Sequence[Check]) -> list[str]:
    """The measured-vs-predicted table."""
    rows = [["model", "processes", "batch", "precision", "checkpointing", "measured MiB", "predicted MiB", "error"]]
    rows += [[c.model, "1" if c.processes == 1 else f"{c.processes} (FSDP2)", str(c.batch), c.precision,
              "yes" if c.checkpointing else "no", f"{c.measured / 2**20:.2f}", f"{c.predicted / 2**20:.2f}",
              f"{c.error:+.1%}"] for c in checks]
    return _markdown_table(rows)


def markdown(sections: Sequence[Sequence[Plan]], checks: Sequence[Check], command: str) -> str:
    """docs/plan.md: the plans of each model and the check against measured peaks."""
    lines = ["# Memory and throughput plan", "", f"Written by `{command}`.", "",
             "Memory per GPU in GiB (2^30 bytes); `peak` is the estimated peak allocated, the other columns "
             "what is held (the gradients fill in as activations are freed, so the peak is less than the "
             "sum). `fits`: peak within the GPU's memory.", ""]
    lines += [f"- {a}" for a in ASSUMPTIONS] + ["", "Limits:", ""] + [f"- {a}" for a in LIMITS] + [""]
    for plans in sections:
        lines += markdown_section(plans)
    if checks:
        lines += ["## Check against measured peaks", "",
                  "One training step (forward, backward, AdamW step, after a first step created AdamW's state) "
                  "on the CPU: the measured peak is what a process held before the step (parameters, buffers, "
                  "AdamW's state, the batch; its shards under FSDP2) plus the most the step allocated on top "
                  "of it (the profiler's allocation records, `measure.peak_memory`), the highest over "
                  "the processes; the prediction is the planner's figure for the same model, batch and "
                  "precision on the CPU path: one plain process, or FSDP2 as the engine wraps the model "
                  "(each block and the root; bf16 gathers under bf16) over 2 processes under torchrun with gloo.", ""]
        lines += validation_section(checks) + [""]
    return "\n".join(lines)


def as_json(plans: Sequence[Plan]) -> list[dict]:
    """Plain data of the plans."""
    return [dict(config=dataclasses.asdict(p.config), gpu=dataclasses.asdict(p.gpu),
                 profile={**dataclasses.asdict(p.profile), "saved_checkpointed": p.profile.saved.checkpointed},
                 strategies=[dataclasses.asdict(s) for s in p.strategies]) for p in plans]
