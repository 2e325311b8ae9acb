"""The BEiT-style ViT of the official SimMIM ViT-B/16.

qkv without bias plus separate q/v biases, layer scale, relative position bias (one table shared by
all blocks for pretraining, one per block for fine-tuning), and for fine-tuning mean pooling of the
patch tokens followed by `fc_norm` instead of a final norm. Parameter names follow the official
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .layers import (
    DropPath,
    Mlp,
    apply_mask_token,
    init_weights,
    linear_rates,
    on_default_device,
    relative_position_index,
    trunc_normal,
)

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


@dataclass
class ViTConfig:
    """Hyperparameters of the BEiT-style ViT, named as in the official configs."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    init_values: float = 0.1
    """Layer scale init (gamma_1, gamma_2); 0 turns layer scale off."""
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = False
    """One relative position bias table per block (fine-tuning)."""
    use_shared_rel_pos_bias: bool = True
    """One table shared by all blocks (pretraining)."""
    use_mean_pooling: bool = False
    """Classifier pools patch tokens and applies fc_norm; the encoder's final norm becomes Identity."""
    use_mask_token: bool = False
    use_checkpoint: bool = False
    fused: bool = True
    """The MLP's GELU recomputed in fc2's backward and its GEMMs through models/fused.py; False runs
    the plain fc1 -> GELU -> fc2 (same parameters and outputs)."""

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise UsageError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise UsageError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def beit_relative_position_index(grid: int) -> torch.Tensor:
    """(N+1, N+1) index into a table of (2g-1)**2 + 3 rows: patch pairs, then cls->patch,
    patch->cls and cls->cls."""
    rows = (2 * grid - 1) ** 2
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long, device="cpu")
    index[1:, 1:] = relative_position_index(grid, grid)
    index[0, 0:] = rows
    index[0:, 0] = rows + 1
    index[0, 0] = rows + 2
    return index


def gather_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-head bias (nH, N+1, N+1) read from a table through a BEiT index."""
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class RelativePositionBias(nn.Module):
    """The table shared by all blocks in pretraining: (2g-1)**2 + 3 rows of per-head biases."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        index = on_default_device(beit_relative_position_index(grid))
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        return gather_bias(self.relative_position_bias_table, self.relative_position_index)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float,
                 grid: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.relative_position_bias_table = None
        if grid:  # a table of its own (fine-tuning); otherwise the caller passes the shared bias
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
            index = on_default_device(beit_relative_position_index(grid))
            self.register_buffer("relative_position_index", index, persistent=False)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        bias = None
        if self.q_bias is not None:  # the key gets no bias (it would cancel in the softmax)
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_bias = shared_bias
        if self.relative_position_bias_table is not None:
            attn_bias = gather_bias(self.relative_position_bias_table, self.relative_position_index)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if attn_bias is None else attn_bias.to(q.dtype).unsqueeze(0),
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate,
                              cfg.grid if cfg.use_rel_pos_bias else None)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate, cfg.fused)
        scale = cfg.init_values > 0
        self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.init_values)) if scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.init_values)) if scale else None

    def forward(self, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        y = self.attn(self.norm1(x), shared_bias)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class VisionTransformer(nn.Module):
    """BEiT-style ViT encoder: (B,3,H,W) [+ mask (B,H/p,W/p)] -> patch-token map (B, C, H/p, W/p)
    after the final norm (Identity when the classifier mean-pools with fc_norm)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim, grid = cfg.embed_dim, cfg.grid
        self.patch_size = self.encoder_stride = cfg.patch_size
        self.num_features = dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim)) if cfg.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.rel_pos_bias = RelativePositionBias(grid, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None
        rates = linear_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.Identity() if cfg.use_mean_pooling else LayerNorm(dim)
        self.apply(init_weights)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal(p)
        for i, block in enumerate(self.blocks, start=1):  # BEiT's depth-dependent rescale of residual outputs
            block.attn.proj.weight.data.div_((2.0 * i) ** 0.5)
            block.mlp.fc2.weight.data.div_((2.0 * i) ** 0.5)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, shared_bias = self.embed(x, mask)
        for block in self.blocks:
            x = self.run_block(block, x, shared_bias)
        return self.patch_grid(self.norm(x))

    def feature_info(self) -> list[tuple[int, int]]:
        """(channels, stride in pixels) of each block's feature map."""
        return [(self.num_features, self.patch_size)] * len(self.blocks)

    def forward_intermediates(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, C, H/p, W/p) map of patch tokens per block index (ascending), without
        a norm, as BEiT's segmentation backbone (the official fine-tuning of this ViT) takes them."""
        x, shared_bias = self.embed(x)
        maps = []
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = self.run_block(block, x, shared_bias)
            if i in indices:
                maps.append(self.patch_grid(x))
        return maps

    def run_block(self, block: Block, x: torch.Tensor, shared_bias: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(block, x, shared_bias, use_reentrant=False)
        return block(x, shared_bias)

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, C) tokens -> (B, C, g, g) map of the patch tokens."""
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, self.cfg.grid, self.cfg.grid)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> tokens (B, 1 + L, C) with the class token first, and the shared bias (or None)."""
        x = self.patch_embed.proj(x)
        b, c, h, w = x.shape
        if (h, w) != (self.cfg.grid,) * 2:
            raise UsageError(f"input of {h * self.patch_size}x{w * self.patch_size} px, this ViT is built for "
                             f"{self.cfg.img_size} px")
        x = x.flatten(2).transpose(1, 2)
        if mask is not None:
            if self.mask_token is None:
                raise UsageError("this encoder has no mask token: build it with use_mask_token=True")
            x = apply_mask_token(x, mask, self.mask_token)
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x), self.rel_pos_bias() if self.rel_pos_bias is not None else None
