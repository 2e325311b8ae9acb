"""The `simmim` command: one subcommand per job; bad input as one line with exit status 2, a bug as its
traceback with exit status 1."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import UsageError


def _models(args: argparse.Namespace) -> None:
    from .zoo import SPECS, list_models, measured

    names = set(list_models(args.pattern or "*"))
    rows = measured([s for s in SPECS if s.name in names])
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':60s} {'task':14s} {'size':>4s} {'params':>13s} {'GFLOPs':>7s} {'(@px)':>5s} {'top-1':>5s}  weights")
    for r in rows:
        top1 = f"{r['top1']:.1f}" if r["top1"] else "-"
        print(f"{r['name']:60s} {r['task']:14s} {r['input_size']:4d} {r['params']:13,d} "
              f"{r['flops'] / 1e9:7.2f} {r['flops_input_size']:5d} {top1:>5s}  {weights_column(r)}")


def weights_column(row: dict) -> str:
    """Where a zoo model's weights are: a URL, a Hub repository (`hf-hub:` source), or '-'."""
    return row["weights"] or (f"hf-hub:{row['hub']}" if row["hub"] else "-")


def _demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(Path(args.out), args.seed, args.labels_per_class, args.pretrain_epochs,
                          args.finetune_epochs, args.precision, tuple(args.set)))


def _study(args: argparse.Namespace) -> None:
    from dataclasses import replace
    from pathlib import Path

    from .study import ABLATIONS, StudySettings, quick, run_study

    settings = StudySettings(Path(args.out), Path(args.work), ablations=ABLATIONS, extra=tuple(args.set),
                             only=args.only)
    settings = quick(settings) if args.quick else settings
    run_study(replace(settings, seeds=args.seeds) if args.seeds else settings)


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds like 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds like 0,1,2, got {text!r}")
    return seeds


def _class_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated class names, got {text!r}")
    return names


def _load_model(args: argparse.Namespace):
    """The model of `predict` / `reconstruct`, with the CLI's remedy when published weights are missing."""
    from .inference import load_model
    from .zoo.sources import WeightsUnavailable

    if args.random_weights:
        print("warning: --random-weights: the model is untrained and its output meaningless", file=sys.stderr)
    try:
        return load_model(args.model, args.weights, random_weights=args.random_weights,
                          random_decoder=getattr(args, "random_decoder", False))
    except WeightsUnavailable as err:
        raise UsageError(f"{err.reason}; pass --weights PATH to a local file "
                         "(or --random-weights to try the command on an untrained model)") from None


def _predict(args: argparse.Namespace) -> None:
    from .inference import class_names, inference_model

    model = _load_model(args)
    if not hasattr(model, "num_classes"):
        raise UsageError(f"{args.model} is a pretraining model: use `simmim reconstruct` for it")
    names = class_names(model)
    for image, result in zip(args.images, inference_model(model, list(args.images)), strict=True):
        top = result["pred_scores"].argsort()[::-1][: args.topk]
        print(image)
        print(f"  {'rank':>4s}  {'score':>6s}  {'label':>5s}  class")
        for rank, label in enumerate(top, 1):
            print(f"  {rank:4d}  {result['pred_scores'][label]:.4f}  {label:5d}  {names[label]}")


def _reconstruct(args: argparse.Namespace) -> None:
    import torch
    from torchvision.transforms.functional import to_tensor

    from .inference import checkpoint_mask_settings, inference_model, set_mask
    from .viz import save_grid

    model = _load_model(args)
    if hasattr(model, "num_classes"):
        raise UsageError(f"{args.model} is a classifier: reconstructions need a pretraining model")
    # the mask the weights were trained with (a zoo model's default may differ), then the flags
    settings = checkpoint_mask_settings(args.weights) if args.weights else {}
    flags = {"mask_patch_size": args.mask_patch_size, "mask_ratio": args.mask_ratio}
    settings.update({k: v for k, v in flags.items() if v is not None})
    set_mask(model, **settings)
    print(f"mask: {model.mask_generator.mask_ratio:g} of {model.mask_generator.mask_patch_size} px blocks")
    result = inference_model(model, args.image, seed=args.seed)
    panels = torch.stack([to_tensor(result[k]) for k in ("original", "masked", "reconstruction", "pasted")])
    path = save_grid(panels.unsqueeze(0), args.out, scale=args.scale)
    print(f"masked-pixel L1 {result['loss']:.4f}; wrote {path}")


