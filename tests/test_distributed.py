"""torchrun on CPU (gloo): 2 processes with half the batch each train the same weights as 1 process.

Both runs see the same samples in the same steps (the sampler's global permutation is sharded so
the ranks' k-th batches make up the single process's k-th batch) with the same crops, flips and
masks (drawn from per-sample seeds), so only float summation order differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simmim.checkpoint import training as ckpt
from simmim.checkpoint.sharded import consolidate
from simmim.config import load_config
from simmim.engine import pretrain

pytestmark = pytest.mark.distributed  # torchrun: several processes

# fp32: runtime.precision=auto is bf16 on CPUs with AMX or AVX512-BF16, beyond these tolerances
SETTINGS = ["runtime.precision=fp32", "data.num_workers=0", "runtime.tensorboard=false", "runtime.vis_every=0",
            "runtime.log_every=1", "schedule.epochs=2", "schedule.warmup_epochs=1", "checkpoint.keep=1"]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, image_folder) -> tuple[Path, dict[str, torch.Tensor]]:
    """The data, and the weights of one process training with a batch of 8."""
    root = tmp_path_factory.mktemp("ddp")
    data = image_folder(root / "images", train_per_class=9)  # 18 images: 2 ranks drop none, 1 step drops 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(load_config("nano-pretrain", overrides=[
            f"data.path={data}", f"out_dir={root / 'one'}", "data.batch_size=8", *SETTINGS]))
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 4
    return data, ckpt.load(result.checkpoint)["model"]


@pytest.mark.parametrize(("parallel", "batch", "accumulation"), [("ddp", 4, 1), ("fsdp", 2, 2)])
def test_two_processes_match_one_process_with_the_same_total_batch(single_process, tmp_path, parallel, batch,
                                                                   accumulation, torchrun):
    data, expected = single_process
    sets = [arg for s in [*SETTINGS, f"runtime.parallel={parallel}", f"optim.accumulation_steps={accumulation}"]
            for arg in ("--set", s)]
    run = torchrun(2, "pretrain", "--preset", "nano-pretrain", "--data", str(data),
                   "--out", str(tmp_path / "two"), "--batch-size", str(batch), *sets)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"2 processes ({parallel}) on cpu" in run.stdout
    assert f"effective batch 8 = {batch} per process x 2 x {accumulation} accumulation" in run.stdout
    assert "Warning" not in run.stderr, run.stderr[-3000:]
    assert run.stdout.count("simmim pretrain:") == 1  # rank 0 alone prints
    # FSDP2 writes sharded checkpoints by default, DDP one file
    path = tmp_path / "two" / ("ckpt-00000004" if parallel == "fsdp" else "ckpt-00000004.pt")
    state = ckpt.load(path)
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    got = consolidate(path) if parallel == "fsdp" else state["model"]
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)


_OWN_GROUP = """\
import os
import sys

import torch
import torch.distributed as dist

from simmim.config import load_config
from simmim.engine import evaluate, finetune, pretrain

data, out, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
dist.init_process_group("gloo")
pre = pretrain(load_config("nano-pretrain", overrides=[f"data.path={data}", f"out_dir={out}/pre", *settings]))
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # as under torch.multiprocessing.spawn
    del os.environ[name]
fine = finetune(load_config("nano-finetune", overrides=[
    f"data.path={data}", f"out_dir={out}/fine", f"model.pretrained={pre.checkpoint}", *settings]))
metrics = evaluate(fine.checkpoint, str(data), batch_size=2, num_workers=0)
total = torch.ones(1)
dist.all_reduce(total)
print(f"rank {dist.get_rank()}: group of {int(total.item())} alive after top-1 {metrics['top1']:.1f}")
dist.destroy_process_group()
"""


def test_a_callers_process_group_outlives_pretraining_finetuning_and_evaluation(tmp_path, image_folder, torchrun):
    data = image_folder(tmp_path / "images", train_per_class=2, val_per_class=1, size=64)
    launcher = tmp_path / "own_group.py"
    launcher.write_text(_OWN_GROUP)
    run = torchrun(2, str(data), str(tmp_path), "data.batch_size=2", "schedule.epochs=1", "schedule.warmup_epochs=0",
                   *[s for s in SETTINGS if not s.startswith("schedule.")], launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("2 processes (ddp) on cpu") == 2, run.stdout[-2000:]  # finetune too, from the group
    for rank in (0, 1):
        assert f"rank {rank}: group of 2 alive after top-1" in run.stdout, run.stdout[-2000:]
