"""The planner against a sharded run: per-process peak memory of FSDP2 training steps on the CPU (gloo).

    python -m torch.distributed.run --nproc_per_node 2 -m simmim.plan.fsdp_peaks MODEL BATCH PRECISION

prints, on the first process, one JSON line with each process's peak in bytes. `sharded_peaks` runs
that and returns the list.
"""

from __future__ import annotations

import json
import sys

import torch

from ..engine.distributed import gather_objects, setup, teardown
from ..engine.parallelize import parallelize
from ..measure import held_bytes, peak_memory, training_step
from ..runtime import exit_worker, run_local_torchrun
from ..zoo import build_model, get_spec
from .activations import example_inputs, training_loss


def measure_peak(name: str, batch: int, precision: str) -> int:
    """This process's peak bytes of a steady-state FSDP2 training step (the engine's wrapping), as
    `validate.measured_peak` counts them."""
    env = setup("cpu")
    try:
        spec = get_spec(name)
        torch.manual_seed(0)
        model = build_model(spec).train()
        wrapped = parallelize(model, env, "fsdp", precision=precision)
        optimizer = torch.optim.AdamW(model.parameters())
        inputs = example_inputs(model, spec, batch, "cpu")
        step = training_step(wrapped, optimizer, lambda: training_loss(wrapped, spec, inputs), precision, env.device)
        step()
        peaks = gather_objects(held_bytes(model, optimizer, *inputs) + peak_memory(step, env.device), env)
        if env.is_main:
            print(json.dumps(peaks))
        return peaks[env.rank]
    finally:
        teardown(env)


def sharded_peaks(name: str, batch: int, precision: str, processes: int = 2) -> list[int]:
    """Runs `measure` in `processes` CPU processes under torchrun; -> each one's peak bytes."""
    run = run_local_torchrun(processes, ["-m", "simmim.plan.fsdp_peaks", name, str(batch), precision], timeout=600)
    result = [line for line in run.stdout.splitlines() if line.startswith("[")]
    if run.returncode or not result:
        raise RuntimeError(f"the sharded measurement failed (exit status {run.returncode}):\n{run.stderr[-2000:]}")
    return json.loads(result[0])


if __name__ == "__main__":
    measure_peak(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    exit_worker(0)
