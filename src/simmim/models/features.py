"""Multi-scale feature maps of an encoder, for detection and segmentation necks (timm's features_only)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError


class FeatureMaps(nn.Module):
    """An encoder that returns a list of NCHW maps, one per chosen stage (Swin, Swin V2) or block
    (ViT): `FeatureMaps(encoder, out_indices=(0, 1, 2, 3))(images) -> [(B, C_i, H_i, W_i), ...]`.
    `channels` and `reductions` describe the maps, as timm's `feature_info` does."""

    def __init__(self, encoder: nn.Module, out_indices: tuple[int, ...] | None = None):
        super().__init__()
        info = encoder.feature_info()
        count = len(info)
        indices = tuple(range(count)) if out_indices is None else tuple(out_indices)
        bad = [i for i in indices if not -count <= i < count]
        if bad or not indices:
            raise UsageError(f"out_indices {indices}: expected indices in [{-count}, {count}) of the encoder's "
                             f"{count} {'stages' if hasattr(encoder, 'layers') else 'blocks'}")
        self.encoder = encoder
        self.out_indices = tuple(sorted({i % count for i in indices}))
        self.channels = [info[i][0] for i in self.out_indices]
        self.reductions = [info[i][1] for i in self.out_indices]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder.forward_intermediates(images, self.out_indices)
