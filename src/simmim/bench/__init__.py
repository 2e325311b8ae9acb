"""Benchmarks of the SimMIM pretraining step: ours against HF transformers on the same configuration,
weights and input, the cost curve over batch, image and model size, and the data pipeline's throughput.

    python -m simmim.bench                   # full run -> docs/benchmark.json, docs/benchmark.md
    python -m simmim.bench --quick --json quick.json
    python -m simmim.bench --precision bf16 --device cuda

transformers is a benchmark extra: it is imported only when the HF side is built.
"""

from __future__ import annotations

import argparse

from .run import add_arguments, full, quick, run

__all__ = ["add_command", "full", "main", "quick"]


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `bench` on the `simmim` command's subparsers."""
    parser = subparsers.add_parser("bench", help="time a pretraining step against HF transformers")
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def run_command(args: argparse.Namespace) -> None:
    """`simmim bench`: under jemalloc when it is installed (re-executes the command), then the benchmark."""
    from ..runtime import maybe_reexec_with_jemalloc

    maybe_reexec_with_jemalloc()
    run(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m simmim.bench`."""
    parser = argparse.ArgumentParser(prog="python -m simmim.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run_command(parser.parse_args(argv))
    return 0
