"""The `pretrain`, `finetune` and `evaluate` subcommands, for the `simmim` CLI to mount with `add_commands`."""

from __future__ import annotations

import argparse
import sys

from ..config import PRESETS, TrainConfig, load_config, source_recipe
from ..errors import UsageError

# the training modules are imported inside the commands: mounting them must not slow down the CLI

EPILOG = """\
examples:
  simmim {task} --preset {preset} --data DIR
  simmim {task} --config configs/{preset}.yaml --set optim.lr=1e-4 --set data.batch_size=64
  simmim {task} --out RUN_DIR --resume auto            # continue a run, config from its checkpoint
  simmim {task} --preset {preset} --data DIR --pretrained CKPT
  torchrun --nproc_per_node 8 -m simmim.cli {task} --preset {recipe} --data DIR

presets: {presets} (or a zoo model name: that model with its recipe)
"""


SOURCES = ("a checkpoint file or folder of any supported layout, a zoo name with published weights, or "
           "hf-hub:ORG/NAME[@REVISION][:FILE]")
NO_PRESET = "; without --preset/--config, the architecture the source names, with its recipe"
PRETRAINED_HELP = {
    "pretrain": f"continue pretraining from these weights: encoder, mask token and decoder ({SOURCES}); a "
                f"checkpoint without a decoder or mask token starts them fresh{NO_PRESET}",
    "finetune": f"initialize from these weights' encoder (a pretraining run's folder or checkpoint, or {SOURCES})"
                f"{NO_PRESET}",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `pretrain`, `finetune` and `evaluate` to an argparse subparsers object; each sets `func`."""
    for task, func, summary, recipe in (
        ("pretrain", _pretrain, "SimMIM pretraining (masked image modeling)", "swin-base-pretrain-100e"),
        ("finetune", _finetune, "fine-tune a classifier, from pretrained weights or from scratch",
         "swin-base-finetune-224"),
    ):
        p = subparsers.add_parser(task, help=summary, description=summary,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=EPILOG.format(task=task, preset=f"nano-{task}", recipe=recipe,
                                                       presets=", ".join(PRESETS)))
        p.add_argument("--preset", metavar="NAME", help="recipe to start from (see below)")
        p.add_argument("--config", metavar="FILE.yaml", help="config file; it may name its own preset")
        p.add_argument("--data", metavar="DIR|fashion-mnist",
                       help="image folder (train/, val/ with class folders; any folder of images or a list "
                            "file for pretraining) or the built-in fashion-mnist")
        p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<preset>-<timestamp>)")
        p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                       help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
        p.add_argument("--resume", metavar="auto|PATH",
                       help="continue from the newest checkpoint in RUN_DIR (auto) or from a file")
        p.add_argument("--overwrite", action="store_true",
                       help="start afresh in a RUN_DIR that holds a run, removing its checkpoints, config and "
                            "metrics (without it such a folder is refused)")
        p.add_argument("--pretrained", metavar="SRC", help=PRETRAINED_HELP[task])
        p.add_argument("--epochs", type=int, metavar="N", help="same as --set schedule.epochs=N")
        p.add_argument("--batch-size", type=int, metavar="N", help="images per process (--set data.batch_size=N)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (same as --set runtime.device=...)")
        p.set_defaults(func=func)

    p = subparsers.add_parser("evaluate", help="top-1 / top-5 accuracy of a fine-tuned classifier",
                              description="top-1 / top-5 accuracy and loss of a fine-tuned classifier")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a checkpoint written by `simmim finetune`, a folder written by `simmim export` (or "
                        "hf-hub:ORG/NAME holding one), or with --model any weights source: a published "
                        "checkpoint (official, mmpretrain or HF layout), hf-hub:ORG/NAME[@REVISION][:FILE]")
    p.add_argument("--model", metavar="NAME", help="zoo name of a published checkpoint's architecture")
    p.add_argument("--data", required=True, metavar="DIR|fashion-mnist",
                   help="DIR/val (or DIR) with one folder per class, or fashion-mnist (its test split)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_evaluate)


def config_from_args(args: argparse.Namespace, task: str) -> TrainConfig:
    """The run's config: preset and/or YAML (or, resuming without either, the checkpoint's own config),
    then --set overrides, then the explicit flags."""
    flags = {"data.path": args.data, "schedule.epochs": args.epochs, "data.batch_size": args.batch_size,
             "runtime.device": args.device, "model.pretrained": args.pretrained,
             "checkpoint.resume": args.resume, "out_dir": args.out}
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.resume == "auto" and not args.out:
        raise UsageError("--resume auto needs --out RUN_DIR (the run to continue)")
    base = None
    pretrained = args.pretrained
    if not args.preset and not args.config and pretrained and not args.resume:
        base = source_recipe(pretrained, task)  # the architecture the checkpoint names, with its recipe
        print(f"{task}: {base['model']['name']} with its recipe (the architecture of {pretrained})")
    elif not args.preset and not args.config:
        if not args.resume:
            raise UsageError(f"pass --preset NAME or --config FILE.yaml (presets: {', '.join(PRESETS)})")
        from ..checkpoint import training as checkpoints

        path = checkpoints.resume_path(args.resume, args.out or ".")
        if path is None:
            raise FileNotFoundError(f"--resume auto: no checkpoint in {args.out}; pass --preset or --config to start")
        base = checkpoints.load(path)["config"]
    cfg = load_config(args.preset, args.config, overrides, base=base)
    if cfg.task != task:
        raise UsageError(f"{cfg.preset or args.config} is a {cfg.task} recipe; run `simmim {cfg.task}`")
    return cfg


def _train(args: argparse.Namespace, task: str) -> None:
    from .finetuning import finetune
    from .loop import NonFiniteLossError, RunInterrupted
    from .pretraining import pretrain

    cfg = config_from_args(args, task)
    try:
        (pretrain if task == "pretrain" else finetune)(cfg, overwrite=args.overwrite)
    except NonFiniteLossError as err:  # not a usage error: exit 1 with the message, no traceback
        raise SystemExit(f"simmim: error: {err}") from None
    except RunInterrupted as err:
        print(f"simmim: {err}", file=sys.stderr)
        raise SystemExit(err.exit_status) from None


def _pretrain(args: argparse.Namespace) -> None:
    _train(args, "pretrain")


def _finetune(args: argparse.Namespace) -> None:
    _train(args, "finetune")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate

    metrics = evaluate(args.checkpoint, args.data, batch_size=args.batch_size, device=args.device, model=args.model,
                       log=print)
    print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
          f"({metrics['images']} images)")
