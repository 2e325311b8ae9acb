"""Building blocks shared by the encoders."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .fused import Linear, PointwiseConv, gelu_linear, norm_linear


def trunc_normal(t: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """The truncated normal init used throughout Swin/BEiT (cut at +-2, absolute)."""
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def init_weights(m: nn.Module) -> None:
    """Official Swin/BEiT init: truncated normal linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        trunc_normal(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def cached_table(maxsize: int) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """functools.lru_cache for a function that builds a constant CPU tensor, which it builds outside
    inference mode: a table first built under torch.inference_mode (an evaluation, a server) is then
    still one that a later training forward may save for its backward."""
    def wrap(build: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args):
            with torch.inference_mode(False):
                return build(*args)
        return cached
    return wrap


@cached_table(maxsize=16)
def relative_position_index(window: int, table_window: int) -> torch.Tensor:
    """(N, N) indices into a (2*table_window-1)**2 bias table for the N = window**2 tokens of a window;
    with window == table_window this is the official `relative_position_index` buffer."""
    side = torch.arange(window, device="cpu")  # cached: never on the default (possibly meta) device
    coords = torch.stack(torch.meshgrid(side, side, indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (table_window - 1)
    return rel[..., 0] * (2 * table_window - 1) + rel[..., 1]


def linear_rates(last: float, count: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to `last` over `count` blocks."""
    return [last * i / max(count - 1, 1) for i in range(count)]


def on_default_device(t: torch.Tensor) -> torch.Tensor:
    """A private copy of a cached tensor on the device modules are being built on."""
    return t.to(torch.get_default_device(), copy=True)


def apply_mask_token(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """SimMIM masking right after patch embedding: x * (1 - w) + mask_token * w.
    tokens: (B, L, C); mask: (B, h, w) or (B, L), 1 = masked."""
    b, length, _ = tokens.shape
    if mask.numel() != b * length:
        raise UsageError(f"mask of shape {tuple(mask.shape)} does not cover the {length} patches of the image")
    w = mask.reshape(b, length, 1).to(tokens.dtype)
    # one fused pass; lerp returns either end exactly for w in {0, 1}
    return torch.lerp(tokens, mask_token.to(tokens.dtype), w)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch per sample with probability p while training.

    The same draws and scaling as timm's `DropPath` (a test compares them under one seed); kept here
    because importing timm.layers would add timm and torchvision to every model's import, which the
    inference commands do without."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (noise.div_(keep) if keep > 0 else noise)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def linear_layer(fused: bool) -> type[nn.Linear]:
    """The linear layer class of a path: nn.Linear, or on the fused path the same layer (parameters and
    state dict) computed through models/fused.py."""
    return Linear if fused else nn.Linear


def pointwise_conv(fused: bool, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 convolution: nn.Conv2d, or on the fused path the same layer (parameters and state dict)
    computed through models/fused.py."""
    if fused:
        return PointwiseConv(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.fc1 = linear_layer(fused)(dim, hidden)
        self.fc2 = linear_layer(fused)(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim)."""
        if self.fused:
            return self.forward_fused(x)
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))

    def forward_fused(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """The same as `forward(norm(x))`, with the norm fused into fc1 and GELU recomputed in fc2's backward."""
        h = self.fc1(x) if norm is None else norm_linear(x, norm, self.fc1)
        if self.training and self.drop.p > 0:  # a dropout between GELU and fc2 needs its output kept
            return self.drop(self.fc2(self.drop(F.gelu(h))))
        return self.drop(gelu_linear(h, self.fc2.weight, self.fc2.bias))


def resize_abs_pos_embed(
    pos: torch.Tensor,
    new_grid: tuple[int, int],
    num_extra_tokens: int = 0,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubically resize a (1, extra + H*W, C) absolute position embedding to `new_grid`, extras first:
    for checkpoints of another input size, and in the forward of inputs of another size."""
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise UsageError(f"position embedding must have shape (1, L, C), got {tuple(pos.shape)}")
    num_grid = pos.shape[1] - num_extra_tokens
    if old_grid is None:
        side = math.isqrt(num_grid)
        if side * side != num_grid:
            raise UsageError(f"{num_grid} grid tokens are not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid:
        raise UsageError(f"old_grid {old_grid} does not match the {num_grid} grid tokens")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    extra, grid = pos[:, :num_extra_tokens], pos[:, num_extra_tokens:]
    channels = pos.shape[2]
    grid = grid.reshape(1, old_grid[0], old_grid[1], channels).permute(0, 3, 1, 2)
    # CPU bicubic interpolation does not support every low-precision dtype, so resize in float32.
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], channels).to(pos.dtype)
    return torch.cat([extra, grid], dim=1)
