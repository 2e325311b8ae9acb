"""What several test modules share, as fixtures: test modules import nothing from each other."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

_DEVICE = torch.device(os.environ.get("SIMMIM_TEST_DEVICE", "cpu"))
if _DEVICE.type == "cuda":  # TF32 matmuls and convolutions differ from float32 by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: other jobs share this machine's cores, and one thread per
    process is steadier than two (modules that train use it for every test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the comparisons against the reference implementations run: the CPU, or the device
    SIMMIM_TEST_DEVICE names (benchmarks/gpu_check.sh: cuda)."""
    return _DEVICE


def _randomize(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = name.endswith("weight") and "norm" in name.split(".")[-2:][0]
            p.normal_(1.0 if is_norm_scale else 0.0, std)
    return module


@pytest.fixture(scope="session")
def randomize() -> Callable[..., torch.nn.Module]:
    """randomize(module, std=0.05) fills every parameter with noise (norm scales around 1) and returns
    the module, so that zero-initialised tables, biases and tokens all matter in a comparison."""
    return _randomize
