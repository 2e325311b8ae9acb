"""The benchmark page keeps one run per CPU, and names each CPU with the instruction sets that decide its
kernels."""

import json
from pathlib import Path

from simmim import hardware
from simmim.bench import report
from simmim.hardware import cpu_fields, cpu_model

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Platinum 8581C CPU
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: ignored: the first processor names the CPU
"""


def test_cpu_is_named_with_its_bf16_units(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    fields = cpu_fields(str(path))
    assert cpu_model(fields) == "Intel(R) Xeon(R) Platinum 8581C CPU (family 6, model 207; AVX2, AVX-512, " \
                                "AVX512-BF16, AMX-BF16)"
    assert cpu_model(fields, isa=False) == "Intel(R) Xeon(R) Platinum 8581C CPU (family 6, model 207)"
    path.write_text(CPUINFO.replace(" avx512_bf16 amx_bf16 amx_tile", ""))
    assert cpu_model(cpu_fields(str(path))).endswith("(family 6, model 207; AVX2, AVX-512)")
    assert cpu_fields(str(tmp_path / "missing")) == {}


def _run(cpu: str, date: str) -> dict:
    return {"environment": {"cpu": f"{cpu} (AVX-512)", "cpu_key": cpu, "date": date}, "comparison": []}


def test_a_run_replaces_only_its_own_cpus_rows():
    # the page as written before runs were kept per CPU: a single run, without cpu_key
    amd = {"environment": {"cpu": "AMD EPYC (family 26, model 2), AVX-512", "date": "2026-11-26"}, "comparison": [1]}
    intel = _run("Intel Xeon (family 6, model 207)", "2026-12-01")
    page = report.merge_runs(amd, intel)
    assert page == {"runs": [amd, intel]}
    rerun = _run("Intel Xeon (family 6, model 207)", "2026-12-03")
    other = _run("Intel Xeon (family 6, model 143)", "2026-12-03")
    page = report.merge_runs(report.merge_runs(page, rerun), other)
    assert page == {"runs": [amd, rerun, other]}  # in place, the AMD run untouched
    assert report.merge_runs(None, other) == {"runs": [other]}


def test_the_committed_page_has_one_section_per_cpu():
    docs = Path(__file__).parents[1] / "docs"
    page = json.loads((docs / "benchmark.json").read_text())
    keys = [report.cpu_key(run) for run in page["runs"]]
    assert len(keys) == len(set(keys)) and any(key.startswith("AMD EPYC") for key in keys)
    text = (docs / "benchmark.md").read_text()
    assert text == report.markdown(page)
    assert [line for line in text.splitlines() if line.startswith("## ")][1:] == [
        f"## {run['environment']['cpu']}" for run in page["runs"]]


def test_a_section_shows_mmpretrain_and_the_demo_pipeline_where_measured():
    row = {"model": "Swin-T", "img_size": 192, "batch": 8, "precision": "bf16", "ours_step_s": 0.4, "ref_step_s": 0.6,
           "speedup": 1.5}
    env = {"cpu": "Xeon (family 6, model 207; AVX-512, AMX-BF16)", "cpu_key": "Xeon (family 6, model 207)",
           "date": "2026-12-03", "cores": 2, "threads": 1, "device": "cpu", "torch": "2.14.1",
           "transformers": "5.24.0", "mmpretrain": "1.2.0", "allocator": "jemalloc", "load_average": 8.0}
    demo = {"preset": "fashion-mnist-pretrain", "size": 48, "batch_size": 128, "images": 1024, "workers": 1,
            "per_worker_images_per_s": 225.0, "loader_images_per_s": 244.0, "step_images_per_s": 52.0,
            "precision": "bf16", "threads": 1, "keeps_up": True}
    run = {"environment": env, "method": ["- how"], "gemm_tflops": {"bf16": 0.9}, "comparison": [row],
           "cost_curve": [], "pipeline": {"skipped": "no photos"}, "demo_pipeline": demo, "note": "Shared machine."}
    without = report.markdown({"runs": [run]})
    assert "mmpretrain s/step" not in without and "Shared machine." in without
    assert "244.0 img/s through its DataLoader with 1 worker(s), against 52.0 img/s consumed by its bf16 step" \
        in without and "(keeps up)" in without
    with_mm = report.markdown({"runs": [{**run, "comparison": [{**row, "mm_step_s": 0.46, "mm_speedup": 1.15}]}]})
    assert "| HF img/s | mmpretrain s/step | speedup mmpretrain/ours |" in with_mm
    assert "| 0.460 | 1.15 |" in with_mm and "mmpretrain 1.2.0" in with_mm


def test_a_run_with_capped_instruction_sets_is_a_section_of_its_own(monkeypatch):
    import torch

    for name in hardware.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    plain = report.environment(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = report.environment(torch.device("cpu"))
    assert capped["isa_caps"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    suffix = ", instruction sets capped (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2)"
    assert capped["cpu"] == plain["cpu"] + suffix and capped["cpu_key"] == plain["cpu_key"] + suffix
    page = report.merge_runs({"runs": [{"environment": plain}]}, {"environment": capped})
    assert [run["environment"]["cpu_key"] for run in page["runs"]] == [plain["cpu_key"], capped["cpu_key"]]


def test_a_reported_cpu_and_a_quick_run_have_sections_without_the_full_runs_tables():
    env = {"cpu": "Xeon (family 6, model 207; AVX-512)", "cpu_key": "Xeon (family 6, model 207)",
           "date": "2026-12-03", "cores": 2, "threads": 2, "device": "cpu", "torch": "2.14.1", "allocator": "jemalloc",
           "load_average": 3.0}
    row = {"model": "Swin-T", "img_size": 192, "batch": 8, "precision": "fp32", "ours_step_s": 1.0,
           "ref_step_s": 1.1, "speedup": 1.1}
    quick = {"environment": env, "method": ["- how"], "command": "simmim bench --quick", "comparison": [row]}
    reported = {"environment": {"cpu": "EPYC (family 25, model 1; AVX2)", "cpu_key": "EPYC (family 25, model 1)",
                                "date": "2026-12-07"},
                "reported": {"intro": "Reported in issue 27, not re-measured.",
                             "figures": [["fp32 step over HF, eager", "1.04x"]], "note": "No mmpretrain there."}}
    text = report.markdown({"runs": [quick, reported]})
    assert "| fp32 step over HF, eager | 1.04x |" in text and "Reported in issue 27, not re-measured." in text
    assert "### Ours against the references" in text and "Cost curve" not in text and "Dense GEMM" not in text
    assert [line for line in text.splitlines() if line.startswith("## ")][1:] == [
        "## Xeon (family 6, model 207; AVX-512)", "## EPYC (family 25, model 1; AVX2)"]


def test_a_quick_run_puts_its_rows_into_its_cpus_section():
    def row(precision, mode, step):
        return {"model": "Swin-T", "img_size": 192, "window": 6, "batch": 8, "precision": precision, "mode": mode,
                "ours_step_s": step}

    def section(date, rows, command="simmim bench --quick"):
        return {"environment": {"cpu_key": "EPYC (family 25, model 17)", "date": date, "load_average": 2.0},
                "command": command, "comparison": rows}

    other = _run("Intel Xeon (family 6, model 207)", "2026-12-01")
    first = section("00:00", [row("fp32", "eager", 1.0), row("bf16", "eager", 0.5)])
    page = report.merge_rows({"runs": [other]}, first)
    assert page == {"runs": [other, first]}  # a new section
    page = report.merge_rows(page, first)  # the same run rewriting its rows
    assert page == {"runs": [other, first]}
    later = section("00:40", [row("fp32", "compiled", 1.2), row("bf16", "eager", 0.6)],
                    "simmim bench --quick --mode both")
    page = report.merge_rows(page, later)
    merged = page["runs"][1]
    assert merged["comparison"] == [row("fp32", "eager", 1.0), row("fp32", "compiled", 1.2), row("bf16", "eager", 0.6)]
    assert merged["also"] == [{"command": "simmim bench --quick --mode both", "date": "00:40", "load_average": 2.0}]
    assert merged["environment"]["date"] == "00:00" and page["runs"][0] == other
    # a quiet rerun of every row: its environment and note replace the loaded run's
    again = section("01:00", [row("fp32", "eager", 0.9), row("fp32", "compiled", 1.1), row("bf16", "eager", 0.5)])
    assert report.merge_rows(page, {**again, "note": "quiet"}) == {"runs": [other, {**again, "note": "quiet"}]}
