"""Swin Transformer V2 (Liu et al., 2022) as SimMIM uses it: an encoder that can take a mask.

What changes from V1 (models/swin.py, whose stages, windows, padding, shift masks and patch
embedding this reuses): scaled cosine attention with a learned per-head logit scale (clamped at
log 100), a continuous relative position bias from a small MLP (2 -> 512 -> heads, 16 * sigmoid)
on log-spaced coordinates, separate q/v biases (no k bias), residual post-norm (the norms after
attention and MLP, zero-initialised), and patch merging that reduces before it normalizes.

Parameter names follow microsoft/Swin-Transformer's swin_transformer_v2.py, so the official SimMIM
SwinV2 checkpoints load as they are. The bias has no table to resize: a model takes another window
by evaluating its MLP at the new coordinates, normalised by `pretrained_window_sizes` as the
official fine-tuning configs do (e.g. a window-12 model fine-tuned at window 24).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .fused import linear, window_mask
from .layers import DropPath, Mlp, linear_layer, on_default_device, relative_position_index
from .swin import SwinConfig, SwinStage, SwinTransformer, Windows, attend_in_windows, merge_neighbours

LOGIT_SCALE_MAX = math.log(100.0)  # the official clamp: attention logits are at most 100 x cosine
CPB_HIDDEN = 512
CPB_RANGE = 8.0  # coordinates are scaled to [-8, 8] before the log
BIAS_SCALE = 16.0  # 16 * sigmoid: the bias lies in (0, 16)


@dataclass
class SwinV2Config(SwinConfig):
    """Hyperparameters of a Swin V2 encoder: the V1 fields (qkv_bias now the separate q and v biases)
    and the two V2 ones."""

    pretrained_window_sizes: tuple[int, ...] = ()
    """Per stage, the window the model was pretrained with, which normalises the log-spaced
    coordinates so that a larger window extrapolates the learned bias; 0 (or empty) normalises by
    the stage's own window (the official fine-tuning configs set e.g. (12, 12, 12, 6))."""
    extra_norm_period: int = 0
    """A LayerNorm on the main branch after every N-th block of a stage (the paper's SwinV2-H/G
    stabiliser; absent from the official code and its released checkpoints); 0 for none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pretrained_window_sizes = tuple(self.pretrained_window_sizes)
        if self.pretrained_window_sizes and len(self.pretrained_window_sizes) != len(self.depths):
            raise UsageError(f"pretrained_window_sizes {self.pretrained_window_sizes}: expected one per stage "
                             f"({len(self.depths)}) or none")
        if any(w < 0 for w in self.pretrained_window_sizes):
            raise UsageError(f"pretrained_window_sizes {self.pretrained_window_sizes}: expected sizes >= 0")
        if self.extra_norm_period < 0:
            raise UsageError(f"extra_norm_period={self.extra_norm_period}: expected 0 (none) or a block count")

    def pretrained_window(self, stage: int) -> int:
        return self.pretrained_window_sizes[stage] if self.pretrained_window_sizes else 0


@functools.lru_cache(maxsize=32)
def log_spaced_coords(window: int, pretrained_window: int) -> torch.Tensor:
    """((2w-1)**2, 2) relative offsets (dy, dx) of a window, in the row order of the relative
    position index: scaled so that +-(pretrained_window - 1) maps to +-8, then sign * log2(1 + |x|) / 3."""
    side = torch.arange(-(window - 1), window, dtype=torch.float32, device="cpu")  # cached: never on meta
    coords = torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).view(-1, 2)
    coords = coords * (CPB_RANGE / max((pretrained_window or window) - 1, 1))
    return torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(CPB_RANGE)


class WindowAttentionV2(nn.Module):
    """Scaled cosine attention inside windows with a continuous relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, pretrained_window: int, qkv_bias: bool,
                 attn_drop: float, proj_drop: float, fused: bool = True):
        super().__init__()
        self.num_heads, self.window, self.pretrained_window = num_heads, window, pretrained_window
        self.linear = linear if fused else F.linear
        layer = linear_layer(fused)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(layer(2, CPB_HIDDEN), nn.ReLU(inplace=True),
                                     layer(CPB_HIDDEN, num_heads, bias=False))
        self.register_buffer("relative_coords_table", on_default_device(log_spaced_coords(window, pretrained_window)),
                             persistent=False)
        self.register_buffer("relative_position_index", on_default_device(relative_position_index(window, window)),
                             persistent=False)
        self.qkv = layer(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = attn_drop
        self.proj = layer(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, window: int) -> torch.Tensor:
        """(nH, N, N) bias in (0, 16) for a window of side `window`: the MLP at its coordinates."""
        if window == self.window:
            coords, index = self.relative_coords_table, self.relative_position_index
        else:  # a clamped window, or a model run at another size: no table to resize, only coordinates
            device = self.logit_scale.device
            coords = log_spaced_coords(window, self.pretrained_window).to(device)
            index = relative_position_index(window, window).to(device)
        table = BIAS_SCALE * torch.sigmoid(self.cpb_mlp(coords.to(self.logit_scale.dtype)))  # ((2w-1)^2, nH)
        n = window * window
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B*nW, N, C) window tokens; mask: (nW, N, N) additive shift mask or None."""
        g, n, c = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        q, k, v = self.linear(x, self.qkv.weight, bias).view(g, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # cosine similarity times the per-head scale; SDPA with scale=1 adds the bias to exactly that
        q = F.normalize(q, dim=-1) * torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()
        k = F.normalize(k, dim=-1)
        attn_bias = self.relative_position_bias(math.isqrt(n)).unsqueeze(0)
        attn_bias = attn_bias if mask is None else attn_bias + mask.unsqueeze(1)  # (nW|1, nH, N, N)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(attn_bias, g, q.dtype), dropout_p=dropout,
                                             scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(g, n, c)))


class SwinBlockV2(nn.Module):
    """Residual post-norm block: x + norm1(attn(x)), then x + norm2(mlp(x)), each branch with drop
    path; optionally an extra norm on the main branch after it (`norm3`)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, cfg: SwinV2Config, drop_path: float,
                 pretrained_window: int, extra_norm: bool):
        super().__init__()
        self.window, self.shift, self.fused = window, shift, cfg.fused
        self.attn = WindowAttentionV2(dim, num_heads, window, pretrained_window, cfg.qkv_bias,
                                      cfg.attn_drop_rate, cfg.drop_rate, cfg.fused)
        self.norm1 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate, cfg.fused)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim) if extra_norm else None

    def forward(self, x: torch.Tensor, windows: Windows) -> torch.Tensor:
        """x: (B, H, W, C); padding tokens enter the windows as zeros (as in HF)."""
        if self.fused:  # padding, shift and partition as one token gather, and back
            b, h, w, c = x.shape
            tokens = windows.gather(x.view(b, h * w, c))  # (B, nW*N, C)
            y = self.attn(tokens.view(-1, windows.size**2, c), windows.mask)
            y = windows.reverse(y, b).view(b, h, w, c)
        else:
            y = attend_in_windows(x, self.attn, windows)
        x = x + self.drop_path(self.norm1(y))
        x = x + self.drop_path(self.norm2(self.mlp(x)))
        return self.norm3(x) if self.norm3 is not None else x


