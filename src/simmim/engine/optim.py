"""AdamW with the official parameter groups (no decay on 1-D params, biases, tokens, position tables;
layer-wise lr decay for fine-tuning), the linear lr scaling rule, and the per-iteration schedule."""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import OptimConfig, ScheduleConfig

NO_DECAY_KEYWORDS = ("relative_position_bias_table",)
SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def num_layers(encoder: nn.Module) -> int:
    """N of the layer-decay rule: Swin's total block count, ViT's depth."""
    cfg = encoder.cfg
    return sum(cfg.depths) if hasattr(cfg, "depths") else cfg.depth


def layer_id(name: str, encoder: nn.Module) -> int:
    """Layer of a parameter for layer-wise lr decay (official `build_finetune_optimizer`): 0 for the
    embeddings, blocks counted from 1, N + 1 for everything after (norm, head, decoder). `name` is
    relative to the model, so encoder parameters start with 'encoder.'."""
    n = num_layers(encoder)
    if not name.startswith("encoder."):
        return n + 1
    name = name.removeprefix("encoder.")
    if name.startswith(("patch_embed", "mask_token", "cls_token", "pos_embed")):
        return 0
    if hasattr(encoder.cfg, "depths"):
        depths = encoder.cfg.depths
        if match := SWIN_BLOCK.match(name):
            stage, block = int(match[1]), int(match[2])
            return sum(depths[:stage]) + block + 1
        if match := SWIN_DOWNSAMPLE.match(name):
            return sum(depths[: int(match[1]) + 1])
    elif match := VIT_BLOCK.match(name):
        return int(match[1]) + 1
    return n + 1  # final norm, absolute_pos_embed, the shared relative position bias


def decays(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    """Whether weight decay applies: not to 1-D tensors, biases, the model's `no_weight_decay` names
    (tokens, absolute position embeddings) or relative position bias tables."""
    no = param.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in NO_DECAY_KEYWORDS)
    return not no


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 encoder: str = "encoder") -> list[dict]:
    """AdamW groups keyed by (layer, decay or not), each with its `lr_scale`; with layer_decay == 1
    all layers share one scale and fold into two groups. `encoder` is the dotted path of the encoder
    in `model` (a detector's is deeper, e.g. 'backbone.body.encoder'); the rest counts as the head."""
    enc, prefix = model.get_submodule(encoder), encoder + "."
    n = num_layers(enc)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else {prefix + k for k in enc.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        inside = "encoder." + name.removeprefix(prefix) if name.startswith(prefix) else "head"
        layer = layer_id(inside, enc) if layer_decay != 1.0 else n + 1
        decay = decays(name, param, skip)
        group = groups.setdefault((layer, decay), {
            "params": [], "layer": layer, "lr_scale": layer_decay ** (n + 1 - layer),
            "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the lrs are set by the schedule at every step."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def group_table(optimizer: torch.optim.Optimizer) -> str:
    """Compact table of the lr groups: layer, lr scale, parameters with and without weight decay."""
    rows: dict[int, list] = {}
    for group in optimizer.param_groups:
        row = rows.setdefault(group["layer"], [group["lr_scale"], 0, 0])
        row[1 if group["weight_decay"] else 2] += sum(p.numel() for p in group["params"])
    lines = [f"{'layer':>5} {'lr scale':>9} {'#params decay':>14} {'#params no decay':>17}"]
    lines += [f"{layer:5d} {scale:9.4g} {dec:14,d} {nodec:17,d}" for layer, (scale, dec, nodec) in sorted(rows.items())]
    return "\n".join(lines)


@dataclass(frozen=True)
class ScaledLR:
    """Absolute learning rates of a run after the linear scaling rule."""

    lr: float
    warmup_lr: float
    min_lr: float
    effective_batch: int


def scale_lrs(cfg: OptimConfig, batch_size: int, world_size: int) -> ScaledLR:
    """lr x (batch per process x processes x accumulation steps) / lr_batch, for all three lrs (as the
    official main_simmim.py / main_finetune.py do)."""
    effective = batch_size * world_size * cfg.accumulation_steps
    factor = effective / cfg.lr_batch
    return ScaledLR(cfg.lr * factor, cfg.warmup_lr * factor, cfg.min_lr * factor, effective)


@dataclass(frozen=True)
class LRSchedule:
    """Per-iteration lr: linear warmup from `warmup_lr`, then cosine to `min_lr` at `total_steps`
    (the cosine phase is timed from step 0, as timm's CosineLRScheduler without warmup_prefix that
    the official code uses) or multistep decay by `gamma` at each milestone step."""

    lr: float
    warmup_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    name: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, scaled: ScaledLR, cfg: ScheduleConfig, steps_per_epoch: int) -> LRSchedule:
        return cls(scaled.lr, scaled.warmup_lr, scaled.min_lr, cfg.epochs * steps_per_epoch,
                   int(cfg.warmup_epochs * steps_per_epoch), cfg.name,
                   tuple(m * steps_per_epoch for m in cfg.milestones), cfg.gamma)

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.name == "multistep":
            return self.lr * self.gamma ** bisect.bisect_right(self.milestones, step)
        progress = step / max(self.total_steps, 1)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Sets every group's lr to lr(step) x its lr_scale; returns lr(step)."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
