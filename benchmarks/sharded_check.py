"""The device side of sharded training, for gpu_check.sh: what the 2-process CPU tests (tests/test_sharded.py,
gloo) cannot show on a machine with one GPU, where two NCCL ranks cannot share the device.

1. FSDP2's bf16 policy (`simmim.engine.parallelize.shard`) in a 1-rank process group (NCCL on CUDA):
   the collectives' dtypes, the dtype the forward computes with, fp32 sharded parameters, gradients
   and optimizer state, and the peak memory of a step.
2. A bf16 pretraining run on the device with sharded checkpoints (DCP writing device tensors): a run
   resumed from its step-2 checkpoint ends where the uninterrupted one does, and the consolidated
   safetensors file loads into a fresh zoo model.

    python benchmarks/sharded_check.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

MODEL = "simmim_swin-nano_test-64px"


def bf16_policy(device: torch.device) -> None:
    from torch.distributed.tensor import DTensor

    from simmim.engine.parallelize import shard
    from simmim.zoo import build_model, get_spec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        seen: set[str] = set()
        gather, scatter = dist.all_gather_single, dist.reduce_scatter_single
        dist.all_gather_single = lambda out, inp, **kw: seen.add(f"all-gather {inp.dtype}") or gather(out, inp, **kw)
        dist.reduce_scatter_single = lambda output, input, **kw: seen.add(f"reduce-scatter {input.dtype}") or scatter(
            output=output, input=input, **kw)
        torch.manual_seed(0)
        model = shard(build_model(get_spec(MODEL), use_checkpoint=True).to(device), "bf16")
        optimizer = torch.optim.AdamW(model.parameters())
        forward: set[torch.dtype] = set()
        model.encoder.register_forward_hook(lambda m, i, o: forward.add(next(m.parameters()).dtype))
        images = torch.randn(8, 3, 64, 64, device=device)
        mask = torch.zeros(8, 16, 16, dtype=torch.long, device=device)
        mask[:, :8] = 1
        model(images, mask).loss.backward()
        optimizer.step()
        checks = {
            "forward computes in bf16": forward == {torch.bfloat16},
            "sharded parameters fp32": all(isinstance(p, DTensor) and p.dtype == torch.float32
                                           for p in model.parameters()),
            "gradients fp32": all(p.grad.dtype == torch.float32 for p in model.parameters()),
            "optimizer state fp32": {s.dtype for st in optimizer.state.values() for s in st.values()
                                     if s.dim()} == {torch.float32},
        }
        memory = (f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                  if device.type == "cuda" else "")
        print(f"FSDP2 bf16 policy, 1 rank on {device}: collectives {sorted(seen) or 'none'}{memory}")
        for name, ok in checks.items():
            print(f"  {'ok    ' if ok else 'FAILED'} {name}")
        if not all(checks.values()):
            raise SystemExit("the bf16 policy check failed")
    finally:
        dist.destroy_process_group()


def image_folder(root: Path, count: int = 16) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "train" / "x"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def sharded_run(device: torch.device, work: Path) -> None:
    from simmim.checkpoint.sharded import consolidate
    from simmim.cli import main as cli
    from simmim.config import load_config
    from simmim.engine import pretrain
    from simmim.zoo.hub import get_model

    data = image_folder(work / "images")
    common = [f"data.path={data}", f"runtime.device={device}", "runtime.precision=bf16", "checkpoint.sharded=true",
              "checkpoint.every_steps=1", "checkpoint.keep=10", "data.batch_size=4", "data.num_workers=0",
              "data.heldout_images=0", "runtime.tensorboard=false", "runtime.vis_every=0", "schedule.epochs=2",
              "schedule.warmup_epochs=1"]
    whole = pretrain(load_config("nano-pretrain", overrides=[*common, f"out_dir={work / 'whole'}"]))
    (work / "resumed").mkdir()
    shutil.copytree(work / "whole" / "ckpt-00000002", work / "resumed" / "ckpt-00000002")
    resumed = pretrain(load_config("nano-pretrain", overrides=[*common, f"out_dir={work / 'resumed'}",
                                                               "checkpoint.resume=auto"]))
    a, b = consolidate(whole.checkpoint), consolidate(resumed.checkpoint)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"bf16 run on {device}: {whole.steps} steps, sharded checkpoints {whole.checkpoint.name}; resumed from "
          f"step 2: max |difference| of the final weights {diff:.3g}")
    out = work / "model.safetensors"
    cli(["consolidate", str(whole.checkpoint), str(out)])
    fresh = get_model(MODEL, pretrained=out).state_dict()
    if diff > 1e-4 or not all(torch.equal(fresh[k], a[k]) for k in a):
        raise SystemExit("the sharded checkpoint check failed")
    print("  ok     consolidated weights load into a fresh model unchanged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bf16_policy(device)
    work = Path(tempfile.mkdtemp(prefix="sharded_check_"))
    try:
        sharded_run(device, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
