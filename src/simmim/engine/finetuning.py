"""Fine-tuning a classifier: timm Mixup/CutMix and losses, evaluation after every epoch."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint.transfer import load_weights
from ..config import TrainConfig
from ..data.datasets import SeededSamples, collate_labelled
from ..data.transforms import eval_transform
from ..errors import UsageError
from ..zoo.runs import check_fits
from ..zoo.sources import resolve
from .builders import build_network, eval_loader, first, img_size, labelled_source, train_transform
from .distributed import DistEnv
from .evaluation import evaluate_loader
from .logging import RunLogger, format_duration
from .loop import Run, RunResult, train
from .parallelize import unwrap_ddp


class FinetuneTask:
    """The classification side of the loop."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, log: RunLogger):
        self.cfg, self.env, self.log = cfg, env, log
        self.size = img_size(cfg)
        data, aug = cfg.data, cfg.augment
        self.train_source = first(labelled_source(data.path, "train", data.labels_per_class, data.seed,
                                                  data.classes), data.max_images)
        val_source = first(labelled_source(data.path, "val", classes=data.classes), data.max_images)
        if list(val_source.classes) != list(self.train_source.classes):
            raise UsageError(f"data.path: the classes of {data.path}/val differ from those of {data.path}/train")
        self.num_classes = cfg.model.num_classes or len(self.train_source.classes)
        self.val_loader, self.val_sampler = eval_loader(SeededSamples(val_source, eval_transform(self.size)),
                                                        collate_labelled, data.batch_size, env, data.num_workers)
        self.mixup = None
        if aug.mixes:  # label smoothing is part of the mixed targets
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               switch_prob=aug.switch_prob, mode=aug.mixup_mode, label_smoothing=aug.label_smoothing,
                               num_classes=self.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif aug.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(aug.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.best_top1 = 0.0
        self.last: dict[str, float] = {}

    def build_model(self, resuming: bool) -> nn.Module:
        model = build_network(self.cfg, self.num_classes)
        if self.cfg.model.pretrained and not resuming:  # a resumed run has its own weights
            # the encoder of any supported checkpoint; decoder / mask token dropped, position tables
            # resampled, and a head for another number of classes started afresh
            report = load_weights(model, resolve(self.cfg.model.pretrained), new_head=True)
            self.log.print(f"pretrained weights from {self.cfg.model.pretrained}: {report.summary()}")
        return model

    def train_dataset(self, model: nn.Module) -> Dataset:
        return SeededSamples(self.train_source, train_transform(self.cfg.augment, self.size))

    def collate(self, model: nn.Module):
        return collate_labelled

    def loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets)

    def end_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        if (epoch + 1) % self.cfg.runtime.eval_every and epoch + 1 != self.cfg.schedule.epochs:
            return {}
        metrics = evaluate_loader(unwrap_ddp(run.wrapped), self.val_loader, self.val_sampler, self.env, run.precision)
        self.best_top1 = max(self.best_top1, metrics["top1"])
        self.last = metrics
        self.log.print(f"epoch {epoch + 1}/{self.cfg.schedule.epochs}  val top-1 {metrics['top1']:.2f}  "
                       f"top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  (best top-1 {self.best_top1:.2f}, "
                       f"{metrics['images']} images)")
        return {k: v for k, v in metrics.items() if k != "images"}

    def finish(self, run: Run, seconds: float) -> dict[str, float]:
        nan = float("nan")
        metrics = {"best_top1": self.best_top1, "top1": self.last.get("top1", nan), "top5": self.last.get("top5", nan),
                   "val_loss": self.last.get("loss", nan), "train_loss": run.last_loss}
        self.log.print(f"done in {format_duration(seconds)}: best top-1 {self.best_top1:.2f}, final top-1 "
                       f"{metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}; run folder {run.run_dir}")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        # the class names travel with the weights, so `simmim export` and `predict` can name them
        return {"best_top1": self.best_top1, "last": self.last, "classes": list(self.train_source.classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_top1, self.last = state["best_top1"], dict(state["last"])


def finetune(cfg: TrainConfig, overwrite: bool = False) -> RunResult:
    """Fine-tuning with a resolved config (see `simmim.config.load_config`); `cfg.model.pretrained`
    names the checkpoint to start from; `overwrite` as for `pretrain`."""
    if cfg.task != "finetune":
        raise UsageError(f"task: expected 'finetune', got {cfg.task!r} (use pretrain for SimMIM recipes)")
    if not cfg.data.path:
        raise UsageError("data.path: expected an image folder with train/ and val/, or 'fashion-mnist' (--data)")
    if cfg.model.pretrained:  # before any data is read: a checkpoint that names another architecture
        with torch.device("meta"):
            model = build_network(cfg, num_classes=1)
        check_fits(resolve(cfg.model.pretrained), model, cfg.model.name,
                   "set model.name={name}, or drop --preset (--pretrained alone takes its architecture)")
    return train(cfg, FinetuneTask, overwrite)
