"""Top-1 / top-5 accuracy and cross-entropy of a classifier on a labelled image set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import training as checkpoints
from ..config import TrainConfig
from ..data.datasets import EpochSampler, SeededSamples, collate_labelled
from ..data.transforms import eval_transform
from ..errors import UsageError
from ..zoo.hub import get_model, is_exported
from ..zoo.runs import load_run
from ..zoo.sources import parse_hub
from .builders import eval_loader, eval_source
from .distributed import DistEnv, all_reduce_sum, setup, teardown
from .machine import inference_split
from .parallelize import autocast, resolve_precision


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, sampler: EpochSampler, env: DistEnv,
                    precision: str = "fp32") -> dict[str, float]:
    """Exact metrics over the whole set, however it is sharded: padding samples of the last shards
    are run (every rank must, under FSDP) but not counted."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # top-1 hits, top-5 hits, loss sum, count
    seen = 0
    for images, targets, _ in loader:
        with autocast(precision, env.device):
            logits = model(images.to(env.device, non_blocking=True))
        take = max(min(len(targets), sampler.real_count - seen), 0)
        seen += len(targets)
        logits, targets = logits[:take].float(), targets[:take].to(env.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([top[:, 0].sum(), top.any(dim=1).sum(),
                               F.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(take, device=env.device)]).double()
    model.train(was_training)
    top1, top5, loss, count = all_reduce_sum(totals, env).tolist()
    n = max(count, 1)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(count)}


def load_run_model(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The model of a training run's folder (its newest checkpoint) or a simmim training checkpoint
    (pretraining or fine-tuning; a file or a sharded checkpoint directory), and its run's config."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    found = load_run(path)
    if found is None:
        raise UsageError(f"{path} is not a simmim training checkpoint (no {checkpoints.FORMAT!r} format tag) or a "
                         "training run's folder")
    model, config = found
    return model, TrainConfig.from_dict(config)


def load_classifier(path: str | Path) -> tuple[nn.Module, TrainConfig]:
    """The fine-tuned classifier of a simmim training checkpoint, and its run's config."""
    model, cfg = load_run_model(path)
    if cfg.task != "finetune":
        raise UsageError(f"{path} is a {cfg.task} checkpoint; evaluate needs a fine-tuned classifier")
    return model, cfg


def load_eval_classifier(path: str | Path, model: str | None, num_classes: int) -> tuple[nn.Module, str]:
    """A classifier to evaluate and its precision setting, from a simmim fine-tuning checkpoint (its
    run's precision), an exported folder (`simmim export`, on disk or `hf-hub:`), or, with the zoo
    name `model` of its architecture, any weights source (`zoo.sources`: a checkpoint of any supported
    layout, official, mmpretrain, HF or ours, an HF folder, `hf-hub:`) with a head of `num_classes`
    outputs."""
    path = Path(path)
    if model:  # any weights source (`zoo.sources`): an HF folder, a file, hf-hub:...
        return get_model(model, pretrained=str(path), num_classes=num_classes), "auto"
    if is_exported(path) or parse_hub(str(path)):  # an exported folder, on disk or on the Hub
        return get_model(str(path)), "auto"
    try:
        classifier, cfg = load_classifier(path)
    except UsageError as err:
        if "is not a simmim training checkpoint" not in str(err):
            raise
        raise UsageError(f"{path} is neither a simmim training checkpoint nor an exported folder; for a "
                         "published checkpoint (official, mmpretrain or HF layout) pass --model NAME, its zoo "
                         "architecture") from None
    return classifier, cfg.runtime.precision


def evaluate(checkpoint_or_model: str | Path | nn.Module, data: str, batch_size: int = 64, device: str = "auto",
             num_workers: int | None = None, model: str | None = None, threads: int | None = None,
             log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of a classifier on `data`: DIR/val (or DIR
    itself) with one folder per class, or 'fashion-mnist' (its test split). The classifier is a model, a
    simmim fine-tuning checkpoint, an exported folder, or with `model` (a zoo name) a published checkpoint
    of that architecture (see `load_eval_classifier`). Images are resized to size x 256/224 and
    center-cropped. On the CPU `threads` and `num_workers` (None: chosen from the measured rates,
    `machine.split_cores`) split the cores; `log` gets the line that says how."""
    env = setup(device)
    try:
        source = eval_source(data)
        if isinstance(checkpoint_or_model, nn.Module):
            classifier, precision = checkpoint_or_model, "auto"
        else:
            classifier, precision = load_eval_classifier(checkpoint_or_model, model, len(source.classes))
        if not hasattr(classifier, "num_classes"):
            raise UsageError(f"{checkpoint_or_model} is a pretraining model; evaluate needs a classifier")
        if len(source.classes) != classifier.num_classes:
            raise UsageError(f"{data} has {len(source.classes)} classes, the classifier {classifier.num_classes}")
        dataset = SeededSamples(source, eval_transform(classifier.encoder.cfg.img_size))
        precision = resolve_precision(precision, env.device)
        classifier = classifier.to(env.device)
        split = inference_split(env, dataset, collate_labelled, batch_size, classifier, precision, threads,
                                num_workers)
        if split is not None and log is not None:
            log(f"cores: {split.describe()}")
        loader, sampler = eval_loader(dataset, collate_labelled, batch_size, env,
                                      num_workers if split is None else split.workers)
        return evaluate_loader(classifier, loader, sampler, env, precision)
    finally:
        teardown(env)
