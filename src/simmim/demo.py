"""The main job (`simmim demo`, `make demo`): does SimMIM pretraining help on real data?

SimMIM-pretrains a small Swin on the 60,000 Fashion-MNIST training images without their labels,
fine-tunes it on a balanced labelled subset (100 per class by default), trains the same classifier
from scratch on the same labels with the same recipe and budget, and writes a report folder:
summary.md with the accuracy table on the 10,000 test images, loss curves and a reconstruction
grid as PNG, and summary.json with every number.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .config import load_config, task_overrides
from .engine import finetune, pretrain
from .engine.logging import format_duration, read_metrics
from .hardware import cpu_model
from .viz import save_curves

PRETRAIN_PRESET, FINETUNE_PRESET = "fashion-mnist-pretrain", "fashion-mnist-finetune"


@dataclass
class DemoSettings:
    """What one demo run trains; the presets hold the rest of the recipe."""

    out: Path = Path("report")
    seed: int = 0
    labels_per_class: int = 100
    pretrain_epochs: int | None = None
    """None keeps the preset's."""
    finetune_epochs: int | None = None
    precision: str = "auto"
    """runtime.precision of all three runs: auto is bf16 where the CPU has bf16 matrix units (docs/results/
    precision.md: within fp32's seed spread on Fashion-MNIST, in half the time), fp32 elsewhere."""
    extra: tuple[str, ...] = ()
    """More `--set` overrides, applied to all three runs (e.g. data.num_workers=0); a key that one task
    alone reads (mask.ratio, data.labels_per_class) to the runs of that task."""


def _overrides(s: DemoSettings, task: str, run: str, epochs: int | None, *more: str) -> list[str]:
    """The run's overrides; of `extra`, those its task reads (a pretraining key is not meant for fine-tuning)."""
    out = [f"out_dir={s.out / run}", f"runtime.seed={s.seed}", f"runtime.precision={s.precision}", *more,
           *task_overrides(s.extra, task)]
    # a shorter schedule keeps the presets' warmup share (10%)
    return out + ([f"schedule.epochs={epochs}", f"schedule.warmup_epochs={epochs // 10}"] if epochs else [])


def pretrain_run(s: DemoSettings):
    return pretrain(load_config(PRETRAIN_PRESET, overrides=_overrides(s, "pretrain", "pretrain", s.pretrain_epochs)),
                    overwrite=True)


def finetune_run(s: DemoSettings, name: str, pretrained: Path | None):
    """Fine-tuning from `pretrained`, or from scratch (then without layer-wise lr decay, which only
    makes sense for pretrained layers)."""
    init = [f"model.pretrained={pretrained}"] if pretrained else ["optim.layer_decay=1.0"]
    subset = [f"data.labels_per_class={s.labels_per_class}", f"data.seed={s.seed}"]
    overrides = _overrides(s, "finetune", name, s.finetune_epochs, *subset, *init)
    return finetune(load_config(FINETUNE_PRESET, overrides=overrides), overwrite=True)


def run_demo(settings: DemoSettings) -> dict:
    """Pretrain, fine-tune, train from scratch, and write the report; returns summary.json's data."""
    s, start = settings, time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"== 1/3 SimMIM pretraining on the 60,000 Fashion-MNIST training images (labels unused) -> {s.out}")
    pre = pretrain_run(s)
    print("== 2/3 fine-tuning the pretrained encoder on "
          f"{10 * s.labels_per_class} labelled images")
    tuned = finetune_run(s, "finetune-simmim", pre.checkpoint)
    print(f"== 3/3 the same classifier from scratch on the same {10 * s.labels_per_class} labelled images")
    scratch = finetune_run(s, "finetune-scratch", None)
    threads = torch.get_num_threads()  # as the runs set it
    summary = {
        "command": "simmim demo", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}",
        "precision": pre.precision,
        "seed": s.seed, "labels": 10 * s.labels_per_class, "test_images": 10_000,
        "pretrain": {"epochs": pre.epochs, "seconds": round(pre.seconds, 1), **pre.metrics},
        "scratch": {"epochs": scratch.epochs, "seconds": round(scratch.seconds, 1), **scratch.metrics},
        "simmim": {"epochs": tuned.epochs, "seconds": round(tuned.seconds, 1), **tuned.metrics},
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(s.out, summary)
    return summary


