"""An encoder as the backbone of torchvision's detectors: multi-scale maps through torchvision's FPN.

`DetectionBackbone(encoder)` returns what `torchvision.models.detection.FasterRCNN`, `MaskRCNN` and
`RetinaNet` take: an `OrderedDict[str, Tensor]` of NCHW maps with `out_channels` set. Swin / Swin V2
hand over one map per stage (`FeatureMaps`); a ViT's last block goes through ViTDet's simple feature
pyramid (Li et al. 2022: deconvolutions and a max-pool to strides 4, 8, 16 and 32). Max-pooled levels are
added on top until there are `levels` of them (5 by default, as torchvision's ResNet FPN: the detectors'
default anchor generator wants five maps and their RoI pooling reads '0'..'3').
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..errors import UsageError
from .features import FeatureMaps
from .layers import DropPath, linear_rates


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's norm between its deconvolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-p map (B, C, g, g) of a plain ViT -> maps at strides
    4, 8, 16 and 32 (for p = 16: two 2x deconvolutions, one, none, a 2x max-pool); their channels are
    C/4, C/2, C, C as in ViTDet. The FPN after it adds the lateral and output convolutions."""

    def __init__(self, channels: int, patch_size: int, strides: tuple[int, ...] = (4, 8, 16, 32)):
        super().__init__()
        self.channels, self.reductions, branches = [], list(strides), []
        for stride in strides:
            ups, c, layers = patch_size // stride, channels, []
            if stride > patch_size:
                if stride % patch_size:
                    raise UsageError(f"stride {stride}: expected a multiple or divisor of the patch size {patch_size}")
                layers = [nn.MaxPool2d(stride // patch_size)]
            elif patch_size % stride or ups & (ups - 1):
                raise UsageError(f"stride {stride}: expected the patch size {patch_size} over a power of two")
            while ups > 1:
                layers.append(nn.ConvTranspose2d(c, c // 2, 2, 2))
                c, ups = c // 2, ups // 2
                if ups > 1:
                    layers += [LayerNorm2d(c), nn.GELU()]
            branches.append(nn.Sequential(*layers))
            self.channels.append(c)
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self.branches]


class PooledLevels(ExtraFPNBlock):
    """`count` more pyramid levels, each a stride-2 subsampling of the one before (torchvision's
    LastLevelMaxPool, repeated); the last is named 'pool' as there."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def forward(self, results: list[torch.Tensor], x: list[torch.Tensor],
                names: list[str]) -> tuple[list[torch.Tensor], list[str]]:
        first = len(names)
        for i in range(self.count):
            results.append(F.max_pool2d(results[-1], 1, 2, 0))
            names.append("pool" if i == self.count - 1 else str(first + i))
        return results, names


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to `rate` over the encoder's blocks, as at construction;
    the encoder's config records it."""
    paths = [m for m in encoder.modules() if isinstance(m, DropPath)]
    for module, p in zip(paths, linear_rates(rate, len(paths)), strict=True):
        module.p = p
    encoder.cfg = dataclasses.replace(encoder.cfg, drop_path_rate=rate)


class DetectionBackbone(nn.Module):
    """(B, 3, H, W) -> OrderedDict('0': stride-4 map, ..., 'pool': the coarsest) of `out_channels` each.

    `body` is the encoder's `FeatureMaps` (Swin, Swin V2: `out_indices` are stages; a ViT's last block
    feeds `pyramid`); `fpn` is torchvision's `FeaturePyramidNetwork`. `frozen_stages=k` keeps the patch
    embedding and the first k stages (ViT: blocks) in eval mode without gradients (0: the patch
    embedding only; None: nothing frozen)."""

    def __init__(self, encoder: nn.Module, out_channels: int = 256, out_indices: tuple[int, ...] | None = None,
                 levels: int = 5, frozen_stages: int | None = None, drop_path_rate: float | None = None):
        super().__init__()
        self.is_vit = not hasattr(encoder, "layers")
        if self.is_vit and out_indices not in (None, (-1,), (len(encoder.blocks) - 1,)):
            raise UsageError(f"out_indices {out_indices}: a ViT feeds its simple pyramid from its last block only")
        if drop_path_rate is not None:
            set_drop_path(encoder, drop_path_rate)
        self.body = FeatureMaps(encoder, (-1,) if self.is_vit else out_indices)
        self.pyramid = SimplePyramid(self.body.channels[0], encoder.cfg.patch_size) if self.is_vit else None
        channels = self.pyramid.channels if self.is_vit else self.body.channels
        self.reductions = self.pyramid.reductions if self.is_vit else self.body.reductions
        if levels < len(channels):
            raise UsageError(f"levels={levels}: expected at least the {len(channels)} maps of the encoder")
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=PooledLevels(levels - len(channels)))
        self.out_channels = out_channels
        self.frozen_stages = frozen_stages
        self._freeze()

    @property
    def encoder(self) -> nn.Module:
        return self.body.encoder

    def frozen_modules(self) -> list[nn.Module]:
        """The encoder's parts that `frozen_stages` holds fixed."""
        if self.frozen_stages is None:
            return []
        stages = self.encoder.blocks if self.is_vit else self.encoder.layers
        if not 0 <= self.frozen_stages <= len(stages):
            raise UsageError(f"frozen_stages={self.frozen_stages}: expected 0 to {len(stages)} "
                             f"(the encoder's {'blocks' if self.is_vit else 'stages'}) or None")
        return [self.encoder.patch_embed, *stages[: self.frozen_stages]]

    def _freeze(self) -> None:
        modules = self.frozen_modules()
        for module in modules:
            module.requires_grad_(False)
        if modules:  # the embeddings added right after the patch embedding belong to it
            for name in ("mask_token", "cls_token", "pos_embed", "absolute_pos_embed"):
                if isinstance(param := getattr(self.encoder, name, None), nn.Parameter):
                    param.requires_grad_(False)

    def train(self, mode: bool = True) -> DetectionBackbone:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.body(images)
        if self.pyramid is not None:
            maps = self.pyramid(maps[-1])
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class SemanticFPN(nn.Module):
    """Semantic segmentation on a `DetectionBackbone`: Panoptic FPN's semantic branch made small. Each
    FPN level up to stride 32 goes through a 3x3 conv (GroupNorm, ReLU), is upsampled to stride 4 and
    summed; a 1x1 conv gives the class logits, upsampled to the input: (B, 3, H, W) -> (B, classes, H, W)."""

    def __init__(self, backbone: DetectionBackbone, num_classes: int, channels: int = 64, max_stride: int = 32):
        super().__init__()
        self.backbone = backbone
        self.levels = [str(i) for i, r in enumerate(backbone.reductions) if r <= max_stride]
        c = backbone.out_channels
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, channels, 3, padding=1, bias=False),
                                                 nn.GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True))
                                   for _ in self.levels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)
        size = maps[self.levels[0]].shape[-2:]
        fused = sum(F.interpolate(conv(maps[k]), size=size, mode="bilinear", align_corners=False)
                    for k, conv in zip(self.levels, self.convs, strict=True))
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=False)