def _convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    if args.to == "hf" and not Path(args.dst).suffix:  # a directory: HF's config.json + model.safetensors
        _export_to(args.src, args.dst, args.model, "hf")
        return
    from .checkpoint.convert import convert
    from .zoo.sources import resolve

    src, dst = convert(resolve(args.src), args.dst, args.to)
    print(f"{args.src} ({src}) -> {args.dst} ({dst})")


def _export(args: argparse.Namespace) -> None:
    _export_to(args.checkpoint, args.out_dir, args.model, args.format)


def _export_to(checkpoint: str, out_dir: str, model_name: str | None, fmt: str) -> None:
    from .zoo.hub import export, get_model
    from .zoo.runs import architecture_of

    if model_name:
        model, name = get_model(model_name, pretrained=checkpoint), model_name
    else:  # a training run, its checkpoint or an exported folder describes its own model
        model, found = get_model(checkpoint), architecture_of(checkpoint)
        name = found.name if found else None
    if fmt == "hf":
        from .checkpoint.ecosystem import export_hf

        print(f"wrote {export_hf(model, out_dir)} (transformers: AutoModel.from_pretrained)")
    else:
        print(f"wrote {export(model, out_dir, name=name)}")


def _probe(args: argparse.Namespace) -> None:
    import torch

    from .engine.builders import eval_source, labelled_source
    from .engine.probe import ProbeSettings, load_encoder, probe_encoder, summary_line, write_result

    encoder = load_encoder(args.checkpoint, args.model)
    train = labelled_source(args.data, "train", args.labels_per_class, seed=args.seed, classes=args.classes,
                            key="--labels-per-class")
    val = eval_source(args.data, args.classes)
    if list(train.classes) != list(val.classes):
        raise UsageError(f"{args.data}: train and val name different classes")
    settings = ProbeSettings(k=args.k, temperature=args.temperature, epochs=args.epochs, seed=args.seed)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = probe_encoder(encoder, train, val, len(val.classes), settings, device, args.batch_size, log=print)
    result.update(checkpoint=args.checkpoint, model=args.model, data=args.data)
    if args.out:
        write_result(result, args.out)
    print(summary_line(result))


def _consolidate(args: argparse.Namespace) -> None:
    from .checkpoint.io import atomic_save_safetensors
    from .checkpoint.sharded import consolidate

    weights = consolidate(args.checkpoint)
    atomic_save_safetensors({k: v.contiguous() for k, v in weights.items()}, args.out, metadata={"format": "simmim"})
    print(f"wrote {args.out}: {len(weights)} tensors, {sum(v.numel() for v in weights.values()):,} values")


def _export_dataset(args: argparse.Namespace) -> None:
    from .data.export import export_dataset

    counts = export_dataset(args.name, args.out_dir, limit_per_class=args.limit_per_class, verbose=True,
                            format=args.format, shard_size=args.shard_size)
    print(f"wrote {args.out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def _verify_data(args: argparse.Namespace) -> int:
    from .data.verify import verify_images

    report = verify_images(args.path)
    for path, reason in report.bad:
        print(f"{path}: {reason}")
    print(f"{report.checked:,} images checked, {len(report.bad)} unusable")
    return 1 if report.bad else 0


def _serve(args: argparse.Namespace) -> None:
    from .serve.server import ServeSettings, serve

    serve(args.model, args.weights, args.random_weights,
          ServeSettings(args.host, args.port, args.max_upload_mb, args.max_pixels, verbose=args.verbose))


def _add_weights_arguments(parser: argparse.ArgumentParser,
                           random_help: str = "an untrained model (to try the command; its output is meaningless)"
                           ) -> None:
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="PATH",
                         help="checkpoint of any supported format or hf-hub:ORG/NAME[@REVISION][:FILE] "
                              "(default: the published weights)")
    weights.add_argument("--random-weights", action="store_true", help=random_help)


Subparsers = argparse._SubParsersAction


MODEL_HELP = ("zoo name, exported directory (or hf-hub:ORG/NAME holding one), training run folder (its newest "
              "checkpoint) or training checkpoint")


def _models_parser(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="the model zoo with measured params and FLOPs")
    p.add_argument("pattern", nargs="?", help="case-insensitive wildcard, e.g. 'swin-base*'")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p.set_defaults(func=_models)


def _demo_parser(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="the main job: SimMIM vs from-scratch on Fashion-MNIST, with a report")
    p.add_argument("--out", default="report", help="report folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels-per-class", type=int, default=100)
    p.add_argument("--pretrain-epochs", type=int, help="default: the preset's")
    p.add_argument("--finetune-epochs", type=int, help="default: the preset's")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the CPU has bf16 matrix units (AMX-BF16, AVX512-BF16), else fp32")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for all three runs")
    p.set_defaults(func=_demo)