class PatchMergingV2(nn.Module):
    """2x2 neighbourhood concatenation, linear 4C -> 2C, then LayerNorm (V2 normalizes the output)."""

    def __init__(self, dim: int, fused: bool = True):
        super().__init__()
        self.reduction = linear_layer(fused)(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(merge_neighbours(x)))


class SwinStageV2(SwinStage):
    """A V1 stage (windows, shifts, padding, checkpointing) of V2 blocks and merging."""

    merging = PatchMergingV2

    def make_block(self, stage: int, index: int, window: int, shift: int, cfg: SwinV2Config,
                   drop_path: float) -> nn.Module:
        period = cfg.extra_norm_period
        return SwinBlockV2(cfg.embed_dim * 2**stage, cfg.num_heads[stage], window, shift, cfg, drop_path,
                           cfg.pretrained_window(stage), extra_norm=period > 0 and (index + 1) % period == 0)


class SwinTransformerV2(SwinTransformer):
    """Swin V2 encoder with the V1 interface: (B,3,H,W) [+ mask (B,H/p,W/p)] -> normalized feature
    map (B, C, H/s, W/s)."""

    stage = SwinStageV2

    def __init__(self, cfg: SwinV2Config):
        super().__init__(cfg)
        # the official init: every residual branch starts at zero, so each block starts as the identity
        for block in (b for layer in self.layers for b in layer.blocks):
            for norm in (block.norm1, block.norm2):
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)

    def no_weight_decay(self) -> set[str]:
        """V1's names plus, as the official no_weight_decay_keywords, the bias MLPs and logit scales."""
        own = {n for n, _ in self.named_parameters() if ".cpb_mlp." in n or n.endswith(".logit_scale")}
        return super().no_weight_decay() | own
