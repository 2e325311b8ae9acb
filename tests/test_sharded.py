"""Sharded checkpoints (torch.distributed.checkpoint) across world sizes, consolidation, and FSDP2's
bf16 parameter policy, on the CPU with gloo.

One process with 2 images x 2 accumulation steps and two with 2 images each train the same steps on
the same samples (see test_distributed), so a run that changes its world size at a checkpoint must
end where the uninterrupted one does, up to float summation order: the position is carried over as
samples seen (2 micro-batches of 2 in one process are 1 of 2 per rank in two).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from simmim.checkpoint import training as ckpt
from simmim.checkpoint.sharded import STATE_FILE, consolidate
from simmim.checkpoint.transfer import load_weights
from simmim.cli import main as cli
from simmim.config import load_config
from simmim.engine.distributed import setup
from simmim.engine.loop import Run
from simmim.engine.pretraining import PretrainTask
from simmim.zoo.hub import get_model

MODEL = "simmim_swin-nano_test-64px"
# fp32: runtime.precision=auto is bf16 on CPUs with AMX or AVX512-BF16, beyond these tolerances
SETTINGS = ["runtime.precision=fp32", "data.num_workers=0", "runtime.tensorboard=false", "runtime.vis_every=0",
            "runtime.log_every=1", "data.heldout_images=0", "schedule.epochs=2", "schedule.warmup_epochs=1",
            "checkpoint.every_steps=1",
            "checkpoint.keep=10", "data.batch_size=2", "runtime.threads=1"]
ONE = [*SETTINGS, "optim.accumulation_steps=2", "checkpoint.sharded=true"]  # 8 images: 2 steps an epoch
# the 2-process leg also recomputes its blocks' activations: checkpointing composes with FSDP2 and
# changes no number (drop path is off in this preset)
TWO = [*SETTINGS, "optim.accumulation_steps=1", "runtime.parallel=fsdp", "runtime.activation_checkpointing=true"]
ATOL = 1e-5  # as test_distributed: 1 and 2 processes differ only in float summation order


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def copy_checkpoint(src: Path, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, run_dir / src.name)


def in_process_run(data: Path, out: Path, *extra: str) -> Run:
    """A Run of one process in this one, fitted; the Run keeps its model for inspection."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config("nano-pretrain", overrides=[f"data.path={data}", f"out_dir={out}", *ONE, *extra])
        run = Run(cfg, setup("cpu"), PretrainTask)
        run.loaded = {k: v.clone() for k, v in run.model.state_dict().items()}  # what resuming loaded
        try:
            run.fit()
        finally:
            run.log.close()
        return run
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, image_folder) -> tuple[Path, Run]:
    """The data, and an uninterrupted single-process run with sharded checkpoints at every step."""
    root = tmp_path_factory.mktemp("sharded")
    data = image_folder(root / "images", train_per_class=4, val_per_class=1)
    run = in_process_run(data, root / "one")
    assert run.pos.step == 4 and [p.name for p in ckpt.list_checkpoints(run.run_dir)] == [
        f"ckpt-0000000{i}" for i in range(1, 5)]
    return data, run


@pytest.mark.distributed
def test_world_size_changes_at_sharded_checkpoints_continue_the_run(one_process, tmp_path, capsys, torchrun):
    data, whole = one_process
    final = consolidate(whole.last_checkpoint)
    assert final.keys() == whole.model.state_dict().keys()
    assert all(torch.equal(final[k], v) for k, v in whole.model.state_dict().items())  # a 1-process DCP save

    # 1 -> 2 processes from the mid-epoch checkpoint after step 1; beside it, what killed saves leave:
    # a temporary directory, and a final-named one without its state file
    two = tmp_path / "two"
    copy_checkpoint(whole.run_dir / "ckpt-00000001", two)
    (two / ".ckpt-00000002.tmp").mkdir()
    (two / ".ckpt-00000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    shutil.copytree(whole.run_dir / "ckpt-00000003", two / "ckpt-00000003")
    (two / "ckpt-00000003" / STATE_FILE).unlink()
    assert [p.name for p in ckpt.list_checkpoints(two)] == ["ckpt-00000001"]
    run = torchrun(2, "pretrain", "--out", str(two), "--resume", "auto",
                   *[arg for s in TWO for arg in ("--set", s)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resumed from {two / 'ckpt-00000001'} at epoch 1, step 1" in run.stdout
    assert "written by 1 processes, this run has 2: random streams start afresh" in run.stdout
    assert "effective batch 4 = 2 per process x 2 x 1 accumulation" in run.stdout
    assert not list(two.glob(".*.tmp"))
    saved = two / "ckpt-00000004"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", STATE_FILE} <= {p.name for p in saved.iterdir()}
    state = ckpt.load(saved)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and "model" not in state
    got = consolidate(saved)
    for key in final:
        torch.testing.assert_close(got[key], final[key], rtol=0, atol=ATOL, msg=key)
    expected_losses, got_losses = losses(whole.run_dir), losses(two)
    assert sorted(got_losses) == [2, 3, 4]
    for step, loss in got_losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-5), step

    # 2 -> 1 process from the 2-process checkpoint in the middle of the second epoch
    three = tmp_path / "three"
    copy_checkpoint(two / "ckpt-00000003", three)
    capsys.readouterr()
    back = in_process_run(data, three, "checkpoint.resume=auto")
    assert "written by 2 processes, this run has 1: random streams start afresh" in capsys.readouterr().out
    loaded = consolidate(three / "ckpt-00000003")  # resharded into one process as consolidation reads it
    assert all(torch.equal(loaded[k], v) for k, v in back.loaded.items())
    assert back.pos.step == 4 and losses(three).keys() == {4}
    assert losses(three)[4] == pytest.approx(expected_losses[4], rel=1e-5)
    for key, value in back.model.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=ATOL, msg=key)


def test_a_different_effective_batch_is_refused(one_process, tmp_path):
    data, whole = one_process
    copy_checkpoint(whole.run_dir / "ckpt-00000001", tmp_path / "run")
    cfg = load_config("nano-pretrain", overrides=[f"data.path={data}", f"out_dir={tmp_path / 'run'}", *ONE,
                                                  "optim.accumulation_steps=1", "checkpoint.resume=auto"])
    with pytest.raises(ValueError, match=r"effective batch of 4 \(2 per process x 1 x 2 accumulation steps\), "
                                         r"this run has 2 .* --batch-size 4 keeps it"):
        Run(cfg, setup("cpu"), PretrainTask)


def test_consolidate_writes_one_safetensors_file_that_the_zoo_loads(one_process, tmp_path):
    _, whole = one_process
    out = tmp_path / "model.safetensors"
    assert cli(["consolidate", str(whole.last_checkpoint), str(out)]) == 0
    written = safetensors.torch.load_file(out)
    expected = whole.model.state_dict()
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    fresh = get_model(MODEL, pretrained=out)
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())
    assert cli(["export", str(whole.last_checkpoint), str(tmp_path / "exported")]) == 0  # a run's sharded checkpoint
    exported = get_model(tmp_path / "exported")
    assert all(torch.equal(v, expected[k]) for k, v in exported.state_dict().items())
    classifier = get_model("swin-nano_test-64px")  # fine-tuning from a sharded pretraining checkpoint
    report = load_weights(classifier, whole.last_checkpoint, new_head=True)
    assert report.loaded and all(torch.equal(v, expected[f"encoder.{k}"])
                                      for k, v in classifier.encoder.state_dict().items())


