"""Frozen-encoder evaluation: what an encoder learned, without fine-tuning's noise.

Features are the encoder's final map, average pooled (what the classifiers pool), extracted once
from center crops. Two read-outs share them:
- k-NN as DINO's `eval_knn`: cosine similarity to every training feature, the k=20 nearest vote
  for their class with weight exp(similarity / 0.07);
- a linear probe with MAE's head, BatchNorm1d without affine (eps 1e-6) before a linear layer, trained
  on the cached features: SGD with momentum 0.9, lr 0.1 x batch/256 (MAE's LARS rule on a small-data
  budget), no weight decay, cosine decay over 100 epochs after 10 warmup epochs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.datasets import SeededSamples, collate_labelled
from ..data.transforms import eval_transform
from .distributed import DistEnv
from .machine import inference_split
from .parallelize import autocast


@dataclass
class ProbeSettings:
    """The read-outs' hyperparameters (defaults: DINO's k-NN, MAE's linear probe on a short schedule)."""

    k: int = 20
    temperature: float = 0.07
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 256
    base_lr: float = 0.1
    """Linear-probe lr at batch 256 (scaled linearly with the batch)."""
    seed: int = 0


DEFAULTS = ProbeSettings()
KNN_CHUNK = 1024


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: Dataset, batch_size: int = 64,
                     device: str | torch.device = "cpu", num_workers: int = 0, precision: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled final features (N, C) and labels (N,) of a labelled dataset of (PIL image, label),
    center-cropped at the encoder's resolution."""
    was_training = encoder.training
    encoder.eval()
    samples = SeededSamples(dataset, eval_transform(encoder.cfg.img_size))
    loader = DataLoader(samples, batch_size=batch_size, collate_fn=collate_labelled, num_workers=num_workers)
    features, labels = [], []
    for images, targets, _ in loader:
        with autocast(precision, torch.device(device)):
            features.append(encoder(images.to(device)).float().mean(dim=(2, 3)).cpu())
        labels.append(torch.as_tensor(targets))
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """(N, num_classes) class votes: each of the k most cosine-similar training features votes for its
    label with weight exp(similarity / temperature)."""
    bank = F.normalize(train_features.float(), dim=1)
    query = F.normalize(features.float(), dim=1)
    votes = torch.zeros(len(query), num_classes)
    for start in range(0, len(query), KNN_CHUNK):  # bounds the (queries x bank) similarity matrix
        similarity, index = (query[start:start + KNN_CHUNK] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes[start:start + KNN_CHUNK].scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of class scores (N, C)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]
    return {"top1": 100.0 * top[:, 0].float().mean().item(), "top5": 100.0 * top.any(dim=1).float().mean().item()}


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                 settings: ProbeSettings = DEFAULTS) -> nn.Module:
    """MAE's probe head (BatchNorm1d without affine, then linear) trained on cached features."""
    generator = torch.Generator().manual_seed(settings.seed)
    dim = train_features.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    batch = min(settings.batch_size, len(train_features))
    lr = settings.base_lr * batch / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_features) / batch)
    total, warmup = settings.epochs * steps_per_epoch, settings.warmup_epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                                  / max(total - warmup, 1)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            loss = F.cross_entropy(head(train_features[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head.eval()


def probe_features(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                   num_classes: int, settings: ProbeSettings = DEFAULTS) -> dict:
    """k-NN and linear-probe accuracy on cached (features, labels) pairs."""
    knn = topk_accuracy(knn_scores(*train, val[0], num_classes, settings.k, settings.temperature), val[1])
    head = linear_probe(*train, num_classes, settings)
    with torch.no_grad():
        linear = topk_accuracy(head(val[0]), val[1])
    return {"knn": knn, "linear": linear, "train_images": len(train[1]), "val_images": len(val[1]),
            "feature_dim": train[0].shape[1], "settings": asdict(settings)}


def probe_encoder(encoder: nn.Module, train: Dataset, val: Dataset, num_classes: int,
                  settings: ProbeSettings = DEFAULTS, device: str | torch.device = "cpu",
                  batch_size: int = 64, num_workers: int | None = None, threads: int | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Features of both sets extracted once, then both read-outs. On the CPU `threads` and
    `num_workers` (None: chosen from the measured rates, `machine.split_cores`) split the cores; `log`
    gets the line that says how."""
    device = torch.device(device)
    encoder.to(device)
    samples = SeededSamples(train, eval_transform(encoder.cfg.img_size))
    split = inference_split(DistEnv(0, 1, 0, 1, device), samples, collate_labelled, batch_size, encoder, "fp32",
                            threads, num_workers)
    if split is not None and log is not None:
        log(f"cores: {split.describe()}")
    workers = split.workers if split is not None else num_workers or 0
    train_cached = extract_features(encoder, train, batch_size, device, workers)
    val_cached = extract_features(encoder, val, batch_size, device, workers)
    return probe_features(train_cached, val_cached, num_classes, settings)


def summary_line(result: dict) -> str:
    knn, linear = result["knn"], result["linear"]
    return (f"k-NN (k={result['settings']['k']}) top-1 {knn['top1']:.2f}% top-5 {knn['top5']:.2f}% | "
            f"linear probe top-1 {linear['top1']:.2f}% top-5 {linear['top5']:.2f}% "
            f"({result['train_images']} train / {result['val_images']} val images, {result['feature_dim']}-d features)")


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def load_encoder(source: str, model_name: str | None = None) -> nn.Module:
    """The encoder of a simmim training checkpoint, an exported folder, a zoo name with published
    weights, or any supported checkpoint file with `model_name` naming its architecture."""
    from ..zoo.hub import get_model

    if model_name:  # the encoder alone is read: a file without a decoder is fine
        return get_model(model_name, pretrained=source, random_decoder=True).encoder
    return get_model(source, pretrained=True).encoder  # a zoo name's published weights, else the source's own
