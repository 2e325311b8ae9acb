"""`simmim plan`: the planner's command line."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from ..errors import UsageError
from .estimate import PlanConfig, plan, profile_model
from .hardware import GPUS
from .report import as_json, markdown, text


def gpu_counts(value: str) -> list[int]:
    """'8,16,32' -> [8, 16, 32]."""
    try:
        counts = [int(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--gpus {value!r}: expected a count or comma-separated counts, e.g. 8,16,32") from None
    return counts


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `plan` on the `simmim` command's subparsers."""
    p = subparsers.add_parser("plan", help="per-GPU memory and step time under DDP / FSDP / FSDP+checkpointing")
    p.add_argument("models", nargs="+", metavar="MODEL", help="zoo name(s)")
    p.add_argument("--gpus", default="8", help="GPU count or counts, e.g. 8,16,32,64")
    p.add_argument("--batch", type=int, default=64, help="images per GPU")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--utilization", type=float, default=0.4, help="assumed fraction of the peak FLOP rate")
    p.add_argument("--json", action="store_true", help="plain data instead of the table")
    p.add_argument("--markdown", metavar="PATH", help="write the plans as a Markdown page")
    p.add_argument("--check", action="store_true",
                   help="with --markdown: also check against small models' peaks measured here (1 and 2 processes)")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> None:
    counts = gpu_counts(args.gpus)
    sections = []
    for model in args.models:
        configs = [PlanConfig(model, n, args.batch, args.precision, args.gpu, args.utilization)
                   for n in counts]  # validates every input before the measurement
        profile = profile_model(configs[0].model, args.batch, args.precision)
        sections.append([plan(cfg, profile) for cfg in configs])
    if args.json:
        print(json.dumps([p for plans in sections for p in as_json(plans)], indent=2))
    else:
        print("\n\n".join(text(plans) for plans in sections))
    if args.markdown:
        checks = []
        if args.check:
            from .validate import CASES, SHARDED_CASES, check, sharded_check

            checks = [check(*case) for case in CASES] + [sharded_check(*case) for case in SHARDED_CASES]
        command = shlex.join(["simmim", "plan", *args.models, "--gpus", args.gpus, "--batch", str(args.batch),
                              "--precision", args.precision, "--gpu", args.gpu, "--markdown", args.markdown]
                             + (["--check"] if args.check else []))
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(sections, checks, command))
        print(f"wrote {args.markdown}")