def test_consolidate_refuses_what_is_not_a_sharded_checkpoint(one_process, tmp_path, capsys):
    _, whole = one_process
    assert cli(["consolidate", str(whole.run_dir), str(tmp_path / "x.safetensors")]) == 2
    assert f"{whole.run_dir} is not a sharded checkpoint: no .metadata" in capsys.readouterr().err
    partial = tmp_path / "ckpt-00000009"
    shutil.copytree(whole.last_checkpoint, partial)
    (partial / STATE_FILE).unlink()
    with pytest.raises(ValueError, match="not a complete sharded checkpoint: no state.pt"):
        ckpt.resume_path(str(partial), tmp_path)


BF16_CHECK = """\
import sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from simmim.engine.distributed import setup
from simmim.engine.parallelize import parallelize
from simmim.runtime import exit_worker
from simmim.zoo import build_model, get_spec

env = setup("cpu")
seen = set()
gather, scatter = dist.all_gather_single, dist.reduce_scatter_single
dist.all_gather_single = lambda out, inp, **kw: seen.add(f"all-gather {inp.dtype}") or gather(out, inp, **kw)
dist.reduce_scatter_single = lambda output, input, **kw: seen.add(f"reduce-scatter {input.dtype}") or scatter(
    output=output, input=input, **kw)
torch.manual_seed(0)
model = build_model(get_spec(sys.argv[1]), use_checkpoint=True)
parallelize(model, env, "fsdp", precision="bf16")
optimizer = torch.optim.AdamW(model.parameters())
forward = set()
model.encoder.register_forward_hook(lambda m, i, o: forward.add(next(m.parameters()).dtype))
images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 16, 16, dtype=torch.long)
mask[:, :8] = 1
model(images, mask).loss.backward()
optimizer.step()
assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
assert all(p.grad.dtype == torch.float32 for p in model.parameters())
assert {s.dtype for st in optimizer.state.values() for s in st.values() if s.dim()} == {torch.float32}
print(f"rank {env.rank}: {', '.join(sorted(seen))}; forward in {', '.join(map(str, forward))}")
dist.destroy_process_group()
exit_worker(0)
"""


@pytest.mark.distributed
def test_fsdp_bf16_gathers_bf16_parameters_and_reduces_fp32_gradients(tmp_path, torchrun):
    script = tmp_path / "bf16_check.py"
    script.write_text(BF16_CHECK)
    run = torchrun(2, MODEL, launcher=script)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):  # all-gathers carry bf16 weights, reduce-scatters fp32 gradients; the forward sees bf16
        assert f"rank {rank}: all-gather torch.bfloat16, reduce-scatter torch.float32; forward in torch.bfloat16" \
            in run.stdout


def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint(one_process, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    data, whole = one_process
    real_save, calls = dcp.save, []

    def dies_after_the_third_shards(*args, **kwargs):  # the shards are written, state.pt and the rename are not
        calls.append(1)
        real_save(*args, **kwargs)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", dies_after_the_third_shards)
    with pytest.raises(KeyboardInterrupt):
        in_process_run(data, tmp_path / "run")
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["ckpt-00000001", "ckpt-00000002"]
    assert (tmp_path / "run" / ".ckpt-00000003.tmp" / ".metadata").is_file()
    resumed = in_process_run(data, tmp_path / "run", "checkpoint.resume=auto", "checkpoint.keep=2")
    assert resumed.pos.step == 4
    assert sorted(p.name for p in (tmp_path / "run").glob("*ckpt-*")) == ["ckpt-00000003", "ckpt-00000004"]
    expected = whole.model.state_dict()  # at the same world size, resuming is bit-exact
    assert all(torch.equal(v, expected[k]) for k, v in resumed.model.state_dict().items())
