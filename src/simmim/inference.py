"""`inference_model`, as mmpretrain documents it, plus reconstructions for pretraining models."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data.transforms import eval_transform
from .errors import BadArgument, UsageError
from .models import SimMIM
from .models.simmim import masked_reconstruction_loss
from .viz import reconstruction_panels
from .zoo.hub import get_model, is_exported
from .zoo.sources import resolve

ImageLike = str | Path | Image.Image | np.ndarray


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in label order (shipped with timm)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def class_names(model: nn.Module) -> Sequence[str]:
    """The model's own class names, ImageNet's for 1000 classes, else the label numbers."""
    if getattr(model, "classes", None):
        return model.classes
    return imagenet_classes() if model.num_classes == 1000 else [str(i) for i in range(model.num_classes)]


def load_image(image: ImageLike) -> Image.Image:
    """A path, PIL image or HxW[xC] uint8 array as an RGB PIL image."""
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError) as err:
            raise UsageError(f"{path}: cannot read the image ({err})") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UsageError(f"array image of dtype {image.dtype} and shape {image.shape}: expected HxW or HxWxC uint8")
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise BadArgument(f"cannot read an image from a {type(image).__name__}; expected a path, PIL image or array")


def _to_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def load_model(model: str | Path, weights: str | Path | None = None, random_weights: bool = False,
               random_decoder: bool = False) -> nn.Module:
    """A zoo name with its published weights (or `weights`, or none with `random_weights`), or a source
    that carries its own weights: an exported directory, a training run's folder or checkpoint."""
    if random_weights and weights:
        raise UsageError("--weights and --random-weights exclude each other: pass one of them")
    # an exported folder may lend its architecture to other weights; nothing gives it random ones
    if Path(model).exists() and (random_weights or (weights and not is_exported(model))):
        raise UsageError(f"{model} carries its own weights: drop --weights / --random-weights")
    return get_model(model, pretrained=weights or not random_weights, random_decoder=random_decoder)


def checkpoint_mask_settings(weights: str | Path) -> dict:
    """The mask a checkpoint's run was trained with, as SimMIM overrides (mask_patch_size, mask_ratio):
    from the config of a simmim training checkpoint (file or sharded directory) or an official one
    (any weights source, `zoo.sources`); {} for formats that do not record it."""
    from .checkpoint.io import load_checkpoint_file
    from .checkpoint.sharded import STATE_FILE
    from .checkpoint.training import FORMAT

    path = resolve(weights)
    state = load_checkpoint_file(path / STATE_FILE if path.is_dir() else path)
    config = state.get("config")
    if not isinstance(config, dict):
        return {}
    if state.get("format") == FORMAT:  # ours: a TrainConfig as plain data
        return {"mask_patch_size": config["mask"]["patch_size"], "mask_ratio": config["mask"]["ratio"]}
    data = config.get("DATA", {})  # official: the yacs config
    if "MASK_PATCH_SIZE" in data and "MASK_RATIO" in data:
        return {"mask_patch_size": data["MASK_PATCH_SIZE"], "mask_ratio": data["MASK_RATIO"]}
    return {}


def set_mask(model: SimMIM, **settings) -> SimMIM:
    """The model with another mask generator (mask_patch_size and/or mask_ratio), checked as at build."""
    model.mask_generator = dataclasses.replace(model.mask_generator, **settings)
    return model


def preprocess(model: nn.Module, images: Sequence[ImageLike]) -> tuple[list[Image.Image], torch.Tensor]:
    """The images as RGB PIL images and as one batch through the model's test transform."""
    pil = [load_image(img) for img in images]
    transform = eval_transform(model.encoder.cfg.img_size)
    return pil, torch.stack([transform(img) for img in pil])


def mask_shape(model: SimMIM) -> tuple[int, int]:
    """(h, w) of the model's masks: one entry per model patch."""
    side = model.encoder.cfg.img_size // model.patch_size
    return side, side