def _study_parser(sub: Subparsers) -> None:
    p = sub.add_parser("study", help="the demo over 3 seeds and 2 label budgets, plus ablations -> docs/results")
    p.add_argument("--out", default="docs/results")
    p.add_argument("--work", default="runs/study", help="run folders and results.jsonl (resumable)")
    p.add_argument("--quick", action="store_true", help="a smoke-sized study on a few images")
    p.add_argument("--only", choices=["main", "ablations", "precision", "continue"],
                   help="main or ablations: that part (e.g. in two processes), no report; precision: the demo per "
                   "precision and seed -> precision.md; continue: continuing pretraining on a new domain -> "
                   "continue.md")
    p.add_argument("--seeds", type=_seed_list, metavar="0,1,2",
                   help="only these seeds (e.g. --only main --seeds 1,2 in a second process; the pretraining-length "
                   "curve and the ablations are seed 0's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.set_defaults(func=_study)


def _predict_parser(sub: Subparsers) -> None:
    p = sub.add_parser("predict", help="classify images")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("images", nargs="+")
    _add_weights_arguments(p)
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(func=_predict)


def _reconstruct_parser(sub: Subparsers) -> None:
    p = sub.add_parser("reconstruct", help="picture of a pretraining model's reconstruction of a masked image")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("image")
    p.add_argument("--out", default="reconstruction.png")
    _add_weights_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--mask-ratio", type=float, help="default: the checkpoint's (else the model's)")
    p.add_argument("--mask-patch-size", type=int, help="default: the checkpoint's (else the model's)")
    p.add_argument("--scale", type=int, default=1, help="enlarge the panels this many times")
    p.add_argument("--random-decoder", action="store_true",
                   help="accept --weights without a decoder (an encoder-only file): the pictures then come from "
                        "an untrained decoder")
    p.set_defaults(func=_reconstruct)


