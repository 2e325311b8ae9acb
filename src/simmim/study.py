"""The fuller study (`simmim study`, `make study`): the demo's comparison over seeds and label budgets,
what the frozen encoder learned (k-NN and linear probe against a randomly initialised encoder), how
pretraining length matters, and the paper's ablations at this scale, written to docs/results/.

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

from .config import load_config, task_overrides
from .demo import FINETUNE_PRESET, PRETRAIN_PRESET, DemoSettings, finetune_run, pretrain_run
from .engine.builders import build_network, eval_source, first, labelled_source
from .engine.distributed import pick_device
from .engine.evaluation import load_run_model
from .engine.logging import read_metrics
from .engine.probe import extract_features, probe_features
from .hardware import auto_precision, cpu_model
from .viz import save_bars, save_curves

FINETUNE_EVALS = 5
"""Validation points per fine-tuning run: the curves that show whether both arms have plateaued."""


@dataclass(frozen=True)
class StudySettings:
    out: Path = Path("docs/results")
    work: Path = Path("runs/study")
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[tuple[str, int, int], ...] = (("1%", 60, 100), ("10%", 600, 60))
    """(name, labels per class, fine-tuning epochs): long enough for both arms to flatten (the
    preset's 40 and a former 8 left both still improving; 30 at 10% still gained 0.5-0.7 points in
    its last sixth)."""
    pretrain_lengths: tuple[int, ...] = (1, 3, 6)
    """Pretraining epochs of the length curve (seed 0, probed and fine-tuned at the first budget)."""
    probe_val_images: int | None = None
    """Validation images the probes classify; None: all of them (Fashion-MNIST's 10,000 test images)."""
    ablation_pretrain_epochs: int = 1
    """Ablations pretrain this long (the baseline of the ablation table too), fine-tune at 1%."""
    ablations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(table row, overrides of the pretraining); see ABLATIONS."""
    extra: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ("fp32", "bf16")
    """The precision part: the demo's recipe at each of these, per seed."""
    precision_budget: tuple[str, int, int] | None = None
    """The precision part's (name, labels per class, fine-tuning epochs); None: the demo's."""
    only: str | None = None
    """'main' or 'ablations' runs just that part and writes no report (two processes or machines can
    share the work and results.jsonl); None runs what is missing of both and writes the report.
    'precision' runs the demo at each precision per seed and writes precision.md (not part of None:
    it answers whether the demo may train in bf16, not what pretraining learned)."""


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


HOW_IT_RUNS = ("runtime.threads", "data.num_workers", "runtime.gemm_route", "runtime.recompute")
"""--set keys that change how fast a run goes, not what it computes (the GEMM routes and recompute settings
give the same numbers within float32 rounding): a record made under others still counts."""


def _settings(overrides: tuple[str, ...]) -> list[str]:
    """The overrides that shape a run's result, sorted: recorded beside it, compared on resume."""
    return sorted(o for o in overrides if not o.startswith(HOW_IT_RUNS))


def _stale(done: dict[str, dict], key: str, **expected) -> bool:
    """Whether `key` must run: not recorded, or recorded with another length, starting checkpoint or
    settings (a changed budget, preset or --set reruns it, and what starts from it, rather than mixing;
    the newer record wins in _done)."""
    return key not in done or any(done[key].get(name, value) != value for name, value in expected.items())


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
    data = load_config(PRETRAIN_PRESET, overrides=task_overrides(s.extra, "pretrain")).data
    preset_epochs = load_config(PRETRAIN_PRESET).schedule.epochs
    used: set[str] = set()  # the runs this report reads: its compute figure adds up their times

    def pretrained(seed: int, name: str, epochs: int | None, overrides: tuple[str, ...]) -> Path:
        key, length, settings = f"pretrain/{name}/seed{seed}", epochs or preset_epochs, _settings(s.extra + overrides)
        used.add(key)
        if _stale(done, key, epochs=length, settings=settings):
            demo = DemoSettings(s.work / key, seed, pretrain_epochs=epochs, extra=s.extra + overrides)
            run = pretrain_run(demo)
            heldout = [r["heldout_loss"] for r in read_metrics(run.run_dir, "eval") if "heldout_loss" in r]
            done[key] = _record(results, key, epochs=length, settings=settings, checkpoint=str(run.checkpoint),
                                seconds=round(run.seconds, 1), heldout_loss=heldout[-1] if heldout else None,
                                **run.metrics)
        return Path(done[key]["checkpoint"])

    def tuned(seed: int, name: str, budget: tuple[str, int, int], init: Path | None,
              overrides: tuple[str, ...] = ()) -> dict:
        label, per_class, epochs = budget
        key = f"finetune/{name}/{label}/seed{seed}"
        used.add(key)
        init_name, settings = str(init) if init else None, _settings(s.extra + overrides)
        if _stale(done, key, epochs=epochs, init=init_name, settings=settings):
            every = f"runtime.eval_every={max(epochs // FINETUNE_EVALS, 1)}"
            demo = DemoSettings(s.work / key.replace("%", "pct"), seed, per_class, finetune_epochs=epochs,
                                extra=s.extra + (every, *overrides))
            run = finetune_run(demo, "", init)
            curve = [[r["epoch"], r["top1"]] for r in read_metrics(run.run_dir, "eval")]
            done[key] = _record(results, key, epochs=epochs, init=init_name, settings=settings,
                                top1=run.metrics["top1"], top5=run.metrics["top5"], curve=curve,
                                seconds=round(run.seconds, 1))
        return done[key]

    val_features: dict[str, tuple] = {}  # per encoder: the validation set is the same for every budget

    def probed(seed: int, name: str, budget: tuple[str, int, int], checkpoint: Path | None) -> dict:
        """k-NN and linear probe of the frozen encoder (random weights for no checkpoint)."""
        label, per_class, _ = budget
        key = f"probe/{name}/{label}/seed{seed}"
        init_name, settings = str(checkpoint) if checkpoint else None, _settings(s.extra)
        if _stale(done, key, init=init_name, settings=settings):
            if checkpoint is None:
                torch.manual_seed(seed)
                cfg = load_config(PRETRAIN_PRESET, overrides=task_overrides(s.extra, "pretrain"))
                encoder = build_network(cfg).encoder
            else:
                encoder = load_run_model(checkpoint)[0].encoder
            if (name, seed) not in val_features:
                val = first(eval_source(data.path), s.probe_val_images or data.max_images)
                val_features[name, seed] = extract_features(encoder, val, data.batch_size)
            train = first(labelled_source(data.path, "train", per_class, seed=seed), data.max_images)
            result = probe_features(extract_features(encoder, train, data.batch_size), val_features[name, seed],
                                    len(train.classes))
            done[key] = _record(results, key, init=init_name, settings=settings, knn_top1=result["knn"]["top1"],
                                knn_top5=result["knn"]["top5"], linear_top1=result["linear"]["top1"],
                                linear_top5=result["linear"]["top5"])
        return done[key]

    if s.only == "precision":
        demo = s.precision_budget or ("demo", DemoSettings.labels_per_class,
                                       load_config(FINETUNE_PRESET).schedule.epochs)
        runs: dict[str, dict[str, list[dict]]] = {}
        for seed in s.seeds:
            for precision in s.precisions:
                setting = (f"runtime.precision={precision}",)
                checkpoint = pretrained(seed, f"demo-{precision}", None, setting)
                row = runs.setdefault(precision, {"scratch": [], "simmim": []})
                row["scratch"].append(tuned(seed, f"scratch-{precision}", demo, None, setting))
                row["simmim"].append(tuned(seed, f"simmim-{precision}", demo, checkpoint, setting))
        return write_precision(s, demo, runs, {p: [done[f"pretrain/demo-{p}/seed{seed}"] for seed in s.seeds]
                                               for p in s.precisions})

    main: dict[str, dict[str, list[dict]]] = {}
    probes: dict[str, dict[str, list[dict]]] = {}
    lengths: dict[int, dict[str, dict]] = {}
    for seed in s.seeds if s.only != "ablations" else ():
        checkpoint = pretrained(seed, "full", None, ())
        for budget in s.budgets:
            row = main.setdefault(budget[0], {"scratch": [], "simmim": []})
            row["scratch"].append(tuned(seed, "scratch", budget, None))
            row["simmim"].append(tuned(seed, "simmim", budget, checkpoint))
            row = probes.setdefault(budget[0], {"random": [], "simmim": []})
            row["random"].append(probed(seed, "random", budget, None))
            row["simmim"].append(probed(seed, "simmim", budget, checkpoint))
    for epochs in s.pretrain_lengths if s.only != "ablations" and 0 in s.seeds else ():
        # the preset's length is the main study's seed-0 pretraining, probe and fine-tuning
        default = epochs == preset_epochs
        checkpoint = pretrained(0, "full" if default else f"length{epochs}", None if default else epochs, ())
        name = "simmim" if default else f"length{epochs}"
        lengths[epochs] = {"probe": probed(0, name, s.budgets[0], checkpoint),
                           "finetune": tuned(0, name, s.budgets[0], checkpoint)}
    ablations = {}
    for name, overrides in s.ablations if s.only != "main" else ():
        slug = name.split(" (")[0].replace(" ", "-")
        checkpoint = pretrained(0, f"ablation-{slug}", s.ablation_pretrain_epochs, overrides)
        ablations[name] = tuned(0, f"ablation-{slug}", s.budgets[0], checkpoint)["top1"]
    hours = sum(done[key]["seconds"] for key in used) / 3600
    return write_results(s, main, probes, lengths, ablations, hours) if s.only is None else {}


def _stats(values: list[float], digits: int = 2) -> dict:
    """Mean and standard deviation over seeds, rounded to `digits` (4 for losses, which differ in the third)."""
    return {"mean": round(statistics.fmean(values), digits),
            "std": round(statistics.stdev(values), digits) if len(values) > 1 else 0.0, "seeds": values}


def _curves(runs: list[dict]) -> list[float]:
    """The mean validation top-1 at each evaluation over seeds."""
    return [statistics.fmean(values) for values in zip(*([top1 for _, top1 in r["curve"]] for r in runs),
                                                                        strict=True)]


def _precision(s: StudySettings) -> str:
    """The precision the study's runs trained in, and why (auto's choice names the CPU feature)."""
    runtime = load_config(PRETRAIN_PRESET, overrides=task_overrides(s.extra, "pretrain")).runtime
    if runtime.precision != "auto":
        return f"{runtime.precision} (runtime.precision={runtime.precision})"
    return auto_precision(pick_device(runtime.device))[1]


def _mean_std(stats: dict) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}"