def write_report(out: Path, summary: dict) -> None:
    """summary.json, summary.md and the PNGs it shows."""
    pre = read_metrics(out / "pretrain", "train")
    held = read_metrics(out / "pretrain", "eval")
    save_curves({"training loss (masked pixels)": ([r["step"] for r in pre], [r["loss"] for r in pre])},
                out / "pretrain_loss.png", xlabel="optimizer step", title="SimMIM pretraining on Fashion-MNIST")
    if held:
        save_curves({"held-out masked-pixel L1": [r["heldout_loss"] for r in held]}, out / "heldout_loss.png",
                    xlabel="epoch", title="Reconstruction loss on 256 test images")
    runs = {"SimMIM-pretrained": out / "finetune-simmim", "from scratch": out / "finetune-scratch"}
    tuned = {name: read_metrics(path, "train") for name, path in runs.items()}
    save_curves({name: ([r["step"] for r in rs], [r["loss"] for r in rs]) for name, rs in tuned.items()},
                out / "finetune_loss.png", xlabel="optimizer step", title="Fine-tuning loss")
    grids = sorted((out / "pretrain" / "reconstructions").glob("epoch_*.png"))
    if grids:
        (out / "reconstruction.png").write_bytes(grids[-1].read_bytes())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    sc, sm = summary["scratch"], summary["simmim"]
    heldout = f"{held[0]['heldout_loss']:.4f} after epoch 1 -> {held[-1]['heldout_loss']:.4f} after epoch {len(held)}" \
        if held else "not measured"
    lines = [
        "# SimMIM on Fashion-MNIST",
        "",
        f"{summary['labels']} labelled training images (balanced, seed {summary['seed']}); accuracy on the "
        f"{summary['test_images']:,} test images after the last fine-tuning epoch. Pretraining used the 60,000 "
        f"training images without labels for {summary['pretrain']['epochs']} epochs.",
        "",
        "| classifier | top-1 | top-5 | fine-tuning epochs | time |",
        "|---|---|---|---|---|",
        f"| from scratch | {sc['top1']:.2f} | {sc['top5']:.2f} | {sc['epochs']} | {format_duration(sc['seconds'])} |",
        f"| SimMIM-pretrained | {sm['top1']:.2f} | {sm['top5']:.2f} | {sm['epochs']} | "
        f"{format_duration(sm['seconds'])} (+ {format_duration(summary['pretrain']['seconds'])} pretraining) |",
        "",
        f"Difference: {sm['top1'] - sc['top1']:+.2f} points of top-1.",
        "",
        f"Held-out reconstruction loss (masked-pixel L1 on 256 test images, fixed masks): {heldout}.",
        "",
        "![reconstructions](reconstruction.png)",
        "",
        "Reconstructions of held-out test images: original | masked | reconstruction | reconstruction pasted "
        "into the masked patches.",
        "",
        "![pretraining loss](pretrain_loss.png) ![held-out loss](heldout_loss.png)",
        "![fine-tuning loss](finetune_loss.png)",
        "",
        f"Produced by `{summary['command']}` on {summary['date']} ({summary['machine']}) in "
        f"{format_duration(summary['seconds'])}, in {summary['precision']}. Run folders: pretrain/, finetune-simmim/, "
        "finetune-scratch/.",
        "",
        f"Try the pretrained model on your own images: `simmim serve {out / 'pretrain'}`.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"report: {out / 'summary.md'}  (scratch {sc['top1']:.2f} vs SimMIM {sm['top1']:.2f} top-1)")