def _serve_parser(sub: Subparsers) -> None:
    p = sub.add_parser("serve", help="a local page and JSON API for a model's reconstructions or predictions")
    p.add_argument("model", help=MODEL_HELP)
    _add_weights_arguments(p, random_help="untrained weights (to try the page and API)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=25_000_000, help="largest image, width x height")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=_serve)


def _convert_parser(sub: Subparsers) -> None:
    p = sub.add_parser("convert", help="rewrite a checkpoint in another format")
    p.add_argument("src", help="weights source: a checkpoint of any supported format, a training run folder (its "
                               "newest checkpoint), an exported folder, a zoo name or hf-hub:ORG/NAME")
    p.add_argument("dst")
    p.add_argument("--to", default="simmim", choices=["official", "mmpretrain", "hf", "simmim", "timm"],
                   help="hf with a folder as dst writes config.json + model.safetensors for transformers")
    p.add_argument("--model", help="zoo name of the architecture (hf folders; not needed for simmim runs)")
    p.set_defaults(func=_convert)


def _export_parser(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="write model.safetensors + config.json for a checkpoint")
    p.add_argument("checkpoint", help="training run folder (its newest checkpoint), training checkpoint, or with "
                                      "--model a checkpoint of any supported format")
    p.add_argument("out_dir")
    p.add_argument("--model", help="zoo name of the checkpoint's architecture (not needed for simmim runs)")
    p.add_argument("--format", default="simmim", choices=["simmim", "hf"],
                   help="simmim (get_model reads it) or hf (transformers' from_pretrained reads it)")
    p.set_defaults(func=_export)


def _probe_parser(sub: Subparsers) -> None:
    p = sub.add_parser("probe", help="frozen-encoder k-NN and linear probe of a checkpoint or zoo model")
    p.add_argument("checkpoint", help="simmim run folder or checkpoint, exported folder (or hf-hub:ORG/NAME "
                                      "holding one), zoo name (published weights) or any weights source with --model")
    p.add_argument("--data", required=True, help="DIR with train/ and val/ class folders, or fashion-mnist")
    p.add_argument("--model", help="zoo name of the checkpoint's architecture (not needed for simmim runs)")
    p.add_argument("--labels-per-class", type=int, help="a balanced subset of the training images")
    p.add_argument("--classes", type=_class_list, metavar="NAME,NAME",
                   help="only these classes' images, as data.classes (e.g. 'Sandal,Sneaker,Bag,Ankle boot')")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN vote (DINO: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (DINO: 0.07)")
    p.add_argument("--epochs", type=int, default=100, help="linear-probe epochs on the cached features")
    p.add_argument("--batch-size", type=int, default=64, help="feature extraction batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=_probe)


def _consolidate_parser(sub: Subparsers) -> None:
    p = sub.add_parser("consolidate", help="one safetensors file of a sharded checkpoint's model weights")
    p.add_argument("checkpoint", help="a sharded checkpoint directory RUN_DIR/ckpt-<step>")
    p.add_argument("out", help="the .safetensors file to write")
    p.set_defaults(func=_consolidate)


def _verify_data_parser(sub: Subparsers) -> None:
    p = sub.add_parser("verify-data", help="decode every image of a dataset; name the unusable ones and why")
    p.add_argument("path", help="data folder (searched recursively), list file or WebDataset shards")
    p.set_defaults(func=_verify_data)


def _export_dataset_parser(sub: Subparsers) -> None:
    p = sub.add_parser("export-dataset", help="write a built-in dataset as an ImageFolder tree or WebDataset shards")
    p.add_argument("name", help="fashion-mnist, photos, or (for --format webdataset) an image folder")
    p.add_argument("out_dir")
    p.add_argument("--limit-per-class", type=int)
    p.add_argument("--format", choices=["folder", "webdataset"], default="folder")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per tar shard (webdataset)")
    p.set_defaults(func=_export_dataset)


# subcommands whose arguments are defined next to torch-importing code: mounted in full only when
# they run (or for a full parser), else by name and help, so that `simmim --help` starts fast
# (tests check these help lines against the modules' own)
HEAVY_COMMANDS = {
    "bench": ("simmim.bench", "time a pretraining step against HF transformers"),
    "plan": ("simmim.plan.command", "per-GPU memory and step time under DDP / FSDP / FSDP+checkpointing"),
}


def _heavy_parsers(sub: Subparsers, command: str | None) -> None:
    for name, (module, summary) in HEAVY_COMMANDS.items():
        if command in (None, name):
            importlib.import_module(module).add_command(sub)
        else:
            sub.add_parser(name, help=summary)


def _training_parsers(sub: Subparsers) -> None:
    from .engine import add_commands

    add_commands(sub)  # pretrain, finetune, evaluate


# the subcommands after models, training and the heavy ones, in the order `simmim --help` lists them
PARSERS = (_demo_parser, _study_parser, _predict_parser, _reconstruct_parser, _serve_parser, _convert_parser,
           _export_parser, _probe_parser, _consolidate_parser, _verify_data_parser, _export_dataset_parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `simmim` parser; `command` names the one subcommand that will run (None: all in full)."""
    parser = argparse.ArgumentParser(prog="simmim", description="SimMIM masked image modeling")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _models_parser(sub)
    _training_parsers(sub)
    _heavy_parsers(sub, command)
    for add in PARSERS:
        add(sub)
    return parser


TRAINING_COMMANDS = ("demo", "study", "pretrain", "finetune")


def _command_of(argv: list[str]) -> str:
    """The subcommand an argument list runs ("" for none, e.g. `--help`): its first non-option word."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser(_command_of(sys.argv[1:] if argv is None else argv)).parse_args(argv)
    if argv is None and args.command in TRAINING_COMMANDS:
        # glibc's malloc hands freed memory back and makes some CPU steps several times slower
        # (docs/kernels.md); restarting the command under jemalloc (when installed) keeps them
        # steady. Only for the real command line: a caller of main() in this process keeps its process.
        from .runtime import maybe_reexec_with_jemalloc

        maybe_reexec_with_jemalloc()
    status = run_command(args)
    from .runtime import exit_worker, is_torchrun_worker

    if is_torchrun_worker():
        exit_worker(status)
    return status


BUG_HINT = ("simmim: internal error: the traceback above is a bug in simmim, not a problem with your input; "
            "please report it with the command you ran")


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed command: its exit status; 2 with a one-line message for bad input (a `UsageError`)
    or for what the system refused (an `OSError`: a missing file, no permission, a full disk); 1 with
    the traceback and a request to report it for anything else, which is a bug."""
    try:
        from .hardware import requested_gemm_route

        requested_gemm_route()  # a bad SIMMIM_GEMM_ROUTE stops the command before it starts its work
        return args.func(args) or 0
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except (UsageError, OSError) as err:
        if args.debug:
            raise
        print(f"simmim: error: {err}", file=sys.stderr)
        return 2
    except Exception:
        if args.debug:
            raise
        import traceback

        traceback.print_exc()
        print(BUG_HINT, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
