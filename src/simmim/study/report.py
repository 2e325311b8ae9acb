"""The study's reports in docs/results/: tables as Markdown and JSON, plots as PNG."""

from __future__ import annotations

import json
import os
import statistics
from datetime import datetime, timezone

import torch

from ..config import load_config, task_overrides
from ..demo import PRETRAIN_PRESET
from ..engine.distributed import pick_device
from ..hardware import auto_precision, cpu_model
from ..viz import save_bars, save_curves
from .runs import FINETUNE_EVALS
from .settings import StudySettings


def stats(values: list[float], digits: int = 2) -> dict:
    """Mean and standard deviation over seeds, rounded to `digits` (4 for losses, which differ in the third)."""
    return {"mean": round(statistics.fmean(values), digits),
            "std": round(statistics.stdev(values), digits) if len(values) > 1 else 0.0, "seeds": values}


def _curves(runs: list[dict]) -> list[float]:
    """The mean validation top-1 at each evaluation over seeds."""
    return [statistics.fmean(values) for values in zip(*([top1 for _, top1 in r["curve"]] for r in runs),
                                                                        strict=True)]


def precision_of(s: StudySettings) -> str:
    """The precision the study's runs trained in, and why (auto's choice names the CPU feature)."""
    runtime = load_config(PRETRAIN_PRESET, overrides=task_overrides(s.extra, "pretrain")).runtime
    if runtime.precision != "auto":
        return f"{runtime.precision} (runtime.precision={runtime.precision})"
    return auto_precision(pick_device(runtime.device))[1]


def mean_std(v: dict) -> str:
    return f"{v['mean']:.2f} ± {v['std']:.2f}"


def write_results(s: StudySettings, main: dict, probes: dict, lengths: dict, ablations: dict[str, float],
                  compute_hours: float) -> dict:
    """docs/results/: summary.json, README.md (tables, command, machine, date, precision, the added-up wall
    time of its pretraining and fine-tuning runs; the probes are not timed) and the plots."""
    s.out.mkdir(parents=True, exist_ok=True)
    summary = {label: {run: stats([r["top1"] for r in runs]) for run, runs in row.items()}
               for label, row in main.items()}
    probe_summary = {label: {f"{arm} {kind}": stats([r[f"{kind}_top1"] for r in runs])
                             for arm, runs in row.items() for kind in ("knn", "linear")}
                     for label, row in probes.items()}
    full = {"finetune": summary, "probe": probe_summary,
            "pretrain_length": {str(e): {"knn_top1": v["probe"]["knn_top1"], "linear_top1": v["probe"]["linear_top1"],
                                         "finetune_top1": v["finetune"]["top1"]} for e, v in lengths.items()}}
    (s.out / "summary.json").write_text(json.dumps(full, indent=2) + "\n")
    save_bars({label: {run: (v["mean"], v["std"]) for run, v in row.items()} for label, row in summary.items()},
              s.out / "accuracy.png", ylabel="test top-1 (%)", title="Fashion-MNIST: from scratch vs SimMIM")
    save_bars({label: {run: (v["mean"], v["std"]) for run, v in row.items()} for label, row in probe_summary.items()},
              s.out / "probes.png", ylabel="test top-1 (%)", title="Frozen encoder: random init vs SimMIM")
    curves = {f"{label} {run}": _curves(runs) for label, row in main.items() for run, runs in row.items()}
    save_curves(curves, s.out / "finetune_curves.png", xlabel=f"evaluation ({FINETUNE_EVALS} per run, last = "
                "final epoch)", ylabel="validation top-1 (%)", title="Fine-tuning: mean over seeds")
    bars = {name: (acc, 0.0) for name, acc in ablations.items()}
    save_bars({f"{s.budgets[0][0]} labels": bars}, s.out / "ablations.png", ylabel="test top-1 (%)",
              title=f"Ablations ({s.ablation_pretrain_epochs}-epoch pretraining)")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}"
    command = " ".join(["simmim study", *(f"--set {o}" for o in s.extra)])
    epochs = {label: e for label, _, e in s.budgets}
    lines = ["# Study: SimMIM pretraining on Fashion-MNIST", "",
             f"Produced by `{command}` (report written {date}) on {machine}. Test top-1 on the "
             f"Fashion-MNIST test images after the last fine-tuning epoch, mean ± standard deviation over seeds "
             f"{', '.join(map(str, s.seeds))} (each seed draws its own labelled subset, weights and pretraining). "
             f"Precision: {precision_of(s)}. Compute: the pretraining and fine-tuning runs' wall times add up to "
             f"{compute_hours:.1f} h (more where runs shared the cores).",
             "", "| labels | fine-tuning epochs | from scratch | SimMIM-pretrained | difference | last-interval "
             "change (scratch / SimMIM) |", "|---|---|---|---|---|---|"]
    for label, row in summary.items():
        sc, sm = row["scratch"], row["simmim"]
        change = " / ".join(f"{c[-1] - c[-2]:+.2f}" if len(c) > 1 else "-"
                            for c in (_curves(main[label]["scratch"]), _curves(main[label]["simmim"])))
        lines.append(f"| {label} | {epochs[label]} | {mean_std(sc)} | {mean_std(sm)} | "
                     f"{sm['mean'] - sc['mean']:+.2f} | {change} |")
    lines += ["", "![accuracy](accuracy.png) ![fine-tuning curves](finetune_curves.png)", "",
              "The last column is the change of the mean validation top-1 between the last two evaluations: "
              "near zero where a run has plateaued.", "",
              "Frozen encoders (features of the final map, average pooled): k-NN (cosine, k=20, T=0.07, as DINO) "
              "and a linear probe (BatchNorm without affine + linear, as MAE), SimMIM-pretrained against the "
              "same architecture with random weights, top-1:", "",
              "| labels | random k-NN | SimMIM k-NN | random linear | SimMIM linear |", "|---|---|---|---|---|"]
    for label, row in probe_summary.items():
        lines.append(f"| {label} | " + " | ".join(mean_std(row[k]) for k in
                                                  ("random knn", "simmim knn", "random linear", "simmim linear"))
                     + " |")
    lines += ["", "![probes](probes.png)", "",
              f"Pretraining length (seed 0, {s.budgets[0][0]} labels):", "",
              "| pretraining epochs | k-NN top-1 | linear probe top-1 | fine-tuned top-1 |", "|---|---|---|---|"]
    lines += [f"| {e} | {v['probe']['knn_top1']:.2f} | {v['probe']['linear_top1']:.2f} | "
              f"{v['finetune']['top1']:.2f} |" for e, v in sorted(lengths.items())]
    lines += ["", f"Ablations (seed 0, {s.ablation_pretrain_epochs}-epoch pretraining, fine-tuned at "
              f"{s.budgets[0][0]}):", "", "| pretraining | test top-1 |", "|---|---|"]
    lines += [f"| {name} | {acc:.2f} |" for name, acc in ablations.items()]
    lines += ["", "![ablations](ablations.png)", ""]
    (s.out / "README.md").write_text("\n".join(lines))
    print(f"study written to {s.out}")
    return full


