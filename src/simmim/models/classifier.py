"""Image classifier on a SimMIM encoder, for fine-tuning and evaluation."""

from __future__ import annotations

import torch
from torch import nn

from .layers import trunc_normal


class Classifier(nn.Module):
    """Global average pool of the encoder's feature map, an optional `fc_norm` (the BEiT-style ViT's
    mean pooling; Swin normalizes before pooling), and a linear head. Encoder weights are named as
    in the pretraining model, so they move between the two without renaming."""

    def __init__(self, encoder: nn.Module, num_classes: int, fc_norm: bool = False):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        dim = encoder.num_features
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if fc_norm else None
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pooled features (B, C)."""
        pooled = self.encoder(images).mean(dim=(2, 3))
        return self.fc_norm(pooled) if self.fc_norm is not None else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))
