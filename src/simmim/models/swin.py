"""Swin Transformer V1 (Liu et al., 2021) as SimMIM uses it: an encoder that can take a mask.

Parameter names follow the official microsoft/SimMIM checkpoints, so their weights load as they are.
The window policy is decided per forward from the actual feature-map size, so one model runs at any
input size: the official policy clamps the window to a map that is not larger than it (and drops
the shift); mmpretrain's `pad_small_map` keeps window and shift and zero-pads the map instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .fused import TokenGather, biased_attention, linear, norm_linear
from .layers import (
    DropPath,
    Mlp,
    apply_mask_token,
    init_weights,
    linear_layer,
    linear_rates,
    on_default_device,
    relative_position_index,
    trunc_normal,
)

SHIFT_MASK_VALUE = -100.0  # what the official code adds between windows that a shift brought together


@dataclass
class SwinConfig:
    """Hyperparameters of a Swin V1 encoder, named as in the official configs."""

    img_size: int = 224
    """Input resolution the model is built for (sets the window clamping and the APE grid)."""
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    ape: bool = False
    """Absolute position embedding added after patch embedding."""
    patch_norm: bool = True
    pad_small_map: bool = False
    """mmpretrain policy: keep the window on maps smaller than it and zero-pad (Swin-L SimMIM)."""
    use_mask_token: bool = False
    """Add the learned mask token (pretraining)."""
    use_checkpoint: bool = False
    """Activation checkpointing per block."""
    fused: bool = True
    """Compute through models/fused.py: shift, padding and windows as index gathers, LayerNorm fused
    with the next linear layer, GELU recomputed in fc2's backward, oneDNN GEMMs on the CPU. False runs
    the plain reference path (roll, pad, partition, as in the paper); same parameters and outputs."""

    def __post_init__(self) -> None:
        self.depths, self.num_heads = tuple(self.depths), tuple(self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise UsageError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.img_size % self.patch_size:
            raise UsageError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        grid = self.img_size // self.patch_size
        if not 1 <= self.window_size <= grid:
            raise UsageError(f"window_size={self.window_size}: expected 1 to {grid}, the first stage's "
                             f"{grid}x{grid} feature map at img_size={self.img_size}")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise UsageError(f"stage {i} width {self.embed_dim * 2**i} is not divisible by {heads} heads")

    @property
    def num_features(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def encoder_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def stage_resolution(self, stage: int) -> int:
        return self.img_size // self.patch_size // 2**stage


def window_and_shift(size: tuple[int, int], window: int, shift: int, pad_small_map: bool) -> tuple[int, int]:
    """Effective (window, shift) on an H x W map: the official policy clamps a window that does not
    fit and then does not shift; with pad_small_map both are kept and the map gets padded."""
    if not pad_small_map and min(size) <= window:
        return min(size), 0
    return window, shift


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window*window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(b, -1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B*nW, window*window, C) -> (B, H, W, C), the inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


@functools.lru_cache(maxsize=32)
def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (nW, N, N) that keeps windows of a cyclically shifted (padded) map from
    attending across the regions the roll brought together."""
    region = torch.zeros(h, w, device="cpu")  # cached: never on the default (possibly meta) device
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in cuts for c in cuts):
        region[rows, cols] = label
    ids = window_partition(region.view(1, h, w, 1), window).squeeze(-1).squeeze(0)  # (nW, N)
    same = ids.unsqueeze(1) == ids.unsqueeze(2)
    return torch.zeros(same.shape, device="cpu").masked_fill_(~same, SHIFT_MASK_VALUE)


