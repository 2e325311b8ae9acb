"""The sides of the comparison: our SimMIM model, HF transformers' SwinForMaskedImageModeling and (in its
own environment, `make bench-peers`) mmpretrain's SimMIM holding the same weights, and one pretraining step
(forward, backward, AdamW) for each."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint.formats import HF, MMPRETRAIN
from ..errors import UsageError
from ..measure import training_step
from ..models import SimMIM
from ..zoo import build_model, get_spec

Step = Callable[[], float]
"""One training step; returns the loss it computed (before its update)."""


@dataclass
class Batch:
    """The input both sides see: images (B, 3, H, W) and a SimMIM mask (B, H/4, W/4), 1 = masked."""

    images: torch.Tensor
    mask: torch.Tensor


def ours(name: str, seed: int = 0, **overrides) -> SimMIM:
    """A zoo pretraining model with seeded random weights, dropout and drop path off."""
    torch.manual_seed(seed)
    return build_model(get_spec(name), drop_path_rate=0.0, **overrides)


def hf_twin(model: SimMIM) -> nn.Module:
    """transformers' SwinForMaskedImageModeling with the same configuration and weights (its SDPA
    attention), loaded the way HF loads a published checkpoint: our weights written in its on-disk
    layout, read by `from_pretrained`."""
    import transformers  # a benchmark extra, never needed by the library itself

    cfg = model.encoder.cfg
    if cfg.pad_small_map or cfg.drop_rate or cfg.attn_drop_rate:
        raise UsageError("HF Swin has no pad_small_map and the benchmark runs without dropout")
    if any(cfg.stage_resolution(i) < cfg.window_size for i in range(len(cfg.depths))):
        raise UsageError("HF keeps the configured window's bias table on maps smaller than the window, where "
                         "the official code (and ours) clamps it: choose a larger img_size or a smaller window")
    transformers.logging.set_verbosity_error()  # its load report and progress bars
    transformers.logging.disable_progress_bar()
    hf_cfg = transformers.SwinConfig(
        image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans, embed_dim=cfg.embed_dim,
        depths=list(cfg.depths), num_heads=list(cfg.num_heads), window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0, use_absolute_embeddings=cfg.ape, encoder_stride=cfg.encoder_stride,
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        transformers.SwinForMaskedImageModeling(hf_cfg).save_pretrained(tmp)  # its config and file layout
        save_file(HF.from_ours(state), Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        hf, info = transformers.SwinForMaskedImageModeling.from_pretrained(
            tmp, attn_implementation="sdpa", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"HF did not load every weight: {problems}")
    return hf.to(next(model.parameters()).device)


def mm_twin(model: SimMIM) -> nn.Module:
    """mmpretrain's SimMIM (SimMIMSwinTransformer, SimMIMLinearDecoder, SimMIMHead with its L1 loss) with the
    same configuration and weights, written in its checkpoint layout; only in the peer environment."""
    with warnings.catch_warnings():  # mmcv without compiled ops says so: the SimMIM modules need none
        warnings.filterwarnings("ignore", "Fail to import ``MultiScaleDeformableAttention``")
        from mmpretrain.registry import MODELS  # the peer environment's, never the project's dependency
        from mmpretrain.utils import register_all_modules

        register_all_modules(init_default_scope=True)

    cfg = model.encoder.cfg
    if cfg.drop_rate or cfg.attn_drop_rate or cfg.mlp_ratio != 4 or not cfg.qkv_bias:
        raise UsageError("the mmpretrain side runs mlp_ratio 4 with qkv bias and without dropout")
    mm = MODELS.build(dict(
        type="SimMIM",
        backbone=dict(type="SimMIMSwinTransformer", arch=dict(embed_dims=cfg.embed_dim, depths=list(cfg.depths),
                                                              num_heads=list(cfg.num_heads)),
                      img_size=cfg.img_size, in_channels=cfg.in_chans, drop_path_rate=0.0,
                      use_abs_pos_embed=cfg.ape, pad_small_map=cfg.pad_small_map,
                      stage_cfgs=dict(block_cfgs=dict(window_size=cfg.window_size))),
        neck=dict(type="SimMIMLinearDecoder", in_channels=cfg.embed_dim * 2 ** (len(cfg.depths) - 1),
                  encoder_stride=cfg.encoder_stride),
        head=dict(type="SimMIMHead", patch_size=cfg.patch_size,
                  loss=dict(type="PixelReconstructionLoss", criterion="L1", channel=cfg.in_chans)),
    ))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = mm.load_state_dict(MMPRETRAIN.from_ours(state), strict=False)
    missing = [k for k in missing if not k.endswith("relative_position_index")]  # buffers built from the config
    if missing or unexpected:
        raise RuntimeError(f"mmpretrain did not load every weight: missing {missing}, unexpected {unexpected}")
    return mm.to(next(model.parameters()).device)


def batch(model: SimMIM, size: int, device: torch.device, seed: int = 0) -> Batch:
    """Seeded images and masks at the model's resolution."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, model.encoder.cfg.img_size, model.encoder.cfg.img_size, generator=generator)
    mask = model.random_mask(size, np.random.default_rng(seed))
    return Batch(images.to(device), mask.to(device))


