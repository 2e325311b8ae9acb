"""The SimMIM method: an encoder that takes a mask, a linear decoder, and L1 on masked pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.masking import MaskGenerator
from ..errors import UsageError
from .fused import PointwiseConv

LOSSES = ("l1", "l2")


@dataclass
class SimMIMOutput:
    loss: torch.Tensor
    """Scalar: mean error over masked pixels and channels."""
    reconstruction: torch.Tensor
    """(B, C, H, W), in the normalized space of the input."""


def upsample_mask(mask: torch.Tensor, image_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Model-patch mask (B, h, w) or (B, h*w) -> pixel mask (B, 1, H, W)."""
    h, w = image_size[0] // patch_size, image_size[1] // patch_size
    mask = mask.reshape(mask.shape[0], h, w)
    return mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def local_moments(images: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel and channel: mean and unbiased variance (clamped at 0) of the `window` x `window`
    neighbourhood inside the image (zero padding not counted), as the official `norm_targets`."""
    if window < 3 or window % 2 == 0:
        raise UsageError(f"normalized-target window {window}: expected an odd size >= 3 (the releases use 47)")
    x = images.float()
    pool = dict(kernel_size=window, stride=1, padding=window // 2)
    mean = F.avg_pool2d(x, **pool, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, **pool, count_include_pad=False)
    # pixels of each window that lie inside the image, for the unbiased correction
    count = F.avg_pool2d(torch.ones_like(x[:1, :1]), **pool, count_include_pad=True) * window**2
    return mean, ((mean_sq - mean**2) * count / (count - 1)).clamp(min=0)


def normalized_target(images: torch.Tensor, window: int) -> torch.Tensor:
    """The SwinV2 SimMIM releases' target (`NORM_TARGET`, microsoft/Swin-Transformer): each pixel
    standardised by its local moments, (x - mean) / sqrt(var + 1e-6)."""
    mean, var = local_moments(images, window)
    return (images.float() - mean) / (var + 1e-6).sqrt()


def masked_reconstruction_loss(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor,
                               patch_size: int, kind: str = "l1") -> torch.Tensor:
    """Official SimMIM loss: per-pixel error summed over masked pixels, divided by
    (masked pixels + 1e-5) and by the number of channels."""
    pixel_mask = upsample_mask(mask, images.shape[-2:], patch_size).to(torch.float32)
    rec, target = reconstruction.float(), images.float()
    if kind == "l1":
        err = F.l1_loss(rec, target, reduction="none")
    elif kind == "l2":
        err = F.mse_loss(rec, target, reduction="none")
    else:
        raise UsageError(f"loss kind {kind!r}: expected 'l1' or 'l2'")
    return (err * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / images.shape[1]


class SimMIM(nn.Module):
    """Masked image modeling around an encoder exposing `num_features`, `encoder_stride` and
    `patch_size`: `model(images, mask) -> SimMIMOutput(loss, reconstruction)`.

    `decoder="linear"` is the paper's 1x1 conv to stride**2 * 3 channels + PixelShuffle;
    `"mlp"` puts a hidden 1x1 conv layer in front of it (the paper's head ablation).
    `norm_target_window` > 0 reconstructs `normalized_target(images, window)` instead of the
    pixels (the SwinV2 releases' 47); the reconstruction is then in that normalized space."""

    def __init__(self, encoder: nn.Module, mask_patch_size: int = 32, mask_ratio: float = 0.6,
                 loss: str = "l1", decoder: str = "linear", in_chans: int = 3, norm_target_window: int = 0):
        super().__init__()
        if norm_target_window:
            local_moments(torch.zeros(1, 1, 3, 3), norm_target_window)  # rejects a bad window now
        self.norm_target_window = norm_target_window
        self.encoder = encoder
        self.patch_size, self.encoder_stride = encoder.patch_size, encoder.encoder_stride
        if loss not in LOSSES:  # refused here, not at the first forward
            raise UsageError(f"loss {loss!r}: expected {' or '.join(map(repr, LOSSES))}")
        self.loss_kind, self.decoder_kind = loss, decoder
        self.mask_generator = MaskGenerator(encoder.cfg.img_size, mask_patch_size, encoder.patch_size, mask_ratio)
        out = self.encoder_stride**2 * in_chans
        dim = encoder.num_features
        if decoder == "linear":
            layers = [PointwiseConv(dim, out)]
        elif decoder == "mlp":
            layers = [PointwiseConv(dim, dim), nn.GELU(), PointwiseConv(dim, out)]
        else:
            raise UsageError(f"decoder {decoder!r}: expected 'linear' or 'mlp'")
        self.decoder = nn.Sequential(*layers, nn.PixelShuffle(self.encoder_stride))

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def random_mask(self, batch_size: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """A fresh mask per sample at model-patch resolution (B, h, w), 1 = masked."""
        return self.mask_generator.batch(batch_size, rng)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> SimMIMOutput:
        reconstruction = self.decoder(self.encoder(images, mask))
        loss = masked_reconstruction_loss(self.target(images), reconstruction, mask, self.patch_size, self.loss_kind)
        return SimMIMOutput(loss, reconstruction)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs: the pixels, or their normalized target."""
        return normalized_target(images, self.norm_target_window) if self.norm_target_window else images

    def in_input_space(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """The reconstruction in the space of `images` (for pictures): a normalized-target model's
        output is mapped back with the input's local moments."""
        if not self.norm_target_window:
            return reconstruction
        mean, var = local_moments(images, self.norm_target_window)
        return reconstruction.float() * (var + 1e-6).sqrt() + mean
