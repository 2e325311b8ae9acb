"""The main job on a fresh machine: a short SimMIM pretraining of a tiny Swin on real photographs
shipped with scikit-image, printing the loss and writing a reconstruction PNG."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .data.photos import PHOTOS, load_photo
from .data.transforms import pretrain_transform
from .viz import reconstruction_panels, save_grid
from .zoo import build_model, get_spec

MODEL = "simmim_swin-nano_test-64px"


def run_demo(out: str | Path = "report", steps: int = 300, batch_size: int = 16, seed: int = 0) -> dict:
    """Pretrains the tiny model on random crops of the photos; returns first/last loss."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out)
    spec = get_spec(MODEL)
    model = build_model(spec, mask_patch_size=16)  # 1/4 of the image side, as 32 px is 1/6 of 192
    transform = pretrain_transform(spec.img_size)
    photos = [load_photo(name) for name in PHOTOS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    print(f"pretraining {MODEL} ({sum(p.numel() for p in model.parameters()):,} params) on "
          f"{len(photos)} scikit-image photos, {steps} steps of {batch_size}")
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        images = torch.stack([transform(photos[i]) for i in rng.integers(len(photos), size=batch_size)])
        loss = model(images, model.random_mask(batch_size, rng)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps:
            rate = step * batch_size / (time.perf_counter() - start)
            eta = (steps - step) * batch_size / rate
            print(f"step {step:4d}/{steps}  loss {np.mean(losses[-25:]):.4f}  {rate:6.1f} img/s  eta {eta:4.0f}s")
    model.eval()
    with torch.no_grad():
        images = torch.stack([transform(photo) for photo in photos[:8]])
        mask = model.random_mask(len(images), rng)
        rec = model(images, mask).reconstruction
    png = save_grid(reconstruction_panels(images, mask, rec, model.patch_size), out / "reconstruction.png", scale=2)
    print(f"loss {np.mean(losses[:25]):.4f} -> {np.mean(losses[-25:]):.4f}; reconstructions in {png}")
    return {"first_loss": float(np.mean(losses[:25])), "last_loss": float(np.mean(losses[-25:])), "png": str(png)}
