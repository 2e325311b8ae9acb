"""The two sides of the comparison: our SimMIM model and HF transformers' SwinForMaskedImageModeling
holding the same weights, and one pretraining step (forward, backward, AdamW) for each."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint.formats import HF
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
        raise ValueError("HF Swin has no pad_small_map and the benchmark runs without dropout")
    if any(cfg.stage_resolution(i) < cfg.window_size for i in range(len(cfg.depths))):
        raise ValueError("HF keeps the configured window's bias table on maps smaller than the window, where "
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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision {precision!r}: expected 'fp32' or 'bf16'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_step(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], torch.Tensor], data: Batch,
                  precision: str) -> Step:
    """One pretraining step as the training loop runs it: forward under autocast, backward, AdamW
    (fused where torch has it, as for both sides here), gradients freed between steps."""
    device = data.images.device
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def step() -> float:
        with autocast(precision, device):
            loss = loss_fn(model, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each residual block in place (ours: SwinBlock, HF: SwinLayer)."""
    # all blocks share one forward, compiled once per stage shape and window kind (plain or shifted,
    # padded or not): more variants than dynamo's default of 8, past which blocks silently ran eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for module in model.modules():
        if type(module).__name__ in ("SwinBlock", "SwinLayer"):
            module.compile(backend=backend)