def check_mask(model: SimMIM, mask: torch.Tensor | np.ndarray | Sequence, batch_size: int) -> torch.Tensor:
    """A 0/1 mask of shape (h, w) or (batch_size, h, w) as an int64 (batch_size, h, w) tensor."""
    try:
        mask = torch.as_tensor(np.asarray(mask))
    except (TypeError, ValueError) as err:  # ragged rows, non-numbers
        raise UsageError(f"mask: expected a grid of 0/1 numbers ({err})") from None
    h, w = mask_shape(model)
    if mask.shape not in ((h, w), (batch_size, h, w)):
        raise UsageError(f"mask of shape {tuple(mask.shape)}: expected {h}x{w} (one 0/1 entry per model patch)")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise UsageError(f"mask values {sorted(set(mask.flatten().tolist()))[:5]}: expected only 0 and 1")
    return mask.long().expand(batch_size, h, w)


@torch.no_grad()
def classify(model: nn.Module, batch: torch.Tensor) -> list[dict]:
    """pred_label, pred_score, pred_class and pred_scores (all class probabilities) per image."""
    names = class_names(model)
    scores = model(batch).float().softmax(-1).cpu()
    return [{"pred_label": int(s.argmax()), "pred_score": float(s.max()), "pred_class": names[int(s.argmax())],
             "pred_scores": s.numpy()} for s in scores]


@torch.no_grad()
def reconstruct(model: SimMIM, batch: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """Per image: loss (its own masked-pixel L1), mask and PIL images original / masked /
    reconstruction / pasted. `mask` is (B, h, w) at model-patch resolution, 1 = masked."""
    mask = mask.to(batch.device)
    out = model(batch, mask)
    panels = reconstruction_panels(batch, mask, model.in_input_space(batch, out.reconstruction), model.patch_size)
    keys = ("original", "masked", "reconstruction", "pasted")
    # each image's own loss, so that an image's result does not depend on the others in its batch
    target = model.target(batch)
    losses = [masked_reconstruction_loss(target[i:i + 1], out.reconstruction[i:i + 1], mask[i:i + 1],
                                         model.patch_size, model.loss_kind) for i in range(len(batch))]
    return [{"loss": float(loss), "mask": m.cpu().numpy(), **{k: _to_pil(p) for k, p in zip(keys, row, strict=True)}}
            for loss, m, row in zip(losses, mask, panels, strict=True)]


@torch.no_grad()
def inference_model(model: str | Path | nn.Module, images: ImageLike | Sequence[ImageLike],
                    weights: str | Path | None = None, device: str | torch.device = "cpu",
                    seed: int = 0, mask: torch.Tensor | np.ndarray | None = None) -> dict | list[dict]:
    """Classifies images (or, for a pretraining model, reconstructs a masked copy).

    `model` is a zoo name (published weights are downloaded unless `weights` names a file), an
    exported directory, or a model. A single image gives a dict, a list gives a list of dicts:
    classifiers: pred_label, pred_score, pred_class, pred_scores (all class probabilities);
    pretraining models: loss, mask (h x w, 1 = masked) and PIL images original / masked /
    reconstruction / pasted (reconstruction inside the masked patches, the original elsewhere).
    The mask is random (drawn from `seed`) unless `mask` gives it, (h, w) or (B, h, w)."""
    if not isinstance(model, nn.Module):
        model = load_model(model, weights)
    model = model.to(device).eval()
    single = not isinstance(images, list | tuple)
    _, batch = preprocess(model, [images] if single else images)
    batch = batch.to(device)
    if isinstance(model, SimMIM):
        if mask is None:
            mask = model.random_mask(len(batch), np.random.default_rng(seed))
        mask = check_mask(model, mask, len(batch))
        results = reconstruct(model, batch, mask)
    else:
        results = classify(model, batch)
    return results[0] if single else results