@functools.lru_cache(maxsize=32)
def window_order(h: int, w: int, window: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices that cut an h x w map into windows and put it back, as the official code does with
    zero padding to whole windows, a roll by -shift and a partition: `to_windows` (Hp*Wp,) gives the
    raster index of each window position (h*w for a padding token), `to_map` (h*w,) is its inverse."""
    hp, wp = h + -h % window, w + -w % window
    positions = functools.partial(torch.arange, device="cpu")  # cached: never on the default device
    rows, cols = (positions(hp) + shift) % hp, (positions(wp) + shift) % wp
    raster = torch.where((rows < h)[:, None] & (cols < w), rows[:, None] * w + cols, h * w)
    to_windows = window_partition(raster.view(1, hp, wp, 1), window).flatten()
    real = to_windows < h * w
    to_map = torch.empty(h * w, dtype=torch.long, device="cpu")
    to_map[to_windows[real]] = positions(hp * wp)[real]
    return to_windows, to_map


class Windows(NamedTuple):
    """How the blocks of a stage cut its map into windows: the window side, the shift, the shift mask,
    and on the fused path the gather of raster tokens into windows (padding and roll folded in)."""

    size: int
    shift: int
    mask: torch.Tensor | None
    gather: TokenGather | None

    @staticmethod
    def build(h: int, w: int, window: int, shift: int, device: torch.device, fused: bool = True) -> Windows:
        hp, wp = h + -h % window, w + -w % window
        mask = shift_mask(hp, wp, window, shift).to(device) if shift else None
        gather = None
        if fused:
            to_windows, to_map = (t.to(device) for t in window_order(h, w, window, shift))
            gather = TokenGather(to_windows, (hp, wp) != (h, w), to_map, False)
        return Windows(window, shift, mask, gather)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """Fused path: (B*nW, N, C) -> (B, L, C) raster tokens."""
        return self.gather.inverted()(windows.view(batch, -1, windows.shape[-1]))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection followed by LayerNorm: (B,3,H,W) -> (B, H/p, W/p, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm: bool = True, fused: bool = True):
        super().__init__()
        self.patch_size, self.fused = patch_size, fused
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.norm(self.proj(x).permute(0, 2, 3, 1))
        # the strided convolution as one GEMM over the flattened patches (faster, and channels-last)
        b, c, h, w = x.shape
        p = self.patch_size
        h, w = h // p, w // p  # the convolution's floor for sizes that are not a multiple of p
        patches = x[:, :, : h * p, : w * p].reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5)
        return self.norm(linear(patches.reshape(b, h, w, -1), self.proj.weight.flatten(1), self.proj.bias))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias table."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 fused: bool = True):
        super().__init__()
        self.num_heads, self.window, self.fused = num_heads, window, fused
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        index = on_default_device(relative_position_index(window, window))
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = linear_layer(fused)(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = linear_layer(fused)(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal(self.relative_position_bias_table)

    def relative_position_bias(self, window: int) -> torch.Tensor:
        """(nH, N, N) bias for a window of side `window` <= the table's window."""
        if window == self.window:
            index = self.relative_position_index
        else:  # a clamped window reads the central part of the table
            index = relative_position_index(window, self.window).to(self.relative_position_bias_table.device)
        n = window * window
        return self.relative_position_bias_table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B*nW, N, C) window tokens; mask: (nW, N, N) additive shift mask or None."""
        return self.attend(self.qkv(x), mask)

    def attend(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Everything after the projection qkv = self.qkv(x) (B*nW, N, 3C), which the fused block
        computes together with its norm: softmax(q k^T * scale + bias [+ mask]) v, then proj."""
        g, n, _ = qkv.shape
        bias = self.relative_position_bias(math.isqrt(n)).unsqueeze(0)  # gathered once per forward
        bias = bias if mask is None else bias + mask.unsqueeze(1)  # (nW|1, nH, N, N)
        dropout = self.attn_drop if self.training else 0.0
        if self.fused:
            return self.proj_drop(self.proj(biased_attention(qkv, bias, self.num_heads, self.scale, dropout)))
        q, k, v = qkv.view(g, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # each (B*nW, nH, N, d)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        scores = (scores.view(-1, *bias.shape) + bias).view(g, self.num_heads, n, n)  # window i gets mask[i % nW]
        probs = F.dropout(scores.softmax(-1), dropout)
        return self.proj_drop(self.proj((probs @ v).transpose(1, 2).reshape(g, n, -1)))


def attend_in_windows(x: torch.Tensor, attn: nn.Module, windows: Windows) -> torch.Tensor:
    """(Shifted) window attention on a (B, H, W, C) map, as the paper describes it: zero padding to
    whole windows, a cyclic shift by -shift, partition, attention per window (with the shift mask),
    reverse, the shift undone and the padding cropped."""
    b, h, w, c = x.shape
    size, shift = windows.size, windows.shift
    x = F.pad(x, (0, 0, 0, -w % size, 0, -h % size))
    hp, wp = x.shape[1:3]
    if shift:
        x = torch.roll(x, (-shift, -shift), dims=(1, 2))
    y = window_reverse(attn(window_partition(x, size).view(-1, size * size, c), windows.mask), size, hp, wp)
    if shift:
        y = torch.roll(y, (shift, shift), dims=(1, 2))
    return y[:, :h, :w]


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention and MLP, each with a residual and drop path."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, cfg: SwinConfig, drop_path: float):
        super().__init__()
        self.window, self.shift, self.fused = window, shift, cfg.fused
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate,
                                    cfg.fused)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate, cfg.fused)

    def forward(self, x: torch.Tensor, windows: Windows) -> torch.Tensor:
        """x: (B, H, W, C); padded tokens are zeros after the norm, as in mmpretrain and HF."""
        if self.fused:
            return self.forward_fused(x, windows)
        x = x + self.drop_path(attend_in_windows(self.norm1(x), self.attn, windows))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_fused(self, x: torch.Tensor, windows: Windows) -> torch.Tensor:
        """`forward` with the padding, shift and partition as one token gather fused between norm1 and
        qkv, and norm2 fused with fc1."""
        b, h, w, c = x.shape
        x = x.view(b, h * w, c)
        qkv = norm_linear(x, self.norm1, self.attn.qkv, windows.gather)  # (B, nW*N, 3C)
        y = self.attn.attend(qkv.view(-1, windows.size**2, qkv.shape[-1]), windows.mask)
        x = x + self.drop_path(windows.reverse(y, b))
        # the sum of two views, not a view of the sum: FSDP2 warns of (and an in-place op would break) a
        # wrapped block returning a view
        return x.view(b, h, w, c) + self.drop_path(self.mlp.forward_fused(x, self.norm2)).view(b, h, w, c)


