"""mmpretrain, the bench's third side, in its own environment (`make bench-peers` builds .venv-peers):
its SimMIM computes our loss on the same weights, input and mask, and the bench times it beside ours."""

from pathlib import Path

import pytest
import torch

from simmim.bench import peers
from simmim.bench.run import Runners, quick

PYTHON = peers.peers_python(Path(__file__).parents[1] / peers.VENV)
pytestmark = [pytest.mark.skipif(PYTHON is None, reason=f"no {peers.VENV} (`make bench-peers` builds it)"),
              pytest.mark.slow]  # each case runs in a process of the peers' python


@pytest.mark.parametrize("size", [128, 224])  # at 224 the last two maps are padded to whole windows
def test_mmpretrain_computes_our_loss_on_the_same_weights_and_input(size):
    there = peers.in_peers(PYTHON)
    results = quick(torch.device("cpu"), Runners(there, there, True), ("fp32",), ("eager",),
                    "simmim_swin-nano_test-64px", 2, warmup=0, repeats=1, img_size=size)
    assert results["environment"]["mmpretrain"] == "1.2.0"  # the environment of the peers' python
    [row] = results["rows"]
    # mmpretrain divides by the masked pixel count without the official (and our) +1e-5
    assert row["mm_loss"] == pytest.approx(row["ours_loss"], rel=1e-5)
    assert row["mm_speedup"] == pytest.approx(row["mm_step_s"] / row["ours_step_s"])
    assert row["mm_peak_mb"] > 0
