"""The `simmim` command."""

from __future__ import annotations

import argparse
import json
import sys


def _models(args: argparse.Namespace) -> None:
    from .zoo import SPECS, list_models, measure

    names = set(list_models(args.pattern or "*"))
    rows = [measure(s) for s in SPECS if s.name in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':60s} {'task':14s} {'size':>4s} {'params':>13s} {'GFLOPs':>7s} {'(@px)':>5s} {'top-1':>5s}  weights")
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] else "-"
        print(f"{r['name']:60s} {r['task']:14s} {r['input_size']:4d} {r['params']:13,d} "
              f"{r['flops'] / 1e9:7.2f} {r['flops_input_size']:5d} {top1:>5s}  {r['weights'] or '-'}")


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simmim", description="SimMIM masked image modeling")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="the model zoo with measured params and FLOPs")
    p.add_argument("pattern", nargs="?", help="case-insensitive wildcard, e.g. 'swin-base*'")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=_models)

    p = sub.add_parser("demo", help="the main job: a short pretraining with a reconstruction PNG")
    p.add_argument("--out", default="report")
    p.add_argument("--steps", type=int, default=300)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"simmim: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