def ours_loss(model: nn.Module, data: Batch) -> torch.Tensor:
    return model(data.images, data.mask).loss


def hf_loss(model: nn.Module, data: Batch) -> torch.Tensor:
    return model(pixel_values=data.images, bool_masked_pos=data.mask.flatten(1).bool()).loss


def mm_loss(model: nn.Module, data: Batch) -> torch.Tensor:
    return model.loss(data.images, [SimpleNamespace(mask=m) for m in data.mask])["loss"]


def pretraining_step(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], data: Batch,
                     precision: str) -> Step:
    """One pretraining step as the training loop runs it (`measure.training_step`) with AdamW, fused where
    torch has it, as for every side here."""
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"precision {precision!r}: expected 'fp32' or 'bf16'")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    return training_step(model, optimizer, lambda: loss_fn(model, data), precision, data.images.device)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each residual block in place (ours: SwinBlock, HF: SwinLayer)."""
    # all blocks share one forward, compiled once per stage shape and window kind (plain or shifted,
    # padded or not): more variants than dynamo's default of 8, past which blocks silently ran eager.
    # Static shapes, as a training run's are: with dynamo's automatic dynamic shapes the second stage's
    # recompile went symbolic, and Inductor's sympy work on HF's backward ran past 40 minutes on two cores
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for module in model.modules():
        if type(module).__name__ in ("SwinBlock", "SwinLayer"):
            module.compile(backend=backend, dynamic=False)


def use_compile_cache(root: str | Path, side: str) -> Path:
    """Points Inductor's on-disk caches (its FX graphs, AOT autograd graphs and compiled kernels) at
    root/side, which it reads at each compilation: a side's first compile in an empty folder is a cold one,
    in the folder an earlier process filled a warm one, and no side finds the kernels of another."""
    folder = Path(root, side)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def build_sides(name: str, batch_size: int, precision: str, device: torch.device, reference: bool,
                compile: str | None = None, peer: bool = False, **overrides
                ) -> tuple[dict[str, torch.nn.Module], dict[str, Callable[[], float]]]:
    """Our model (and HF's twin if `reference`, mmpretrain's if `peer`) on one configuration, with the same
    weights, and one pretraining step of each on the same batch: (models, steps) by side."""
    model = ours(name, **overrides).to(device)
    data = batch(model, batch_size, device)
    sides = {"ours": (model, ours_loss)}
    if reference:
        sides["ref"] = (hf_twin(model), hf_loss)
    if peer:
        sides["mm"] = (mm_twin(model), mm_loss)
    if compile:
        for m, _ in sides.values():
            compile_blocks(m, compile)
    steps = {side: pretraining_step(m, loss_fn, data, precision) for side, (m, loss_fn) in sides.items()}
    return {side: m for side, (m, _) in sides.items()}, steps
