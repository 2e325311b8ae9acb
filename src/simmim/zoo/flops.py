"""Multiply-add counting as the published model tables count it (mmengine's FlopAnalyzer).

One "FLOP" is one multiply-add of a convolution, a linear layer or an attention matmul (on padded
windows, as they are computed); LayerNorm counts 5 per element and average pooling 1 per element;
softmax, activations, residual adds and bias adds are not counted.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..models import kernels

aten = torch.ops.aten


def _matmul_macs(a: torch.Size, b: torch.Size) -> int:
    """MACs of a (..., m, k) @ (..., k, n) product."""
    return math.prod(a) * b[-1]


class MacCounter(TorchDispatchMode):
    """Counts multiply-adds per op family while active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in (aten.mm, aten.bmm):
            self.counts["matmul"] += _matmul_macs(args[0].shape, args[1].shape)
        elif packet in (aten.addmm, aten.baddbmm):
            self.counts["matmul"] += _matmul_macs(args[1].shape, args[2].shape)
        elif packet is aten.convolution:
            weight = args[1]
            self.counts["conv"] += out.numel() * math.prod(weight.shape[1:])
        elif "scaled_dot_product" in packet.__name__ and "backward" not in packet.__name__:
            q, k, v = args[:3]
            self.counts["attention"] += math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif packet is aten.native_layer_norm:
            self.counts["layer_norm"] += 5 * args[0].numel()
        elif packet is aten.mean:
            self.counts["pool"] += args[0].numel()
        return out


@torch.no_grad()
def count_macs(fn, *inputs: torch.Tensor) -> MacCounter:
    """Runs fn(*inputs) once under the counter and returns it (see `.total`, `.counts`)."""
    kernels.current()  # an 'auto' GEMM route calibrates on first use: its matmuls are not the model's
    counter = MacCounter()
    with counter:
        fn(*inputs)
    return counter
