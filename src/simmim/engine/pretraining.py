"""SimMIM pretraining: masked images in, L1 on the masked pixels out; reconstruction grids along the way."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint.transfer import load_weights
from ..config import TrainConfig
from ..data.datasets import MaskCollate, SeededSamples
from ..data.transforms import eval_transform
from ..errors import UsageError
from ..models import SimMIM
from ..viz import reconstruction_panels, save_curves, save_grid
from ..zoo.sources import resolve
from .builders import (
    build_network,
    check_pretrained,
    eval_source,
    first,
    heldout_source,
    img_size,
    labelled_source,
    train_transform,
    unlabelled_source,
)
from .distributed import DistEnv
from .logging import RunLogger, format_duration, read_metrics
from .loop import Run, RunResult, train
from .parallelize import autocast, unwrap_ddp
from .probe import DEFAULTS, extract_features, knn_scores, topk_accuracy

GRID_IMAGES = 8


class PretrainTask:
    """The SimMIM side of the loop."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, log: RunLogger):
        self.cfg, self.env, self.log = cfg, env, log
        self.size = img_size(cfg)

    def build_model(self, resuming: bool) -> SimMIM:
        model = build_network(self.cfg)
        if self.cfg.model.pretrained and not resuming:  # a resumed run has its own weights
            check_pretrained(self.cfg, model)
            self.log.print(load_pretrained(model, self.cfg.model.pretrained))
        return model

    def train_dataset(self, model: nn.Module) -> Dataset:
        # the data is read here, after the model: a bad model.pretrained stops the run before it
        cfg, data = self.cfg, self.cfg.data
        self.source = first(unlabelled_source(data.path, data.classes), data.max_images)
        heldout = first(heldout_source(data.path, data.classes), data.max_images) if data.heldout_images else None
        self.heldout = SeededSamples(heldout or self.source, eval_transform(self.size))
        self.heldout_count = min(cfg.data.heldout_images, len(heldout)) if heldout else 0
        self.knn_sets = knn_monitor_sets(cfg) if cfg.eval.knn_every else None
        return SeededSamples(self.source, train_transform(cfg.augment, self.size))

    def collate(self, model: SimMIM) -> MaskCollate:
        return MaskCollate(model.mask_generator)

    def loss(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return model(images, masks).loss

    def end_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        every, last = self.cfg.runtime.vis_every, epoch + 1 == self.cfg.schedule.epochs
        if every and ((epoch + 1) % every == 0 or last):
            self.save_reconstructions(run, epoch)
        metrics = {"heldout_loss": self.heldout_loss(run)} if self.heldout_count else {}
        knn_every = self.cfg.eval.knn_every
        if knn_every and ((epoch + 1) % knn_every == 0 or last):
            metrics.update(self.knn_monitor(run))
        return metrics

    def knn_monitor(self, run: Run) -> dict[str, float]:
        """k-NN accuracy of the frozen encoder on the labelled monitor sets (every rank runs the
        encoder, as FSDP needs)."""
        encoder = unwrap_ddp(run.wrapped).encoder
        train, val = (extract_features(encoder, s, self.cfg.data.batch_size, self.env.device, precision=run.precision)
                      for s in self.knn_sets)
        encoder.train()
        scores = knn_scores(*train, val[0], len(self.knn_sets[1].classes), DEFAULTS.k, DEFAULTS.temperature)
        accuracy = topk_accuracy(scores, val[1])
        self.log.print(f"k-NN monitor: top-1 {accuracy['top1']:.2f}% top-5 {accuracy['top5']:.2f}% "
                       f"({len(train[1])} bank / {len(val[1])} val images)")
        return {"knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"]}

    def fixed_batch(self, run: Run, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out images start..start+count, center-cropped, with masks seeded by their index, so every
        epoch (and every rank) sees the same inputs."""
        images = torch.stack([self.heldout[i][0] for i in range(start, start + count)])
        generator = run.model.mask_generator
        masks = torch.stack([generator(np.random.default_rng([self.cfg.runtime.seed, i]))
                             for i in range(start, start + count)])
        return images, masks

    @torch.no_grad()
    def forward(self, run: Run, images: torch.Tensor, masks: torch.Tensor):
        """The model's output in eval mode (every rank runs it: FSDP needs all of them)."""
        model = unwrap_ddp(run.wrapped)
        model.eval()
        device = self.env.device
        with autocast(run.precision, device):
            out = model(images.to(device), masks.to(device))
        model.train()
        return out

    def heldout_loss(self, run: Run) -> float:
        """Mean masked-pixel loss over the held-out images, in batches of data.batch_size."""
        total, batch = 0.0, self.cfg.data.batch_size
        for start in range(0, self.heldout_count, batch):
            count = min(batch, self.heldout_count - start)
            total += float(self.forward(run, *self.fixed_batch(run, start, count)).loss) * count
        loss = total / self.heldout_count
        self.log.print(f"held-out masked-pixel loss {loss:.4f} ({self.heldout_count} images)")
        return loss

    def save_reconstructions(self, run: Run, epoch: int) -> None:
        """RUN_DIR/reconstructions/epoch_NNNN.png: the same center-cropped held-out images and masks every
        time; rank 0 draws."""
        images, masks = self.fixed_batch(run, 0, min(GRID_IMAGES, len(self.heldout)))
        rec = run.model.in_input_space(images, self.forward(run, images, masks).reconstruction.float().cpu())
        if self.env.is_main:
            panels = reconstruction_panels(images, masks, rec, run.model.patch_size)
            save_grid(panels, run.run_dir / "reconstructions" / f"epoch_{epoch + 1:04d}.png", scale=2)

    def finish(self, run: Run, seconds: float) -> dict[str, float]:
        knn = [r for r in read_metrics(run.run_dir, "eval") if "knn_top1" in r]
        if self.env.is_main and knn:
            save_curves({"k-NN top-1 (%)": [r["knn_top1"] for r in knn]}, run.run_dir / "knn_curve.png",
                        xlabel=f"monitor (every {self.cfg.eval.knn_every} epochs)", title=self.cfg.model.name)
        self.log.print(f"done in {format_duration(seconds)}: final loss {run.last_loss:.4f}; run folder {run.run_dir}")
        return {"train_loss": run.last_loss}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def load_pretrained(model: SimMIM, source: str) -> str:
    """Loads a weights source (`zoo.sources`) into a pretraining model: encoder, mask token and decoder,
    position tables resampled to the model's window and grid, the mask token and decoder started
    fresh where the checkpoint has none (an encoder-only or fine-tuned one). Returns the header's line."""
    try:
        path = resolve(source)
        report = load_weights(model, path)
    except (UsageError, OSError) as err:  # bad input only: anything else is a bug and keeps its traceback
        raise UsageError(f"model.pretrained: {err}") from None
    fresh = {"decoder": any(k.startswith("decoder.") for k in report.initialized),
             "mask token": "encoder.mask_token" in report.initialized}
    loaded = ["encoder"] + [part for part, new in fresh.items() if not new]
    where = str(source) if str(path) == str(source) else f"{source} ({path})"
    details = [f"{report.loaded} tensors, {report.format} layout"]
    if report.resampled:
        count = len(report.resampled)
        details.append(f"{count} position table{'s' if count > 1 else ''} resampled")
    if report.dropped:
        details.append(f"left out {', '.join(sorted({k.split('.')[0] for k in report.dropped}))}")
    line = f"pretrained: {_and(loaded)} from {where} ({'; '.join(details)})"
    starting = [part for part, new in fresh.items() if new]
    return line + (f"; {_and(starting)} start{'s' if len(starting) == 1 else ''} fresh" if starting else "")


def _and(parts: list[str]) -> str:
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 2 else parts)


def knn_monitor_sets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The k-NN monitor's neighbour bank (a balanced labelled subset) and validation images."""
    path = cfg.eval.knn_data or cfg.data.path
    classes = None if cfg.eval.knn_data else cfg.data.classes  # another dataset has classes of its own
    bank = labelled_source(path, "train", cfg.eval.knn_labels_per_class, seed=cfg.data.seed, classes=classes,
                           key="eval.knn_labels_per_class")
    val = eval_source(path, classes)
    return bank, first(val, cfg.eval.knn_val_images)


def pretrain(cfg: TrainConfig, overwrite: bool = False) -> RunResult:
    """SimMIM pretraining with a resolved config (see `simmim.config.load_config`); a new run into a
    folder that holds a run is refused unless `overwrite` (which removes the old run's files)."""
    if cfg.task != "pretrain":
        raise UsageError(f"task: expected 'pretrain', got {cfg.task!r} (use finetune for classification recipes)")
    if not cfg.data.path:
        raise UsageError("data.path: expected an image folder, a list file or 'fashion-mnist' (--data)")
    return train(cfg, PretrainTask, overwrite)