def write_results(s: StudySettings, main: dict, probes: dict, lengths: dict, ablations: dict[str, float],
                  compute_hours: float) -> dict:
    """docs/results/: summary.json, README.md (tables, command, machine, date, precision, the added-up wall
    time of its pretraining and fine-tuning runs; the probes are not timed) and the plots."""
    s.out.mkdir(parents=True, exist_ok=True)
    summary = {label: {run: _stats([r["top1"] for r in runs]) for run, runs in row.items()}
               for label, row in main.items()}
    probe_summary = {label: {f"{arm} {kind}": _stats([r[f"{kind}_top1"] for r in runs])
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
             f"Precision: {_precision(s)}. Compute: the pretraining and fine-tuning runs' wall times add up to "
             f"{compute_hours:.1f} h (more where runs shared the cores).",
             "", "| labels | fine-tuning epochs | from scratch | SimMIM-pretrained | difference | last-interval "
             "change (scratch / SimMIM) |", "|---|---|---|---|---|---|"]
    for label, row in summary.items():
        sc, sm = row["scratch"], row["simmim"]
        change = " / ".join(f"{c[-1] - c[-2]:+.2f}" if len(c) > 1 else "-"
                            for c in (_curves(main[label]["scratch"]), _curves(main[label]["simmim"])))
        lines.append(f"| {label} | {epochs[label]} | {_mean_std(sc)} | {_mean_std(sm)} | "
                     f"{sm['mean'] - sc['mean']:+.2f} | {change} |")
    lines += ["", "![accuracy](accuracy.png) ![fine-tuning curves](finetune_curves.png)", "",
              "The last column is the change of the mean validation top-1 between the last two evaluations: "
              "near zero where a run has plateaued.", "",
              "Frozen encoders (features of the final map, average pooled): k-NN (cosine, k=20, T=0.07, as DINO) "
              "and a linear probe (BatchNorm without affine + linear, as MAE), SimMIM-pretrained against the "
              "same architecture with random weights, top-1:", "",
              "| labels | random k-NN | SimMIM k-NN | random linear | SimMIM linear |", "|---|---|---|---|---|"]
    for label, row in probe_summary.items():
        lines.append(f"| {label} | " + " | ".join(_mean_std(row[k]) for k in
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
        summary[precision] = {"scratch": _stats([r["top1"] for r in row["scratch"]]),
                              "simmim": _stats([r["top1"] for r in row["simmim"]]),
                              "gap": _stats([round(g, 2) for g in gaps]),
                              "train_loss": _stats([r["train_loss"] for r in pretrainings[precision]], 4),
                              "heldout_loss": _stats([r["heldout_loss"] for r in pretrainings[precision]], 4),
                              "pretrain_seconds": _stats([r["seconds"] for r in pretrainings[precision]])}
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
        lines.append(f"| {precision} | {_mean_std(v['scratch'])} | {_mean_std(v['simmim'])} | {_mean_std(v['gap'])} "
                     f"({', '.join(f'{g:+.2f}' for g in v['gap']['seeds'])}) | {v['train_loss']['mean']:.4f} | "
                     f"{v['heldout_loss']['mean']:.4f} | "
                     f"{v['pretrain_seconds']['mean']:.0f} |")
    (s.out / "precision.md").write_text("\n".join(lines) + "\n")
    print(f"precision comparison written to {s.out / 'precision.md'}")
    return summary


def quick(s: StudySettings) -> StudySettings:
    """A smoke-sized study (tests): two seeds, one budget, two ablations, two pretraining lengths, small
    subsets, short runs."""
    return replace(s, seeds=(0, 1), budgets=(("1%", 3, 2),), precision_budget=("demo", 3, 2), ablations=ABLATIONS[2:4],
                   pretrain_lengths=(1, 2),
                   extra=s.extra + ("data.max_images=64", "data.heldout_images=16", "data.batch_size=16",
                                    "runtime.tensorboard=false", "runtime.vis_every=0"))
