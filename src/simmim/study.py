"""The fuller study (`simmim study`, `make study`): the demo's comparison over seeds and label budgets,
plus the paper's ablations at this scale, written to docs/results/.

Every run's result is appended to WORK/results.jsonl as it finishes, so an interrupted study picks up
where it stopped; the report is rebuilt from that file.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .cpu import cpu_model
from .demo import DemoSettings, finetune_run, pretrain_run
from .viz import save_bars


@dataclass(frozen=True)
class StudySettings:
    out: Path = Path("docs/results")
    work: Path = Path("runs/study")
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[tuple[str, int, int], ...] = (("1%", 60, 40), ("10%", 600, 8))
    """(name, labels per class, fine-tuning epochs): the same number of steps order for both budgets."""
    ablation_pretrain_epochs: int = 1
    """Ablations pretrain this long (the baseline of the ablation table too), fine-tune at 1%."""
    ablations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(table row, overrides of the pretraining); see ABLATIONS."""
    extra: tuple[str, ...] = ()
    only: str | None = None
    """'main' or 'ablations' runs just that part and writes no report (two processes or machines can
    share the work and results.jsonl); None runs what is missing of both and writes the report."""


# the paper's ablations at 48 px
ABLATIONS = (
    ("mask ratio 0.1", ("mask.ratio=0.1",)),
    ("mask ratio 0.3", ("mask.ratio=0.3",)),
    ("mask ratio 0.6 (paper)", ()),
    ("mask ratio 0.9", ("mask.ratio=0.9",)),
    ("mask patch 4 px (1/12 of the side)", ("mask.patch_size=4",)),
    ("mask patch 16 px (1/3 of the side)", ("mask.patch_size=16",)),
    ("2-layer MLP head", ("model.decoder=mlp",)),
    ("L2 loss", ("model.loss=l2",)),
)


def _done(results: Path) -> dict[str, dict]:
    """The finished runs recorded in results.jsonl, by key."""
    if not results.is_file():
        return {}
    return {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}


def _record(results: Path, key: str, **values) -> dict:
    record = {"key": key, **values}
    with results.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def run_study(s: StudySettings) -> dict:
    """Runs what results.jsonl does not have yet, then writes the report."""
    s.work.mkdir(parents=True, exist_ok=True)
    results = s.work / "results.jsonl"
    done = _done(results)

    def pretrained(seed: int, name: str, epochs: int | None, overrides: tuple[str, ...]) -> Path:
        key = f"pretrain/{name}/seed{seed}"
        if key not in done:
            demo = DemoSettings(s.work / key, seed, pretrain_epochs=epochs, extra=s.extra + overrides)
            run = pretrain_run(demo)
            done[key] = _record(results, key, checkpoint=str(run.checkpoint), **run.metrics)
        return Path(done[key]["checkpoint"])

    def tuned(seed: int, name: str, budget: tuple[str, int, int], init: Path | None) -> float:
        label, per_class, epochs = budget
        key = f"finetune/{name}/{label}/seed{seed}"
        if key not in done:
            demo = DemoSettings(s.work / key.replace("%", "pct"), seed, per_class, finetune_epochs=epochs,
                                extra=s.extra)
            run = finetune_run(demo, "", init)
            done[key] = _record(results, key, top1=run.metrics["top1"], top5=run.metrics["top5"])
        return done[key]["top1"]

    main: dict[str, dict[str, list[float]]] = {}
    for seed in s.seeds if s.only != "ablations" else ():
        checkpoint = pretrained(seed, "full", None, ())
        for budget in s.budgets:
            row = main.setdefault(budget[0], {"scratch": [], "simmim": []})
            row["scratch"].append(tuned(seed, "scratch", budget, None))
            row["simmim"].append(tuned(seed, "simmim", budget, checkpoint))
    ablations = {}
    for name, overrides in s.ablations if s.only != "main" else ():
        slug = name.split(" (")[0].replace(" ", "-")
        checkpoint = pretrained(0, f"ablation-{slug}", s.ablation_pretrain_epochs, overrides)
        ablations[name] = tuned(0, f"ablation-{slug}", s.budgets[0], checkpoint)
    return write_results(s, main, ablations) if s.only is None else {}


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0, "seeds": values}


def write_results(s: StudySettings, main: dict, ablations: dict[str, float]) -> dict:
    """docs/results/: summary.json, README.md (tables, command, machine, date) and the plots."""
    s.out.mkdir(parents=True, exist_ok=True)
    summary = {label: {run: _stats(values) for run, values in row.items()} for label, row in main.items()}
    (s.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_bars({label: {run: (v["mean"], v["std"]) for run, v in row.items()} for label, row in summary.items()},
              s.out / "accuracy.png", ylabel="test top-1 (%)", title="Fashion-MNIST: from scratch vs SimMIM")
    bars = {name: (acc, 0.0) for name, acc in ablations.items()}
    save_bars({f"{s.budgets[0][0]} labels": bars}, s.out / "ablations.png", ylabel="test top-1 (%)",
              title=f"Ablations ({s.ablation_pretrain_epochs}-epoch pretraining)")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}"
    command = " ".join(["simmim study", *(f"--set {o}" for o in s.extra)])
    lines = ["# Study: SimMIM pretraining on Fashion-MNIST", "",
             f"Produced by `{command}` (report written {date}) on {machine}. Test top-1 on the 10,000 "
             f"Fashion-MNIST test images after the last fine-tuning epoch, mean ± standard deviation over seeds "
             f"{', '.join(map(str, s.seeds))} (each seed draws its own labelled subset, weights and pretraining).",
             "", "| labels | from scratch | SimMIM-pretrained | difference |", "|---|---|---|---|"]
    for label, row in summary.items():
        sc, sm = row["scratch"], row["simmim"]
        lines.append(f"| {label} | {sc['mean']:.2f} ± {sc['std']:.2f} | {sm['mean']:.2f} ± {sm['std']:.2f} | "
                     f"{sm['mean'] - sc['mean']:+.2f} |")
    lines += ["", "![accuracy](accuracy.png)", "",
              f"Ablations (seed 0, {s.ablation_pretrain_epochs}-epoch pretraining, fine-tuned at {s.budgets[0][0]}):",
              "", "| pretraining | test top-1 |", "|---|---|"]
    lines += [f"| {name} | {acc:.2f} |" for name, acc in ablations.items()]
    lines += ["", "![ablations](ablations.png)", ""]
    (s.out / "README.md").write_text("\n".join(lines))
    print(f"study written to {s.out}")
    return summary


def quick(s: StudySettings) -> StudySettings:
    """A smoke-sized study (tests): two seeds, one budget, two ablations, small subsets, one-epoch runs."""
    return replace(s, seeds=(0, 1), budgets=(("1%", 3, 1),), ablations=ABLATIONS[2:4],
                   extra=s.extra + ("data.max_images=64", "data.heldout_images=16", "data.batch_size=16",
                                    "runtime.tensorboard=false", "runtime.vis_every=0"))
