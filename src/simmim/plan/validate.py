"""The planner against measurement: the peak memory of real training steps of small models on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bench.measure import peak_memory
from ..engine.parallelize import autocast
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
SHARDED_CASES = (  # (model, batch, precision) in 2 processes under FSDP2: about 15 s each
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


def measured_peak(name: str, batch: int, precision: str, checkpointing: bool) -> int:
    """Peak bytes of a steady-state training step (forward, backward, AdamW) in this process on the CPU:
    what it holds before (parameters, buffers, AdamW's state, the batch) plus what the step allocates."""
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_model(spec, use_checkpoint=checkpointing).train()
    optimizer = torch.optim.AdamW(model.parameters())
    inputs = example_inputs(model, spec, batch, "cpu")
    cpu = torch.device("cpu")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, cpu):
            loss = training_loss(model, spec, inputs)
        loss.backward()
        optimizer.step()

    step()  # AdamW creates its state in the first step
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state])
    return held + peak_memory(step, cpu)


def predicted_peak(name: str, batch: int, precision: str, checkpointing: bool) -> int:
    """The planner's peak for the same step: one CPU process, no DDP."""
    profile = profile_model(name, batch, precision, device="cpu")
    return strategy_memory(profile, "ddp+ac" if checkpointing else "ddp", 1, device="cpu")[-1]


def check(name: str, batch: int, precision: str, checkpointing: bool) -> Check:
    """Measures and predicts one configuration in one process."""
    return Check(name, batch, precision, checkpointing, measured_peak(name, batch, precision, checkpointing),
                 predicted_peak(name, batch, precision, checkpointing))


def sharded_check(name: str, batch: int, precision: str, processes: int = 2) -> Check:
    """Measures (torchrun, gloo) and predicts one configuration under FSDP2 on the CPU."""
    from .sharded import sharded_peaks

    profile = profile_model(name, batch, precision, device="cpu")
    predicted = strategy_memory(profile, "fsdp", processes, device="cpu")[-1]
    return Check(name, batch, precision, False, max(sharded_peaks(name, batch, precision, processes)), predicted,
                 processes)
