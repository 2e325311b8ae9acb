"""SimMIM random masking: square blocks of `mask_patch_size` pixels, returned at model-patch resolution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError


@dataclass(frozen=True)
class MaskGenerator:
    """Draws a SimMIM mask: `ceil(blocks * mask_ratio)` of the `(input_size / mask_patch_size)**2`
    blocks are masked (1), each block covering `mask_patch_size / model_patch_size` model patches
    per side. Called with a numpy Generator it returns an int64 tensor of shape
    `(input_size / model_patch_size,) * 2`: 48x48 for Swin at 192 px, 14x14 for ViT/16 at 224 px."""

    input_size: int = 192
    mask_patch_size: int = 32
    model_patch_size: int = 4
    mask_ratio: float = 0.6

    def __post_init__(self) -> None:
        if self.input_size % self.mask_patch_size:
            raise UsageError(
                f"mask_patch_size={self.mask_patch_size} must divide input_size={self.input_size}"
            )
        if self.mask_patch_size % self.model_patch_size:
            raise UsageError(
                f"mask_patch_size={self.mask_patch_size} must be a multiple of the model's "
                f"patch size {self.model_patch_size}"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise UsageError(f"mask_ratio={self.mask_ratio} must lie in (0, 1)")

    @property
    def blocks_per_side(self) -> int:
        return self.input_size // self.mask_patch_size

    @property
    def mask_count(self) -> int:
        """Number of masked blocks; the official code rounds up (22 of 36 at ratio 0.6)."""
        return math.ceil(self.blocks_per_side**2 * self.mask_ratio)

    @property
    def scale(self) -> int:
        return self.mask_patch_size // self.model_patch_size

    def __call__(self, rng: np.random.Generator | None = None) -> torch.Tensor:
        rng = rng if rng is not None else np.random.default_rng()
        side = self.blocks_per_side
        blocks = np.zeros(side * side, dtype=np.int64)
        blocks[rng.permutation(side * side)[: self.mask_count]] = 1
        mask = blocks.reshape(side, side).repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return torch.from_numpy(mask)

    def batch(self, batch_size: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """A new random mask per sample: (batch_size, side, side)."""
        rng = rng if rng is not None else np.random.default_rng()
        return torch.stack([self(rng) for _ in range(batch_size)])
