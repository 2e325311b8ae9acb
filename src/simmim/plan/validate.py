"""The planner against measurement: the peak memory of real training steps of small models on the CPU
(and of larger ones on a GPU: `python -m simmim.plan.validate cuda`, run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..measure import held_bytes, peak_memory, training_step
from ..zoo import build_model, get_spec
from .activations import example_inputs, training_loss
from .estimate import profile_model, strategy_memory

CASES = (  # (model, batch, precision, activation checkpointing): seconds each on one core
    ("simmim_swin-nano_test-64px", 32, "fp32", False),
    ("simmim_swin-nano_test-64px", 32, "bf16", True),
    ("simmim_vit-nano_test-64px", 32, "fp32", False),
    ("simmim_vit-nano_test-64px", 32, "bf16", True),
    ("simmim_swin-micro-w6_fashion-mnist-48px", 32, "fp32", False),
    ("simmim_swin-micro-w6_fashion-mnist-48px", 32, "fp32", True),
    ("simmim_swin-micro-w6_fashion-mnist-48px", 32, "bf16", False),
    ("simmim_swin-micro-w6_fashion-mnist-48px", 2, "fp32", False),
    ("swin-nano_test-64px", 32, "bf16", False),
    ("simmim_swin-tiny-w6_in1k-192px", 2, "fp32", False),
    ("simmim_swinv2-nano_test-64px", 32, "fp32", False),
    ("simmim_swinv2-nano_test-64px", 32, "bf16", True),
)
SHARDED_CASES = (  # (model, batch, precision) in 2 processes under FSDP2, each a run of its own
    ("simmim_swin-nano_test-64px", 32, "fp32"),
    ("simmim_swin-micro-w6_fashion-mnist-48px", 32, "bf16"),
)


@dataclass(frozen=True)
class Check:
    """Measured and predicted peak bytes of one training step in one CPU process."""

    model: str
    batch: int
    precision: str
    checkpointing: bool
    measured: int
    """The highest of the processes' peaks."""
    predicted: int
    processes: int = 1
    """1: one plain process; more: FSDP2 over that many processes."""

    @property
    def error(self) -> float:
        """Relative error of the prediction."""
        return self.predicted / self.measured - 1


def measured_peak(name: str, batch: int, precision: str, checkpointing: bool, device: str = "cpu") -> int:
    """Peak bytes of a steady-state training step (forward, backward, AdamW) in this process: what it
    holds before (parameters, buffers, AdamW's state) plus what the step allocates."""
    spec = get_spec(name)
    torch.manual_seed(0)
    where = torch.device(device)
    model = build_model(spec, use_checkpoint=checkpointing).train().to(where)
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = example_inputs(model, spec, batch, where)
    step = training_step(model, optimizer, lambda: training_loss(model, spec, inputs), precision, where)
    step()  # AdamW creates its state in the first step
    return held_bytes(model, optimizer) + peak_memory(step, where)


def predicted_peak(name: str, batch: int, precision: str, checkpointing: bool, device: str = "cpu") -> int:
    """The planner's peak for the same step: one process, no DDP, on the device's code path."""
    path = "cuda" if device.startswith("cuda") else "cpu"
    profile = profile_model(name, batch, precision, device=path)
    return strategy_memory(profile, "ddp+ac" if checkpointing else "ddp", 1, device=path)[-1]


def check(name: str, batch: int, precision: str, checkpointing: bool, device: str = "cpu") -> Check:
    """Measures and predicts one configuration in one process."""
    return Check(name, batch, precision, checkpointing, measured_peak(name, batch, precision, checkpointing, device),
                 predicted_peak(name, batch, precision, checkpointing, device))


def sharded_check(name: str, batch: int, precision: str, processes: int = 2) -> Check:
    """Measures (torchrun, gloo) and predicts one configuration under FSDP2 on the CPU."""
    from .fsdp_peaks import sharded_peaks

    profile = profile_model(name, batch, precision, device="cpu")
    predicted = strategy_memory(profile, "fsdp", processes, device="cpu")[-1]
    return Check(name, batch, precision, False, max(sharded_peaks(name, batch, precision, processes)), predicted,
                 processes)


GPU_CASES = (  # (model, batch, precision, activation checkpointing): GPU-sized steps, seconds each
    ("simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px", 64, "bf16", False),
    ("simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px", 64, "bf16", True),
    ("simmim_swinv2-tiny-w12_in1k-192px", 64, "bf16", False),
    ("simmim_swin-large-w12_16xb128-amp-coslr-800e_in1k-192px", 32, "bf16", False),
)

if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    cases = GPU_CASES if device.startswith("cuda") else CASES[:2]
    print(f"planner against measured peaks on {device} (one process, one training step)")
    for case in cases:
        result = check(*case, device=device)
        print(f"{result.model} batch {result.batch} {result.precision}{' +ac' if result.checkpointing else ''}: "
              f"measured {result.measured / 2**20:,.0f} MiB, predicted {result.predicted / 2**20:,.0f} MiB, "
              f"error {result.error:+.1%}")