def write_precision(s: StudySettings, budget: tuple[str, int, int], runs: dict[str, dict[str, list[dict]]],
                    pretrainings: dict[str, list[dict]]) -> dict:
    """precision.md and precision.json: the demo's comparison per precision, mean ± std over seeds, with
    each seed's gap, so a precision's gap can be read against the other's seed spread."""
    s.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for precision, row in runs.items():
        gaps = [sm["top1"] - sc["top1"] for sc, sm in zip(row["scratch"], row["simmim"], strict=True)]
        summary[precision] = {"scratch": stats([r["top1"] for r in row["scratch"]]),
                              "simmim": stats([r["top1"] for r in row["simmim"]]),
                              "gap": stats([round(g, 2) for g in gaps]),
                              "train_loss": stats([r["train_loss"] for r in pretrainings[precision]], 4),
                              "heldout_loss": stats([r["heldout_loss"] for r in pretrainings[precision]], 4),
                              "pretrain_seconds": stats([r["seconds"] for r in pretrainings[precision]])}
    (s.out / "precision.json").write_text(json.dumps(summary, indent=2) + "\n")
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    command = " ".join(["simmim study --only precision", *(f"--set {o}" for o in s.extra)])
    lines = ["# The demo per precision", "",
             f"Produced by `{command}` (report written {date}) on {cpu_model()} ({os.cpu_count()} cores), torch "
             f"{torch.__version__}: the demo's recipe (pretraining, then fine-tuning and from scratch on "
             f"{10 * budget[1]} labels, {budget[2]} fine-tuning epochs) at each precision, test top-1, mean ± "
             f"standard deviation over seeds {', '.join(map(str, s.seeds))}; a seed's runs differ between the "
             "precisions in nothing else.", "",
             "| precision | from scratch | SimMIM-pretrained | gap (per seed) | final training loss "
             "| held-out masked L1 | pretraining s |", "|---|---|---|---|---|---|---|"]
    for precision, v in summary.items():
        lines.append(f"| {precision} | {mean_std(v['scratch'])} | {mean_std(v['simmim'])} | {mean_std(v['gap'])} "
                     f"({', '.join(f'{g:+.2f}' for g in v['gap']['seeds'])}) | {v['train_loss']['mean']:.4f} | "
                     f"{v['heldout_loss']['mean']:.4f} | "
                     f"{v['pretrain_seconds']['mean']:.0f} |")
    (s.out / "precision.md").write_text("\n".join(lines) + "\n")
    print(f"precision comparison written to {s.out / 'precision.md'}")
    return summary


