"""The parts of `simmim study` on all of Fashion-MNIST: the demo over seeds and budgets with probes
and a pretraining-length curve, the paper's ablations, and the demo per precision."""

from __future__ import annotations

from ..config import load_config
from ..demo import FINETUNE_PRESET, DemoSettings
from .runs import Runs


def main_part(runs: Runs) -> tuple[dict, dict]:
    """Per seed and budget: from scratch against SimMIM, fine-tuned and probed (against random weights).
    Returns the fine-tuning and probe records as {budget: {arm: [record per seed]}}."""
    main: dict[str, dict[str, list[dict]]] = {}
    probes: dict[str, dict[str, list[dict]]] = {}
    for seed in runs.s.seeds:
        pretraining = runs.pretrained(seed, "full", None)
        for budget in runs.s.budgets:
            row = main.setdefault(budget[0], {"scratch": [], "simmim": []})
            row["scratch"].append(runs.tuned(seed, "scratch", budget, None))
            row["simmim"].append(runs.tuned(seed, "simmim", budget, pretraining))
            row = probes.setdefault(budget[0], {"random": [], "simmim": []})
            row["random"].append(runs.probed(seed, "random", budget, None))
            row["simmim"].append(runs.probed(seed, "simmim", budget, pretraining))
    return main, probes


def length_part(runs: Runs) -> dict[int, dict[str, dict]]:
    """Seed 0, first budget: probe and fine-tuning after each pretraining length."""
    lengths = {}
    for epochs in runs.s.pretrain_lengths if 0 in runs.s.seeds else ():
        # the preset's length is the main part's seed-0 pretraining, probe and fine-tuning
        default = epochs == runs.preset_epochs
        pretraining = runs.pretrained(0, "full" if default else f"length{epochs}", None if default else epochs)
        name = "simmim" if default else f"length{epochs}"
        lengths[epochs] = {"probe": runs.probed(0, name, runs.s.budgets[0], pretraining),
                           "finetune": runs.tuned(0, name, runs.s.budgets[0], pretraining)}
    return lengths


def ablation_part(runs: Runs) -> dict[str, float]:
    """Seed 0: each ablation's pretraining, fine-tuned at the first budget; {row: top-1}."""
    ablations = {}
    for name, overrides in runs.s.ablations:
        slug = name.split(" (")[0].replace(" ", "-")
        pretraining = runs.pretrained(0, f"ablation-{slug}", runs.s.ablation_pretrain_epochs, overrides)
        ablations[name] = runs.tuned(0, f"ablation-{slug}", runs.s.budgets[0], pretraining)["top1"]
    return ablations


def precision_part(runs: Runs) -> tuple[tuple[str, int, int], dict, dict]:
    """The demo's recipe at each precision per seed: (budget, {precision: {arm: [records]}},
    {precision: [pretraining records]})."""
    s = runs.s
    budget = s.precision_budget or ("demo", DemoSettings.labels_per_class, load_config(FINETUNE_PRESET).schedule.epochs)
    tuned: dict[str, dict[str, list[dict]]] = {}
    pretrainings: dict[str, list[dict]] = {}
    for seed in s.seeds:
        for precision in s.precisions:
            setting = (f"runtime.precision={precision}",)
            pretraining = runs.pretrained(seed, f"demo-{precision}", None, setting)
            pretrainings.setdefault(precision, []).append(pretraining)
            row = tuned.setdefault(precision, {"scratch": [], "simmim": []})
            row["scratch"].append(runs.tuned(seed, f"scratch-{precision}", budget, None, setting))
            row["simmim"].append(runs.tuned(seed, f"simmim-{precision}", budget, pretraining, setting))
    return budget, tuned, pretrainings
