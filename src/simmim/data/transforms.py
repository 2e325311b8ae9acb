"""Image transforms of the SimMIM recipes."""

from __future__ import annotations

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Test transform: bicubic resize of the short side to size*256/224, center crop, normalize."""
    return T.Compose([
        T.Resize(int(size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalized (B, 3, H, W) -> pixels in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def _posterize(img, bits_to_keep, **_):
    """timm's posterize for Pillow >= 13, which refuses 0 bits: keeping no bit is a black image, as
    older Pillow gave (RandAugment's increasing posterize reaches 0 at high magnitudes)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_posterize(transform: T.Compose) -> T.Compose:
    """Swaps timm's posterize inside any RandAugment of `transform` for `_posterize` (in place)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform
