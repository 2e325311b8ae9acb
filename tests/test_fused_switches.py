"""The fused layers' switches (kernels.py). The float32 CPU GEMM route: both routes compute the same
numbers, the calibrated choice is cached per machine, SIMMIM_GEMM_ROUTE forces it, and each private
torch API has a public fallback. SIMMIM_RECOMPUTE: keeping activations gives the same numbers for more
memory. (How a run decides them once and records them: test_kernels.py.)"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simmim import hardware
from simmim.models import SimMIM, SwinConfig, SwinTransformer, fused, kernels

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN, reason="torch built without oneDNN's linear")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory and no remembered route."""
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.ROUTE_ENV, raising=False)
    monkeypatch.delenv(kernels.RECOMPUTE_ENV, raising=False)
    forget(monkeypatch)
    return tmp_path / kernels.CACHE_FILE


def forget(monkeypatch) -> None:
    """As a new process: no route calibrated or resolved yet, no run's choice installed."""
    for name, value in (("_calibrated", {}), ("_defaults", {}), ("_chosen", None)):
        monkeypatch.setattr(kernels, name, value)


def _step(route: str, monkeypatch, randomize, recompute: str = "1", precision: str = "fp32"
          ) -> tuple[torch.Tensor, list[torch.Tensor], list[str], int]:
    """Loss, gradients, the names of the operators run and the bytes saved for the backward by one
    SimMIM step on a small Swin."""
    monkeypatch.setenv(kernels.ROUTE_ENV, route)
    monkeypatch.setenv(kernels.RECOMPUTE_ENV, recompute)
    torch.manual_seed(0)
    cfg = SwinConfig(img_size=96, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=6,
                     drop_path_rate=0.0, use_mask_token=True)
    model = randomize(SimMIM(SwinTransformer(cfg), mask_patch_size=16))
    images, mask = torch.randn(2, 3, 96, 96), model.random_mask(2, np.random.default_rng(0))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.profiler.profile() as prof, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = model(images, mask).loss
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], [e.name for e in prof.events()], sum(saved)


@needs_onednn
def test_forced_routes_give_the_same_loss_and_gradients(monkeypatch, randomize):
    loss_dnn, grads_dnn, ops_dnn, _ = _step("onednn", monkeypatch, randomize)
    loss_aten, grads_aten, ops_aten, _ = _step("aten", monkeypatch, randomize)
    loss_mixed, grads_mixed, ops_mixed, _ = _step("mixed", monkeypatch, randomize)
    # each route runs the kernels it names: 'mixed' leaves the weight gradients, a third of the GEMMs, to the BLAS
    onednn_calls = {route: ops.count("mkldnn::_linear_pointwise") for route, ops in
                    (("onednn", ops_dnn), ("mixed", ops_mixed), ("aten", ops_aten))}
    moved = onednn_calls["onednn"] - onednn_calls["mixed"]  # one weight gradient per fused linear layer
    assert onednn_calls["aten"] == 0 and onednn_calls["mixed"] > moved > 10
    assert ops_mixed.count("aten::mm") - ops_dnn.count("aten::mm") == moved
    assert len(grads_dnn) == len(grads_aten) == len(grads_mixed) > 20
    for loss, grads in ((loss_aten, grads_aten), (loss_mixed, grads_mixed)):
        torch.testing.assert_close(loss, loss_dnn, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_dnn, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_onednn
def test_calibration_is_written_keyed_and_read_back(cache, monkeypatch):
    calls = []
    seconds = {"onednn": 1.0, "mixed": 1.5, "aten": 2.0}
    monkeypatch.setattr(kernels, "calibrate", lambda: calls.append(1) or seconds)
    assert kernels.gemm_route() == "onednn"  # the fastest
    assert kernels.gemm_route() == "onednn" and len(calls) == 1  # remembered in the process
    entry = json.loads(cache.read_text())[hardware.machine_key()]
    assert entry == {"route": "onednn", "seconds": seconds}
    key = hardware.machine_key()
    assert hardware.cpu_info()[0] in key and torch.__version__ in key and "threads" in key
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # capped kernels are another machine
    assert hardware.machine_key() != key and "ONEDNN_MAX_CPU_ISA=AVX2" in hardware.machine_key()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")

    # a new process reads the file instead of calibrating; what it holds decides
    cache.write_text(json.dumps({key: {"route": "aten"}}))
    forget(monkeypatch)
    assert kernels.gemm_route() == "aten" and len(calls) == 1

    # another thread count is another machine
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert kernels.gemm_route() == "onednn" and len(calls) == 2
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads(cache.read_text())) == 2

    # an entry calibrated when there were fewer routes to compare is calibrated again
    cache.write_text(json.dumps({key: {"route": "aten", "seconds": {"onednn": 2.0, "aten": 1.0}}}))
    forget(monkeypatch)
    assert kernels.gemm_route() == "onednn" and len(calls) == 3


@needs_onednn
def test_calibration_times_every_route_and_leaves_the_random_state_alone(cache):
    # how long it takes is the benchmark's to say (a bound here fails on a loaded machine)
    state = torch.get_rng_state()
    seconds = kernels.calibrate(repeats=1)
    assert set(seconds) == set(kernels.ROUTES) and all(0 < s < float("inf") for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), state)


def test_the_environment_variable_forces_the_route(cache, monkeypatch):
    monkeypatch.setattr(kernels, "calibrate", lambda: pytest.fail("a forced route must not calibrate"))
    monkeypatch.setenv(kernels.ROUTE_ENV, "aten")
    assert kernels.gemm_route() == "aten"
    if kernels.ONEDNN:
        monkeypatch.setenv(kernels.ROUTE_ENV, "onednn")
        assert kernels.gemm_route() == "onednn"
    assert not cache.exists()
    monkeypatch.setenv(kernels.ROUTE_ENV, "mkl")
    with pytest.raises(ValueError, match=r"^SIMMIM_GEMM_ROUTE='mkl': expected 'onednn', 'mixed', 'aten' or 'auto'$"):
        kernels.gemm_route()


