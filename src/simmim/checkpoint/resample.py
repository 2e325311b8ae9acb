"""Resize position tables when the window or grid changes between pretraining and fine-tuning.

Relative position bias tables use the BEiT "geometric" resampling that microsoft/SimMIM
(`utils.remap_pretrained_keys_swin` / `_vit`) and mmpretrain (`resize_relative_position_bias_table`)
use. They call `scipy.interpolate.interp2d(x, y, z, kind="cubic")`, removed in SciPy 1.14. On a
rectangular grid that fitted FITPACK's interpolating bicubic spline (`regrid` with s=0) and evaluated it
with `bispev`; `RectBivariateSpline(..., kx=3, ky=3, s=0)` calls the same two routines, so it reproduces
the published results on current SciPy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.interpolate import RectBivariateSpline

from ..errors import UsageError


def _geometric_ratio(src_half: int, dst_half: int) -> float:
    """Bisect for q with 1 + q + ... + q**(src_half-1) == dst_half, exactly as BEiT does."""
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        # BEiT's geometric_progression(a=1, r=q, n=src_half): the sum of src_half terms q**i, i < src_half.
        if (1.0 - q**src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    # BEiT uses the last midpoint tried, not (left + right) / 2 after the loop.
    return q


def _geometric_source_coords(src_size: int, dst_size: int) -> np.ndarray:
    """Positions of the src_size table entries, spaced by growing powers of q so they span the target."""
    src_half = src_size // 2
    q = _geometric_ratio(src_half, dst_size // 2)
    # Accumulated term by term in BEiT's order so the float rounding matches too.
    distances = []
    cur = 1.0
    for i in range(src_half):
        distances.append(cur)
        cur += q ** (i + 1)
    return np.array([-d for d in reversed(distances)] + [0.0] + distances)


def resample_rel_pos_bias(
    table: torch.Tensor, src_window: int, dst_window: int, extra_tokens: int = 0
) -> torch.Tensor:
    """Resample a ((2*src_window-1)**2 [+ extra_tokens], nH) bias table to dst_window, BEiT-geometric."""
    if table.ndim != 2:
        raise UsageError(
            f"relative position bias table must be 2-D (positions, heads), got {tuple(table.shape)}"
        )
    src_size, dst_size = 2 * src_window - 1, 2 * dst_window - 1
    if table.shape[0] != src_size**2 + extra_tokens:
        raise UsageError(
            f"table has {table.shape[0]} rows, expected {src_size}**2 + {extra_tokens} (window {src_window})"
        )
    if src_window == dst_window:
        return table
    # A cubic spline needs at least 4 samples per axis (FITPACK's regrid refuses fewer), i.e. window >= 3.
    if src_window < 3 or dst_window < 1:
        raise UsageError(
            f"cannot resample window {src_window} to {dst_window}: need src_window >= 3 and dst_window >= 1"
        )
    grid, extra = table[: src_size**2], table[src_size**2 :]
    # Shrinking is allowed like in the official code: the bisection then pins q near 1.01, the source
    # positions span more than the target, and the spline is sampled inside them.
    coords = _geometric_source_coords(src_size, dst_size)
    half = dst_size // 2
    targets = np.arange(-half, half + 0.1, 1.0)
    values = grid.detach().float().cpu().numpy().reshape(src_size, src_size, -1)
    heads = []
    for h in range(values.shape[-1]):
        # Table rows are (dy, dx) row-major; interp2d(x, y, z) took z[y, x] and returned f(dx, dy)[y, x],
        # so fitting on (rows, cols) and evaluating at (targets, targets) keeps that orientation.
        spline = RectBivariateSpline(coords, coords, values[..., h], kx=3, ky=3, s=0)
        heads.append(spline(targets, targets).reshape(-1))
    resampled = torch.from_numpy(np.stack(heads, axis=-1)).to(device=table.device, dtype=table.dtype)
    return torch.cat([resampled, extra.detach()], dim=0)


def resize_abs_pos_embed(
    pos: torch.Tensor,
    new_grid: tuple[int, int],
    num_extra_tokens: int = 0,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubically resize a (1, extra + H*W, C) absolute position embedding to `new_grid`, extras first."""
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
