"""torch.compile on the fused path: the whole SimMIM forward is one graph (the fused autograd functions
traced into it, forward and backward, no break around them or the window geometry), and the compiled
step computes what eager computes."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from simmim.models import SimMIM, SwinConfig, SwinTransformer, SwinTransformerV2, SwinV2Config, kernels

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN, reason="torch built without oneDNN's linear")
# 12 / 6 / 3 maps with window 4: shifted windows, padded and shifted ones, a clamped window
ENCODERS = {"swin": (SwinTransformer, SwinConfig), "swinv2": (SwinTransformerV2, SwinV2Config)}
# each compile takes 10-20 s here: the fast suite compiles Swin once per test
NAMES = ["swin", pytest.param("swinv2", marks=pytest.mark.slow)]


def _model(name: str, **extra) -> tuple[SimMIM, tuple[torch.Tensor, torch.Tensor]]:
    model_class, config_class = ENCODERS[name]
    cfg = config_class(img_size=48, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 2), window_size=4,
                       drop_path_rate=0.0, use_mask_token=True, **extra)
    model = SimMIM(model_class(cfg), mask_patch_size=16)
    for p in model.parameters():  # zero-initialised norms and biases would hide errors
        torch.nn.init.normal_(p, std=0.2)
    return model, (torch.randn(2, 3, 48, 48), torch.rand(2, 12, 12) < 0.5)


def _step(model, inputs) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out.loss.backward()
    return [out.loss.detach(), out.reconstruction.detach(), *(p.grad for p in model.parameters())]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", NAMES)
def test_the_fused_simmim_forward_is_one_graph_without_breaks(name):
    model, inputs = _model(name)
    explained = torch._dynamo.explain(model)(*inputs)
    # every block, the encoder, the decoder and the loss: one graph, so no break inside (or between) blocks
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _capturing_backend(graphs: dict[str, list[torch.fx.GraphModule]]):
    """aot_eager that keeps the forward and backward graphs it runs."""
    def compiler(kind):
        def keep(gm, _):
            graphs[kind].append(gm)
            return make_boxed_func(gm)
        return keep

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("forward"),
                                     bw_compiler=compiler("backward"))
    return backend


@pytest.mark.parametrize("route", [pytest.param("mixed", marks=needs_onednn),
                                   pytest.param("aten", marks=pytest.mark.slow)])
@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_eager_and_runs_the_fused_backward(name, checkpointing, route):
    model, inputs = _model(name, use_checkpoint=checkpointing)
    model.train()
    graphs = {"forward": [], "backward": []}
    with kernels.using(kernels.resolve(route, "auto")):
        eager = _step(model, inputs)
        compiled = _step(torch.compile(model, backend=_capturing_backend(graphs)), inputs)
    assert not counters["graph_break"]
    assert len(graphs["forward"]) == len(graphs["backward"]) == 1
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the token gathers' backward is the inverse gather of fused.TokenGather, not index_select's
    # scatter-add (which the plain composition would give)
    ops = {str(node.target) for node in graphs["backward"][0].graph.nodes if node.op == "call_function"}
    assert "aten.index_select.default" in ops and not any("index_add" in op or "scatter" in op for op in ops)
    # the route's oneDNN GEMMs stay in the graph as the custom op (Inductor lowers oneDNN's own linear
    # only for constant weights), forward and backward
    forward = {str(node.target) for node in graphs["forward"][0].graph.nodes if node.op == "call_function"}
    assert ("simmim.onednn_linear.default" in forward & ops) == (route != "aten")


@pytest.mark.slow
def test_a_compiled_pretraining_run_reports_its_first_step_once(image_folder, tmp_path, settings, monkeypatch,
                                                                 capsys):
    from simmim.config import load_config
    from simmim.engine import pretrain

    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend="aot_eager"))  # no C++ build
    images = image_folder(tmp_path / "images", train_per_class=4, val_per_class=0)
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", images / "train", tmp_path / "run",
                                                          "runtime.compile=true", "schedule.epochs=2"))
    assert pretrain(cfg).steps == 4
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("torch.compile:")]
    assert len(lines) == 1 and lines[0].startswith("torch.compile: the first step, which compiles, took ")
    assert not counters["graph_break"]
