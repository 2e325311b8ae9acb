"""SimMIM pretraining: masked images in, L1 on the masked pixels out; reconstruction grids along the way."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..data.datasets import MaskCollate, SeededSamples
from ..data.transforms import eval_transform
from ..models import SimMIM
from ..viz import reconstruction_panels, save_curves, save_grid
from .builders import build_network, img_size, train_transform, unlabelled_source
from .distributed import DistEnv
from .logging import RunLogger, format_duration, read_metrics
from .loop import Run, RunResult, train
from .parallelize import autocast, unwrap_ddp

GRID_IMAGES = 8


class PretrainTask:
    """The SimMIM side of the loop."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, log: RunLogger):
        self.cfg, self.env, self.log = cfg, env, log
        self.size = img_size(cfg)
        self.source = unlabelled_source(cfg.data.path)

    def build_model(self, resuming: bool) -> SimMIM:
        return build_network(self.cfg)

    def train_dataset(self, model: nn.Module) -> Dataset:
        return SeededSamples(self.source, train_transform(self.cfg.augment, self.size))

    def collate(self, model: SimMIM) -> MaskCollate:
        return MaskCollate(model.mask_generator)

    def loss(self, model: nn.Module, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return model(images, masks).loss

    def end_epoch(self, run: Run, epoch: int) -> dict[str, float]:
        every, last = self.cfg.runtime.vis_every, epoch + 1 == self.cfg.schedule.epochs
        if every and ((epoch + 1) % every == 0 or last):
            self.save_reconstructions(run, epoch)
        return {}

    @torch.no_grad()
    def save_reconstructions(self, run: Run, epoch: int) -> None:
        """RUN_DIR/reconstructions/epoch_NNNN.png: the same center-cropped images and masks every time.
        Every rank runs the forward pass (FSDP needs all of them); rank 0 draws."""
        samples = SeededSamples(self.source, eval_transform(self.size))
        images = torch.stack([samples[i][0] for i in range(min(GRID_IMAGES, len(samples)))])
        generator = run.model.mask_generator
        masks = torch.stack([generator(np.random.default_rng([self.cfg.runtime.seed, i])) for i in range(len(images))])
        model = unwrap_ddp(run.wrapped)
        model.eval()
        device = self.env.device
        with autocast(run.precision, device):
            rec = model(images.to(device), masks.to(device)).reconstruction.float().cpu()
        model.train()
        if self.env.is_main:
            panels = reconstruction_panels(images, masks, rec, run.model.patch_size)
            save_grid(panels, run.run_dir / "reconstructions" / f"epoch_{epoch + 1:04d}.png", scale=2)

    def finish(self, run: Run, seconds: float) -> dict[str, float]:
        records = read_metrics(run.run_dir, "train")
        if self.env.is_main and records:
            save_curves({"train loss": [r["loss"] for r in records]}, run.run_dir / "loss_curve.png",
                        xlabel=f"record (every {self.cfg.runtime.log_every} steps and at epoch ends)",
                        title=self.cfg.model.name)
        self.log.print(f"done in {format_duration(seconds)}: final loss {run.last_loss:.4f}; run folder {run.run_dir}")
        return {"train_loss": run.last_loss}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def pretrain(cfg: TrainConfig) -> RunResult:
    """SimMIM pretraining with a resolved config (see `simmim.config.load_config`)."""
    if cfg.task != "pretrain":
        raise ValueError(f"task: expected 'pretrain', got {cfg.task!r} (use finetune for classification recipes)")
    if not cfg.data.path:
        raise ValueError("data.path: expected an image folder, a list file or 'fashion-mnist' (--data)")
    return train(cfg, PretrainTask)
