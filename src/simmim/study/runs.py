"""The study's runs, each done once: results.jsonl records every finished run, so an interrupted study
picks up where it stopped, and a run recorded under other settings runs again."""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from ..config import load_config, task_overrides
from ..demo import PRETRAIN_PRESET, DemoSettings, finetune_run, pretrain_run
from ..engine.builders import build_network, eval_source, first, labelled_source
from ..engine.evaluation import load_run_model
from ..engine.logging import read_metrics
from ..engine.probe import extract_features, probe_features
from ..fsutil import append_record, read_records
from .settings import StudySettings

FINETUNE_EVALS = 5
"""Validation points per fine-tuning run: the curves that show whether both arms have plateaued."""

HOW_IT_RUNS = ("runtime.threads", "data.num_workers", "runtime.gemm_route", "runtime.recompute")
"""--set keys that change how fast a run goes, not what it computes (the GEMM routes and recompute settings
give the same numbers within float32 rounding): a record made under others still counts."""

Budget = tuple[str, int, int]
"""(name, labels per class, fine-tuning epochs)."""


def _settings(overrides: tuple[str, ...]) -> list[str]:
    """The overrides that shape a run's result, sorted: recorded beside it, compared on resume."""
    return sorted(o for o in overrides if not o.startswith(HOW_IT_RUNS))


def _start(pretraining: dict | None) -> dict:
    """What a run records of the pretraining it starts from: its checkpoint, and which run wrote it (a
    pretraining run again under the same name writes the same path)."""
    if pretraining is None:
        return {"init": None}
    return {"init": pretraining["checkpoint"], "init_run": pretraining.get("run")}


def _stale(done: dict[str, dict], key: str, **expected) -> bool:
    """Whether `key` must run: not recorded, or recorded with another length, starting checkpoint or
    settings (a changed budget, preset or --set reruns it, and what starts from it, rather than mixing;
    the newer record wins in read_records)."""
    return key not in done or any(done[key].get(name, value) != value for name, value in expected.items())


class Runs:
    """The runs of one study process over WORK/results.jsonl: each method runs what is missing and
    returns the record; `used` collects the records a report reads (its compute figure adds their times)."""

    def __init__(self, s: StudySettings):
        self.s = s
        s.work.mkdir(parents=True, exist_ok=True)
        self.results = s.work / "results.jsonl"
        self.done = read_records(self.results)
        self.used: set[str] = set()
        self.preset_epochs = load_config(PRETRAIN_PRESET).schedule.epochs
        self.val_features: dict[tuple[str, int], tuple] = {}  # per encoder: the same for every budget

    def record(self, key: str, **values) -> dict:
        self.done[key] = append_record(self.results, {"key": key, **values})
        return self.done[key]

    def hours(self) -> float:
        return sum(self.done[key]["seconds"] for key in self.used) / 3600

    def pretrained(self, seed: int, name: str, epochs: int | None, overrides: tuple[str, ...] = (),
                   init: dict | None = None) -> dict:
        """A pretraining run, from random weights or continued from the pretraining record `init`."""
        key, length, start = f"pretrain/{name}/seed{seed}", epochs or self.preset_epochs, _start(init)
        overrides = self.s.extra + overrides + ((f"model.pretrained={start['init']}",) if init else ())
        self.used.add(key)
        if _stale(self.done, key, epochs=length, settings=_settings(overrides), **start):
            run = pretrain_run(DemoSettings(self.s.work / key, seed, pretrain_epochs=epochs, extra=overrides))
            heldout = [r["heldout_loss"] for r in read_metrics(run.run_dir, "eval") if "heldout_loss" in r]
            self.record(key, epochs=length, **start, settings=_settings(overrides), checkpoint=str(run.checkpoint),
                        run=uuid.uuid4().hex, seconds=round(run.seconds, 1),
                        heldout_loss=heldout[-1] if heldout else None, **run.metrics)
        return self.done[key]

    def tuned(self, seed: int, name: str, budget: Budget, init: dict | None, overrides: tuple[str, ...] = ()) -> dict:
        """A fine-tuning run from the pretraining record `init`, or from scratch."""
        label, per_class, epochs = budget
        key, start, settings = f"finetune/{name}/{label}/seed{seed}", _start(init), _settings(self.s.extra + overrides)
        self.used.add(key)
        if _stale(self.done, key, epochs=epochs, settings=settings, **start):
            every = f"runtime.eval_every={max(epochs // FINETUNE_EVALS, 1)}"
            demo = DemoSettings(self.s.work / key.replace("%", "pct"), seed, per_class, finetune_epochs=epochs,
                                extra=(*self.s.extra, every, *overrides))
            run = finetune_run(demo, "", Path(start["init"]) if init else None)
            curve = [[r["epoch"], r["top1"]] for r in read_metrics(run.run_dir, "eval")]
            self.record(key, epochs=epochs, **start, settings=settings, top1=run.metrics["top1"],
                        top5=run.metrics["top5"], curve=curve, seconds=round(run.seconds, 1))
        return self.done[key]

    def probed(self, seed: int, name: str, budget: Budget, init: dict | None, overrides: tuple[str, ...] = ()) -> dict:
        """k-NN and linear probe of the frozen encoder of the pretraining record `init` (random weights for
        None) on the data of the pretraining preset with `overrides` (its classes, its image cap)."""
        label, per_class, _ = budget
        key, start, overrides = f"probe/{name}/{label}/seed{seed}", _start(init), self.s.extra + overrides
        if _stale(self.done, key, settings=_settings(overrides), **start):
            cfg = load_config(PRETRAIN_PRESET, overrides=task_overrides(overrides, "pretrain"))
            if init is None:
                torch.manual_seed(seed)
                encoder = build_network(cfg).encoder
            else:
                encoder = load_run_model(Path(start["init"]))[0].encoder
            data = cfg.data
            if (name, seed) not in self.val_features:
                val = first(eval_source(data.path, data.classes), self.s.probe_val_images or data.max_images)
                self.val_features[name, seed] = extract_features(encoder, val, data.batch_size)
            train = first(labelled_source(data.path, "train", per_class, seed, data.classes), data.max_images)
            result = probe_features(extract_features(encoder, train, data.batch_size), self.val_features[name, seed],
                                    len(train.classes))
            self.record(key, **start, settings=_settings(overrides), knn_top1=result["knn"]["top1"],
                        knn_top5=result["knn"]["top5"], linear_top1=result["linear"]["top1"],
                        linear_top5=result["linear"]["top5"])
        return self.done[key]
