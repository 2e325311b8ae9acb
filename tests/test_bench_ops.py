"""`simmim bench --ops`: operators sorted into categories that add up to the profiled step, the operators
that differ most between two sides, and real profiles of our step and HF's on the same weights."""

import json

import pytest
import torch

from simmim import runtime
from simmim.bench import main, ops
from simmim.bench.pair import build_sides

pytest.importorskip("transformers")

NANO = "simmim_swin-nano_test-64px"


def _profile(side: str, profiled_s: float, **seconds: float) -> ops.StepProfile:
    names = {"mm": "aten::mm", "norm": "aten::native_layer_norm", "copy": "aten::copy_", "gelu": "aten::gelu",
             "add": "aten::add_", "fn": "_NormLinearBackward", "adam": "aten::_fused_adamw_", "sum": "aten::sum"}
    return ops.StepProfile(side, profiled_s, profiled_s,
                           tuple(ops.OpTime(names[k], v, 3) for k, v in seconds.items()))


def test_operators_land_in_their_categories():
    assert ops.category("aten::mm") == ops.category("aten::_slow_conv2d_backward") == "GEMM"
    assert ops.category("aten::native_layer_norm_backward") == "layer norm"
    assert ops.category("aten::copy_") == ops.category("aten::index_select") == "copies and layout"
    assert ops.category("aten::gelu_backward") == "GELU"
    assert ops.category("aten::isneginf") == ops.ELEMENTWISE  # an aten operator named nowhere
    assert ops.category("_BiasedAttentionBackward") == ops.category("Optimizer.step#AdamW.step") == ops.FRAMEWORK


def test_categories_add_up_to_the_profiled_step():
    profile = _profile("ours", 1.0, mm=0.5, norm=0.1, copy=0.05, gelu=0.04, add=0.03, fn=0.02, adam=0.06, sum=0.01)
    seconds = ops.by_category(profile)
    assert list(seconds) == list(ops.CATEGORY_ORDER)
    assert sum(seconds.values()) == pytest.approx(1.0)
    assert seconds["GEMM"] == 0.5 and seconds["optimizer"] == 0.06 and seconds[ops.FRAMEWORK] == 0.02
    assert seconds[ops.UNPROFILED] == pytest.approx(1.0 - 0.81)


def test_differences_rank_operators_by_the_size_of_their_gap():
    ours = _profile("ours", 1.0, mm=0.5, norm=0.1, fn=0.02)
    peer = _profile("mm", 1.2, mm=0.45, norm=0.02, copy=0.2)
    rows = ops.differences(ours, peer, top=3)
    assert [name for name, _, _ in rows] == ["aten::copy_", "aten::native_layer_norm", "aten::mm"]
    name, a, b = rows[0]
    assert (a.seconds, a.calls, b.seconds, b.calls) == (0.0, 0, 0.2, 3)  # ours runs no copy_
    lines = ops.markdown({"ours": ours, "mm": peer}, "test")
    assert "| GEMM | 0.500 | 0.450 | +0.050 |" in lines
    assert "| aten::copy_ | copies and layout | 0.0000 | 0 | 0.2000 | 3 | -0.2000 |" in lines


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_profiles_of_our_step_and_hfs(precision, one_thread):
    _, steps = build_sides(NANO, 2, precision, torch.device("cpu"), reference=True, img_size=128)
    profiles = ops.profile_steps(steps, repeats=2, progress=lambda line: None)
    assert set(profiles) == {"ours", "ref"}
    for side, profile in profiles.items():
        seconds = ops.by_category(profile)
        assert seconds["GEMM"] > 0 and seconds["optimizer"] > 0 and profile.step_s > 0, side
        assert sum(seconds.values()) == pytest.approx(profile.profiled_s)
    names = {op.name for op in profiles["ours"].ops}
    assert {"_NormLinear", "_BiasedAttention"} <= names  # our autograd functions ran
    assert "_NormLinear" not in {op.name for op in profiles["ref"].ops}


@pytest.mark.slow
def test_the_command_prints_and_writes_the_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.OPT_OUT, "1")  # no re-exec of pytest under jemalloc
    md, js = tmp_path / "ops.md", tmp_path / "ops.json"
    main(["--ops", "--model", NANO, "--img-size", "128", "--batch", "2", "--repeats", "1", "--precision", "fp32",
          "--markdown", str(md), "--json", str(js), "--peers", str(tmp_path / "absent")])
    out = capsys.readouterr().out
    assert f"mmpretrain: skipped (no {tmp_path / 'absent'}" in out
    text = md.read_text()
    # the page is its title and introduction, then this CPU's section: the tables the command printed
    assert text.startswith(f"{ops.TITLE}\n\n{ops.INTRO}\n\n## ") and "| category | ours s | HF s | ours - HF |" in text
    tables = [line for line in out.splitlines() if line.startswith("|")]
    assert tables and all(line in text for line in tables)
    data = json.loads(js.read_text())
    assert set(data["fp32"]) == {"ours", "ref"}
    names = {op["name"] for op in data["fp32"]["ours"]["ops"]}
    assert "_NormLinear" in names and names & {"aten::mm", "mkldnn::_linear_pointwise"}  # either GEMM route


def test_the_operator_page_keeps_one_section_per_cpu():
    intel = ["## Xeon (family 6, model 167; AVX2, AMX-BF16), 1 threads, torch 2.14", "", "Intel tables"]
    amd = ["## EPYC (family 25, model 17; AVX-512), 2 threads, torch 2.14", "", "AMD tables"]
    page = ops.merge_page(None, intel, "Xeon (family 6, model 167)")
    assert page.startswith(f"{ops.TITLE}\n\n{ops.INTRO}\n\n## Xeon") and page.endswith("Intel tables\n")
    page = ops.merge_page(page, amd, "EPYC (family 25, model 17)")
    rerun = [intel[0].replace("1 threads", "2 threads"), "", "Intel again"]
    page = ops.merge_page(page, rerun, "Xeon (family 6, model 167)")
    assert page == "\n".join([ops.TITLE, "", ops.INTRO, "", *rerun, "", *amd]) + "\n"  # in place, the other kept
    assert ops.section_cpu(amd[0]) == "EPYC (family 25, model 17)"