def merge_neighbours(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 neighbourhood concatenated in the official order
    x00, x10, x01, x11, an odd map zero-padded first."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    # one copy: (B, H/2, row, W/2, col, C) -> (B, H/2, W/2, col, row, C) is the x00, x10, x01, x11 order
    return x.view(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)


class PatchMerging(nn.Module):
    """2x2 neighbourhood concatenation, LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int, fused: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = linear_layer(fused)(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_neighbours(x)))


class SwinStage(nn.Module):
    """Blocks of one resolution, alternating regular and shifted windows, then optional merging.
    Subclasses (Swin V2) change the blocks and the merging through `make_block` and `merging`."""

    merging: type[nn.Module] = PatchMerging

    def __init__(self, stage: int, cfg: SwinConfig, drop_paths: list[float], downsample: bool):
        super().__init__()
        dim = cfg.embed_dim * 2**stage
        # the build size fixes the window (and so the bias table, as the official code sizes it); the
        # shift is decided per forward, so that a map larger than that window shifts, as in HF and mmpretrain
        window, shift = window_and_shift((cfg.stage_resolution(stage),) * 2, cfg.window_size,
                                         cfg.window_size // 2, cfg.pad_small_map)
        self.window, self.shift, self.pad_small_map, self.fused = window, window // 2, cfg.pad_small_map, cfg.fused
        self.use_checkpoint = cfg.use_checkpoint
        self.blocks = nn.ModuleList(
            self.make_block(stage, i, window, 0 if i % 2 == 0 else shift, cfg, drop_paths[i])
            for i in range(cfg.depths[stage])
        )
        self.downsample = self.merging(dim, cfg.fused) if downsample else None

    def make_block(self, stage: int, index: int, window: int, shift: int, cfg: SwinConfig,
                   drop_path: float) -> nn.Module:
        """Block `index` of stage `stage`."""
        return SwinBlock(cfg.embed_dim * 2**stage, cfg.num_heads[stage], window, shift, cfg, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H/2, W/2, 2C), or (B, H, W, C) without merging."""
        x = self.run_blocks(x)
        return self.downsample(x) if self.downsample is not None else x

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks alone: (B, H, W, C) -> (B, H, W, C)."""
        window, shift = window_and_shift(x.shape[1:3], self.window, self.shift, self.pad_small_map)
        # built once per stage and forward, shared by its blocks
        regular = Windows.build(*x.shape[1:3], window, 0, x.device, self.fused)
        shifted = Windows.build(*x.shape[1:3], window, shift, x.device, self.fused) if shift else regular
        for i, block in enumerate(self.blocks):
            windows = shifted if i % 2 else regular
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, windows, use_reentrant=False)
            else:
                x = block(x, windows)
        return x


class SwinTransformer(nn.Module):
    """Swin V1 encoder: (B,3,H,W) [+ mask (B,H/p,W/p)] -> normalized feature map (B, C, H/s, W/s),
    with s = `encoder_stride` (32 for four stages)."""

    stage: type[SwinStage] = SwinStage

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size, self.num_features = cfg.patch_size, cfg.num_features
        self.encoder_stride = cfg.encoder_stride
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.patch_norm, cfg.fused)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.use_mask_token else None
        grid = cfg.img_size // cfg.patch_size
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.embed_dim)) if cfg.ape else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = linear_rates(cfg.drop_path_rate, sum(cfg.depths))
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(
            self.stage(i, cfg, rates[starts[i]: starts[i] + d], downsample=i < len(cfg.depths) - 1)
            for i, d in enumerate(cfg.depths)
        )
        self.norm = nn.LayerNorm(cfg.num_features)
        self.apply(init_weights)
        for p in (self.mask_token, self.absolute_pos_embed):
            if p is not None:
                trunc_normal(p)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed", "mask_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x, mask)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def feature_info(self) -> list[tuple[int, int]]:
        """(channels, stride in pixels) of each stage's feature map."""
        return [(self.cfg.embed_dim * 2**i, self.patch_size * 2**i) for i in range(len(self.layers))]

    def forward_intermediates(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, C_i, H_i, W_i) map per stage index (ascending): the stage's blocks' output before
        its merging, without a norm (what timm's features_only and HF's reshaped_hidden_states before
        downsampling return; detection and segmentation necks add their own norms)."""
        x, maps = self.embed(x), []
        for i, layer in enumerate(self.layers[: max(indices) + 1]):
            x = layer.run_blocks(x)
            if i in indices:
                maps.append(x.permute(0, 3, 1, 2))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding, mask token and absolute position: (B, 3, H, W) -> (B, H/p, W/p, C)."""
        x = self.patch_embed(x)  # (B, h, w, C)
        b, h, w, c = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise UsageError("this encoder has no mask token: build it with use_mask_token=True")
            x = apply_mask_token(x.view(b, h * w, c), mask, self.mask_token).view(b, h, w, c)
        if self.absolute_pos_embed is not None:
            x = x + resize_pos_grid(self.absolute_pos_embed, (h, w))
        return self.pos_drop(x)


def resize_pos_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, g*g, C) absolute embedding -> (1, H, W, C) by bicubic resampling, for other input sizes."""
    g = int(pos.shape[1] ** 0.5)
    if (g, g) == size:
        return pos.view(1, g, g, -1)
    grid = pos.view(1, g, g, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
