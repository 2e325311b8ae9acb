"""The continuation part (`simmim study --only continue`): does continuing SimMIM pretraining on a new
domain's few unlabelled images pay, against the first domain's model as it is, pretraining on the new
domain alone for the same steps, and no pretraining? Fashion-MNIST split by class into two domains;
every arm is fine-tuned with the same recipe on the same few labels of the second, and its frozen
encoder probed there."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import torch

from ..hardware import cpu_model
from ..viz import save_bars
from .report import mean_std, precision_of, stats
from .runs import Runs

ARMS = {
    "as-is": "(a) first domain's model as it is",
    "continued": "(b) continued on the second domain",
    "target-only": "(c) second domain alone, same steps",
    "scratch": "(d) no pretraining",
}
"""The arms, by record name, with their table rows."""

PAIRS = (("continued", "as-is"), ("continued", "target-only"), ("continued", "scratch"), ("as-is", "scratch"),
         ("target-only", "scratch"))
"""The differences the report gives per seed: what continuing adds, and what each start adds to none."""


def _data(classes: tuple[str, ...], *more: str) -> tuple[str, ...]:
    return (f"data.classes={','.join(classes)}", *more)


def arm_runs(runs: Runs, seed: int) -> dict[str, dict]:
    """One seed's four arms: {arm: {"finetune": record, "probe": record}}, the continuation last (it
    needs the first domain's model and the second domain's images both)."""
    d = runs.s.domains
    target = _data(d.target, f"data.max_images={d.target_images}")

    def measured(arm: str, start: dict | None) -> dict:
        return {"finetune": runs.tuned(seed, f"domains-{arm}", d.budget, start, target),
                "probe": runs.probed(seed, f"domains-{arm}", d.budget, start, target)}

    first = runs.pretrained(seed, "domains-source", d.source_epochs, _data(d.source))
    return {"as-is": measured("as-is", first), "scratch": measured("scratch", None),
            "target-only": measured("target-only", runs.pretrained(seed, "domains-target-only", d.target_epochs,
                                                                   target)),
            "continued": measured("continued", runs.pretrained(seed, "domains-continued", d.target_epochs, target,
                                                               init=first))}


def continue_part(runs: Runs) -> dict:
    """Every seed's arms, then continue.md, continue.json and continue.png in the study's out folder."""
    per_seed = {seed: arm_runs(runs, seed) for seed in runs.s.seeds}
    return write_continue(runs, per_seed)


def write_continue(runs: Runs, per_seed: dict[int, dict[str, dict]]) -> dict:
    """The table (mean ± std over seeds, each seed's value in the JSON) and its bar chart."""
    s, d = runs.s, runs.s.domains
    measures = {"finetune": ("finetune", "top1"), "knn": ("probe", "knn_top1"), "linear": ("probe", "linear_top1")}
    summary = {arm: {m: stats([per_seed[seed][arm][kind][field] for seed in s.seeds])
                     for m, (kind, field) in measures.items()} for arm in ARMS}
    gaps = {f"{a} - {b}": stats([round(per_seed[seed][a]["finetune"]["top1"] - per_seed[seed][b]["finetune"]["top1"],
                                       2) for seed in s.seeds]) for a, b in PAIRS}
    _, per_class, epochs = d.budget
    machine = f"{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}"
    command = " ".join(["simmim study --only continue", *(f"--set {o}" for o in s.extra)])
    full = {"command": command, "machine": machine, "precision": precision_of(s), "seeds": list(s.seeds),
            "source": list(d.source), "target": list(d.target), "source_epochs": d.source_epochs,
            "target_images": d.target_images, "target_epochs": d.target_epochs, "labels_per_class": per_class,
            "finetune_epochs": epochs, "compute_hours": round(runs.hours(), 2), "arms": summary,
            "finetune_differences": gaps}
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "continue.json").write_text(json.dumps(full, indent=2) + "\n")
    names = {"finetune": "fine-tuned", "knn": "k-NN (frozen)", "linear": "linear probe (frozen)"}
    save_bars({names[m]: {ARMS[arm]: (summary[arm][m]["mean"], summary[arm][m]["std"]) for arm in ARMS}
               for m in measures}, s.out / "continue.png", ylabel="top-1 on the second domain's test images (%)",
              title="Continuing SimMIM pretraining on a new domain")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["# Continuing SimMIM pretraining on a new domain", "",
             f"Produced by `{command}` (report written {date}) on {machine}. Fashion-MNIST split by class: the "
             f"first domain is {', '.join(d.source)} (its training images pretrain for {d.source_epochs} epochs, "
             f"labels unused); the second is {', '.join(d.target)}, with {d.target_images:,} unlabelled training "
             f"images and {per_class} labels per class (drawn from its whole training split). Arms (b) and (c) "
             f"pretrain {d.target_epochs} epochs on those "
             f"images, (b) from the first domain's model, (c) from random weights; every arm is then fine-tuned "
             f"with the same recipe ({epochs} epochs) and tested on the second domain's test images, and its frozen "
             f"encoder is probed on the same labels (k-NN and linear probe, as `simmim probe`). Top-1, mean ± "
             f"standard deviation over seeds {', '.join(map(str, s.seeds))} (each seed draws its own pretraining, "
             f"labelled subset and fine-tuning). Precision: {full['precision']}. Compute: the runs' wall times add "
             f"up to {runs.hours():.1f} h.", "",
             "| arm | fine-tuned top-1 | k-NN top-1 | linear probe top-1 |", "|---|---|---|---|"]
    lines += [f"| {ARMS[arm]} | " + " | ".join(mean_std(summary[arm][m]) for m in measures) + " |" for arm in ARMS]
    lines += ["", "Differences of fine-tuned top-1 between arms, paired by seed:", "",
              "| difference | mean ± std | per seed |", "|---|---|---|"]
    lines += [f"| {ARMS[a].split(' ')[0]} {a} - {ARMS[b].split(' ')[0]} {b} | {mean_std(v)} | "
              f"{', '.join(f'{g:+.2f}' for g in v['seeds'])} |" for (a, b), v in zip(PAIRS, gaps.values(), strict=True)]
    lines += ["", "![continuation](continue.png)", ""]
    (s.out / "continue.md").write_text("\n".join(lines))
    print(f"continuation study written to {s.out / 'continue.md'}")
    return full