def test_a_bad_route_is_a_one_line_cli_error(tmp_path):
    env = {"SIMMIM_GEMM_ROUTE": "fast", "SIMMIM_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(fused.__file__).rsplit("/simmim/", 1)[0], "SIMMIM_NO_JEMALLOC": "1"}
    out = subprocess.run([sys.executable, "-m", "simmim.cli", "models"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("simmim: error: SIMMIM_GEMM_ROUTE='fast': expected 'onednn', "
                                                   "'mixed', 'aten' or 'auto'")


def test_without_onednn_the_route_is_aten(cache, monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN", False)
    monkeypatch.setattr(kernels, "calibrate", lambda: pytest.fail("nothing to calibrate without oneDNN"))
    assert kernels.gemm_route() == "aten"
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(fused.linear(x, w), F.linear(x, w), rtol=0, atol=0)
    monkeypatch.setenv(kernels.ROUTE_ENV, "onednn")
    with pytest.raises(ValueError, match="SIMMIM_GEMM_ROUTE=onednn: this torch build has no oneDNN linear"):
        kernels.gemm_route()


@needs_onednn
def test_without_the_dispatch_mode_probe_linear_takes_aten(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils._python_dispatch", None)  # the import fails
    probe = kernels._dispatch_probe()
    assert probe() is True
    monkeypatch.setattr(kernels, "_dispatch_mode_active", probe)
    monkeypatch.setenv(kernels.ROUTE_ENV, "onednn")
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with torch.profiler.profile() as prof:
        fused.linear(x, w)
    assert "mkldnn::_linear_pointwise" not in [e.name for e in prof.events()]
    monkeypatch.undo()
    assert kernels._dispatch_probe()() is False  # the real probe, with no mode active


def test_softmax_backward_formula_matches_torch():
    scores = torch.randn(4, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(scores, -1)
    grad = torch.randn_like(probs)
    expected, = torch.autograd.grad(probs, scores, grad)
    torch.testing.assert_close(fused.softmax_backward(grad, probs.detach()), expected)
    torch.testing.assert_close(fused._softmax_backward(grad, probs.detach()), expected)


def test_attention_without_the_private_softmax_backward_gives_the_same_gradients(monkeypatch):
    qkv = torch.randn(4, 9, 3 * 8, requires_grad=True)
    bias = torch.randn(2, 2, 9, 9, requires_grad=True)

    def grads() -> tuple[torch.Tensor, ...]:
        out = fused.biased_attention(qkv, bias, heads=2, scale=0.5)
        return torch.autograd.grad(out, (qkv, bias), torch.ones_like(out))

    expected = grads()
    monkeypatch.delattr(torch, "_softmax_backward_data")
    for a, b in zip(grads(), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_keeping_activations_gives_the_same_numbers_for_more_memory(monkeypatch, precision, randomize):
    loss, grads, _, recomputed = _step("aten", monkeypatch, randomize, "1", precision)
    loss_kept, grads_kept, _, kept = _step("aten", monkeypatch, randomize, "0", precision)
    assert torch.equal(loss, loss_kept)
    for a, b in zip(grads, grads_kept, strict=True):
        assert torch.equal(a, b)
    assert kept > 1.3 * recomputed  # the norms' and GELUs' outputs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_recompute_keeps_only_16_bit_gelu_outputs(monkeypatch, randomize, precision):
    loss, grads, _, recomputed = _step("aten", monkeypatch, randomize, "1", precision)
    _, _, _, kept = _step("aten", monkeypatch, randomize, "0", precision)
    loss_auto, grads_auto, _, auto = _step("aten", monkeypatch, randomize, "auto", precision)
    if precision == "fp32":
        assert auto == recomputed
    else:  # the GELU outputs (4x the width) kept, the norm outputs not
        assert recomputed < auto < kept
    assert torch.equal(loss, loss_auto)
    for a, b in zip(grads, grads_auto, strict=True):
        assert torch.equal(a, b)


def test_a_bad_recompute_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(kernels.RECOMPUTE_ENV, "yes")
    with pytest.raises(ValueError, match=r"^SIMMIM_RECOMPUTE='yes': expected auto, 1 \(recompute\) or 0 \(keep\)$"):
        fused.gelu_linear(torch.randn(2, 8, requires_grad=True), torch.randn(4, 8), torch.randn(4))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pointwise_conv_is_a_1x1_conv_whose_weight_gradient_has_the_parameters_layout(precision):
    conv = torch.nn.Conv2d(16, 24, kernel_size=1)
    ours = fused.PointwiseConv(16, 24)
    ours.load_state_dict(conv.state_dict())
    x = torch.randn(2, 5, 5, 16).permute(0, 3, 1, 2)  # channels last, as the encoders' maps are
    outs = []
    for module in (conv, ours):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            out = module(x)
        out.float().square().sum().backward()
        outs.append(out)
    tol = 1e-6 if precision == "fp32" else 1e-2  # relative to the norm: bf16 rounds outputs differently
    for a, b in [(outs[1], outs[0]), (ours.weight.grad, conv.weight.grad), (ours.bias.grad, conv.bias.grad)]:
        assert (a.float() - b.float()).norm() < tol * b.float().norm()
    # what DDP's gradient buckets expect (oneDNN's bf16 convolution returns it channels last)
    assert ours.weight.grad.stride() == ours.weight.stride()
