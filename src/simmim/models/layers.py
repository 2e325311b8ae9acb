"""Building blocks shared by the encoders."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .fused import Linear, gelu_linear, norm_linear


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


@functools.lru_cache(maxsize=16)
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
    """Stochastic depth: drops the residual branch per sample with probability p while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * noise.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def linear_layer(fused: bool) -> type[nn.Linear]:
    """The linear layer class of a path: nn.Linear, or on the fused path the same layer (parameters and
    state dict) computed through models/fused.py."""
    return Linear if fused else nn.Linear


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
