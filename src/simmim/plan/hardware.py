"""The accelerators the planner knows: peak dense FLOP rates, memory and interconnect."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One accelerator's published figures (dense, without 2:4 sparsity)."""

    name: str
    bf16_flops: float
    """Peak dense bf16/fp16 tensor-core FLOP/s."""
    fp32_flops: float
    """Peak fp32 FLOP/s without TF32 (the engine does not enable TF32)."""
    memory: int
    """Bytes of device memory as nvidia-smi reports them."""
    nvlink: float
    """Bytes/s one GPU sends to the others of its node (NVLink, one direction)."""
    network: float
    """Bytes/s one GPU sends to other nodes (its InfiniBand NIC)."""
    per_node: int = 8
    source: str = ""

    def flops(self, precision: str) -> float:
        """Peak FLOP/s of the GEMMs at a training precision."""
        return self.fp32_flops if precision == "fp32" else self.bf16_flops


MIB = 2**20
GPUS = {
    "a100": GPU("A100-SXM4-80GB", 312e12, 19.5e12, 81920 * MIB, 300e9, 25e9,
                source="NVIDIA A100 datasheet: 312 TFLOPS bf16, 19.5 fp32; NVLink3 600 GB/s both ways; HDR 200 Gb/s"),
    "h100": GPU("H100-SXM5-80GB", 989e12, 67e12, 81559 * MIB, 450e9, 50e9,
                source="NVIDIA H100 datasheet: 989 TFLOPS bf16, 67 fp32; NVLink4 900 GB/s both ways; NDR 400 Gb/s"),
    "h200": GPU("H200-SXM-141GB", 989e12, 67e12, 143771 * MIB, 450e9, 50e9,
                source="NVIDIA H200 datasheet: H100's compute and NVLink4 with 141 GB HBM3e; NDR 400 Gb/s"),
}
