"""The benchmark at test size: its JSON, that both sides compute the same numbers (loss and gradients of
a training step, so the comparison is apples to apples), its memory measure, and the allocator helper."""

import importlib
import json
import os
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from simmim import runtime
from simmim.bench import main, report
from simmim.bench.measure import gemm_seconds
from simmim.bench.pair import batch, hf_loss, hf_twin, ours, ours_loss, pretraining_step
from simmim.bench.run import METHOD, isolated, row_runner
from simmim.checkpoint.formats import HF
from simmim.measure import peak_memory
from simmim.models.kernels import matmul_nt

pytest.importorskip("transformers")

NANO = "simmim_swin-nano_test-64px"
run = importlib.import_module("simmim.bench.run")  # the module: the package's `run` is the function
CPU = torch.device("cpu")


@pytest.mark.slow
def test_quick_benchmark_writes_the_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.OPT_OUT, "1")  # no re-exec of pytest under jemalloc
    out = tmp_path / "quick.json"
    # 128 px: at 64 px the nano model's last map is smaller than its window, where HF's table differs
    main(["--quick", "--model", NANO, "--img-size", "128", "--batch", "2", "--repeats", "2", "--json", str(out),
          "--peers", str(tmp_path / "absent")])
    assert f"mmpretrain: skipped (no {tmp_path / 'absent'}; `make bench-peers` builds it)" in capsys.readouterr().out
    results = json.loads(out.read_text())
    [row] = results["rows"]
    assert "mm_step_s" not in row and row["mode"] == "eager"
    for key in ("ours_step_s", "ref_step_s", "ours_peak_mb", "ref_peak_mb"):
        assert 0 < row[key] < 1e4, key
    for side in ("ours", "ref"):  # a part of the profiled step (the timed steps may have seen another load)
        assert 0 < row[f"{side}_gemm_s"] < row[f"{side}_profiled_s"], side
    assert row["speedup"] == pytest.approx(row["ref_step_s"] / row["ours_step_s"])
    assert row["ours_loss"] == pytest.approx(row["ref_loss"], abs=1e-5)
    assert results["environment"]["allocator"] and results["environment"]["torch"] == torch.__version__

    # the full run's page, from this row standing in for every table
    page = report.markdown({"runs": [{
        "environment": results["environment"], "method": METHOD, "gemm_tflops": {"bf16": 0.5}, "comparison": [row],
        "cost_curve": [row], "pipeline": {"skipped": "no photos"}, "command": "simmim bench --threads 1"}]})
    assert "`simmim bench --threads 1`" in page and "| ours GEMM s | HF GEMM s |" in page
    assert f"| {row['ours_gemm_s']:.3f} | {row['ref_gemm_s']:.3f} |" in page
    assert 0 <= row["ours_system_s"] < row["ours_step_s"] and 0 <= row["ref_system_s"] < row["ref_step_s"]
    quiet = {**row, "ours_system_s": 0.0, "ref_system_s": 0.0}
    faulting = {**quiet, "ref_system_s": 0.5 * row["ref_step_s"]}  # as when page faults slow HF's steps
    assert report.kernel_time_notes([quiet]) == ["System (kernel) time stayed under 10% of every step on every side."]
    assert report.kernel_time_notes([quiet, faulting]) == [
        f"- {row['model']} {row['precision']}: HF spent {faulting['ref_system_s']:.3f} s of its "
        f"{row['ref_step_s']:.3f} s step in the kernel (page faults, mostly); that row's ratio is less certain."]


def _hf_grads_in_our_layout(hf: torch.nn.Module, tmp_path) -> dict[str, torch.Tensor]:
    """HF's gradients renamed to our keys: written through save_pretrained as if they were weights."""
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.grad)
    hf.save_pretrained(tmp_path)
    return HF.to_ours(safetensors.torch.load_file(tmp_path / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 224])  # at 224 the last two maps are padded to whole windows
def test_both_sides_compute_the_same_training_step(size, tmp_path):
    model = ours(NANO, img_size=size)
    hf = hf_twin(model)
    data = batch(model, 2, CPU)
    losses = [loss_fn(m, data) for m, loss_fn in ((model, ours_loss), (hf, hf_loss))]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), abs=1e-5)
    expected = _hf_grads_in_our_layout(hf, tmp_path)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5, rtol=1e-3), name


def _grads(model: torch.nn.Module, loss_fn, data, precision: str) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_fn(model, data)
    loss.backward()


@pytest.mark.slow
def test_bf16_gradients_are_as_close_to_fp32_as_hfs():
    """Our bf16 backward recomputes norms and activations, casts before reordering tokens and orders its
    weight-gradient products unlike autograd: its error against the fp32 gradients stays at HF's."""
    model = ours(NANO, img_size=128)
    hf = hf_twin(model)
    data = batch(model, 2, CPU)
    errors = {}
    for side, net, loss_fn in (("ours", model, ours_loss), ("hf", hf, hf_loss)):
        _grads(net, loss_fn, data, "fp32")
        exact = {name: p.grad.clone() for name, p in net.named_parameters()}
        _grads(net, loss_fn, data, "bf16")
        relative = [(p.grad - exact[name]).norm() / exact[name].norm() for name, p in net.named_parameters()]
        overall = torch.cat([(p.grad - exact[name]).flatten() for name, p in net.named_parameters()]).norm()
        errors[side] = torch.stack(relative).median(), overall / torch.cat([g.flatten() for g in exact.values()]).norm()
    for ours_error, hf_error in zip(errors["ours"], errors["hf"], strict=True):
        assert ours_error < 0.1  # bf16's 8 bits of mantissa, not a wrong gradient
        assert ours_error < 1.5 * hf_error


def test_bf16_step_stays_near_fp32():
    model = ours(NANO, img_size=128)
    data = batch(model, 2, CPU)
    with torch.no_grad():
        fp32 = ours_loss(model, data).item()
    assert pretraining_step(model, ours_loss, data, "bf16")() == pytest.approx(fp32, rel=0.02)


def test_dropout_paths_train():
    model = ours(NANO, img_size=128, drop_rate=0.1, attn_drop_rate=0.1)
    plain = ours(NANO, img_size=128)
    plain.load_state_dict(model.state_dict())
    data = batch(model, 2, CPU)

    def loss(m: torch.nn.Module, seed: int) -> float:
        torch.manual_seed(seed)
        with torch.no_grad():
            return ours_loss(m, data).item()

    model.train(), plain.train()
    assert loss(model, 0) == loss(model, 0) != loss(model, 1)  # dropout draws from the seeded generator
    assert loss(plain, 0) == loss(plain, 1)  # and is all that differs between the two seeds
    model.eval(), plain.eval()
    assert loss(model, 1) == pytest.approx(loss(plain, 1), abs=1e-6)  # off in eval
    assert np.isfinite(pretraining_step(model.train(), ours_loss, data, "fp32")())


def test_gemm_seconds_count_matrix_products_only():
    a = torch.randn(256, 256)
    gemm, step = gemm_seconds(lambda: (a * 2).exp().sum(), CPU)
    assert gemm == 0 and step > 0
    start = time.perf_counter()
    gemm, step = gemm_seconds(lambda: [a @ a for _ in range(20)] + [matmul_nt(a, a)], CPU)
    assert 0 < gemm < step < time.perf_counter() - start
    assert gemm_seconds(lambda: None, torch.device("meta")) == (None, None)


@pytest.mark.slow
def test_full_run_rows_are_measured_in_fresh_processes_with_the_same_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert isolated(os.getpid) != os.getpid()
        assert isolated(torch.get_num_threads) == 1
        assert row_runner(CPU)(os.getpid) != os.getpid()  # the full run's CPU rows run out of process
    finally:
        torch.set_num_threads(threads)


def test_peak_memory_counts_what_a_step_allocates():
    def step():
        a = torch.ones(2**20)  # 4 MiB, freed before b
        del a
        b = torch.ones(2**21)  # 8 MiB
        return b.sum()

    assert peak_memory(step, CPU) == pytest.approx(8 * 2**20, rel=0.01)


def test_allocator_is_read_from_the_mapped_libraries(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert runtime.loaded_allocator(str(maps)) == "jemalloc"
    maps.write_text("7f00 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert runtime.loaded_allocator(str(maps)) == "glibc malloc"
    assert runtime.loaded_allocator(str(tmp_path / "missing")) == "glibc malloc"


class _Exec(Exception):
    pass


def _fake_execve(path, argv, env):
    raise _Exec(argv, env)


def test_reexec_preloads_jemalloc_once(monkeypatch):
    monkeypatch.setattr(runtime.os, "execve", _fake_execve)
    monkeypatch.setattr(runtime, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: "glibc malloc")
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    for var in (runtime.OPT_OUT, "SIMMIM_REEXEC", "LD_PRELOAD", "MALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(_Exec) as call:
        runtime.maybe_reexec_with_jemalloc()
    argv, env = call.value.args
    assert argv[1:] == runtime.sys.orig_argv[1:]
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2" and env["MALLOC_CONF"] == runtime.JEMALLOC_CONF
    monkeypatch.setenv("SIMMIM_REEXEC", "1")  # the re-executed process does not loop
    runtime.maybe_reexec_with_jemalloc()
    monkeypatch.delenv("SIMMIM_REEXEC")
    monkeypatch.setenv(runtime.OPT_OUT, "1")
    runtime.maybe_reexec_with_jemalloc()


@pytest.mark.slow
def test_profiled_measurements_write_nothing_on_stderr():
    """kineto's `USDT ... profiler_start` and (without a GPU) `ERROR: ... gpuGetDeviceCount failed` lines
    read like a failure of the benchmark; a fresh process shows them at its first profiler start."""
    import subprocess
    import sys

    code = ("import torch\nfrom simmim.bench.measure import gemm_seconds\nfrom simmim.measure import peak_memory\n"
            "step = lambda: torch.randn(64, 64) @ torch.randn(64, 64)\n"
            "assert peak_memory(step, torch.device('cpu')) > 0 and gemm_seconds(step, torch.device('cpu'))[0] >= 0\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_peer_runner_leaves_mmpretrain_out_when_asked_or_absent(tmp_path, monkeypatch, capsys):
    from simmim.bench import peers
    from simmim.bench.run import peer_runner

    def here():
        return "here"

    monkeypatch.setattr(peers, "has_mmpretrain", lambda: True)
    assert peer_runner("none", here) is None  # even where mmpretrain imports: the compile check wants HF only
    assert "mmpretrain: left out (--peers none)" in capsys.readouterr().out
    assert peer_runner(str(tmp_path / "absent"), here) is here
    monkeypatch.setattr(peers, "has_mmpretrain", lambda: False)
    assert peer_runner(str(tmp_path / "absent"), here) is None
    assert f"no {tmp_path / 'absent'}" in capsys.readouterr().out


def _in_process(fn, *args, **kwargs):
    return fn(*args, **kwargs)


@pytest.mark.compiles  # dynamo traces every block of both sides, twice: minutes on two shared cores
def test_a_compiled_row_compiles_each_side_cold_then_measures_them_warm(tmp_path, monkeypatch):
    """The compiled mode's row: a cold first compile per side, each in its own Inductor cache folder, before
    the row that measures the compiled steps on those folders; its losses are the eager ones."""

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    calls, caches = [], []
    real_use = run.use_compile_cache

    def recording(fn, *args, **kwargs):
        calls.append((fn.__name__, args[-1] if fn is run.cold_first_step else None))
        return fn(*args, **kwargs)

    def use(root, side):
        caches.append(side)
        return real_use(root, side)

    monkeypatch.setattr(run, "use_compile_cache", use)
    plan = run.BenchPlan(2, (), 0, 0, 0, 0, 1)
    row = run.compiled_compare(recording, NANO, 2, "fp32", CPU, plan, "eager", cache_root=str(tmp_path),
                               img_size=128)
    assert calls == [("cold_first_step", "ours"), ("cold_first_step", "ref"), ("compare", None)]
    assert caches == ["ours", "ref", "ours", "ref"]  # cold, then the row's first (warm) steps
    folder = tmp_path / f"{NANO}-img_size128-b2-fp32-eager"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "ref")
    cold = {side: json.loads((folder / f"{side}.cold.json").read_text()) for side in ("ours", "ref")}
    assert row["ours_compile_cold_s"] == pytest.approx(cold["ours"]["first_step_s"] - row["ours_step_s"])
    assert row["ref_compile_cold_at"]["date"] == cold["ref"]["date"]
    assert row["mode"] == "compiled" and row["compile"] == "eager"
    for side in ("ours", "ref"):
        assert row[f"{side}_compile_warm_s"] == pytest.approx(row[f"{side}_first_step_s"] - row[f"{side}_step_s"])
        assert row[f"{side}_compile_cold_s"] > -row[f"{side}_step_s"]  # a step's time less the steady step
    eager = run.compare(NANO, 2, "fp32", CPU, plan, img_size=128)
    assert eager["mode"] == "eager" and eager["compile"] is None
    assert row["ours_loss"] == pytest.approx(eager["ours_loss"], abs=1e-6)
    assert row["ref_loss"] == pytest.approx(eager["ref_loss"], abs=1e-6)


def test_a_cold_compile_recorded_before_is_not_run_again(tmp_path):
    folder = tmp_path / f"{NANO}-b2-bf16-inductor"
    folder.mkdir()  # as the run that recorded ref's cold compile left it
    record = {"first_step_s": 150.0, "date": "2026-12-07T23:50:00+00:00", "load_average": 4.0}
    (folder / "ref.cold.json").write_text(json.dumps(record))

    def fresh(fn, *args, **kwargs):
        assert fn is run.cold_first_step and args[-1] == "ours", "only ours has no record"
        return 9.0

    cold = run.cold_compiles(fresh, ["ours", "ref"], NANO, 2, "bf16", CPU, "inductor", tmp_path)
    assert cold["folder"] == folder and cold["ref"] == record and cold["ours"]["first_step_s"] == 9.0
    assert json.loads((folder / "ours.cold.json").read_text()) == cold["ours"]


def test_a_cold_compile_refuses_a_filled_cache(tmp_path):

    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "fxgraph").write_text("")
    with pytest.raises(RuntimeError, match="a cold compile needs an empty Inductor cache"):
        run.cold_first_step(NANO, 2, "fp32", CPU, "eager", str(tmp_path), "ours", img_size=128)


@pytest.mark.compiles
def test_inductor_fills_each_sides_cache_and_computes_the_eager_loss(tmp_path):
    """Inductor for real, each process fresh (`isolated`): minutes on two cores."""

    plan = run.BenchPlan(2, (), 0, 0, 0, 0, 1)
    row = run.compiled_compare(isolated, NANO, 2, "fp32", CPU, plan, "inductor", cache_root=str(tmp_path),
                               img_size=128)
    for side in ("ours", "ref"):  # its kernels compiled into its own folder
        assert any((tmp_path / f"{NANO}-img_size128-b2-fp32-inductor" / side).rglob("*.so")), side
        assert row[f"{side}_compile_cold_s"] > 0
    eager = run.compare(NANO, 2, "fp32", CPU, plan, img_size=128)
    assert row["ours_loss"] == pytest.approx(eager["ours_loss"], abs=1e-5)


def test_the_mode_table_sets_each_sides_eager_step_against_its_compiled_one():
    def row(mode, **steps):
        return {"model": "Swin-T", "img_size": 192, "batch": 8, "precision": "fp32", "mode": mode,
                "compile": "inductor" if mode == "compiled" else None, **steps}

    eager = row("eager", ours_step_s=1.0, ref_step_s=1.5)
    compiled = row("compiled", ours_step_s=1.25, ref_step_s=1.2, ours_compile_cold_s=160.0,
                   ours_compile_warm_s=7.0, ref_compile_cold_s=140.0, ref_compile_warm_s=6.0)
    assert report.mode_rows([eager]) == []  # eager only: no table
    [modes] = report.mode_rows([eager, compiled, row("eager", ours_step_s=9.0) | {"precision": "bf16"}])
    assert modes["ours_mode_ratio"] == pytest.approx(0.8) and modes["ref_mode_ratio"] == pytest.approx(1.25)
    assert modes["ref_best_speedup"] == pytest.approx(1.2)  # HF compiled (1.2 s) against ours eager (1.0 s)
    assert modes["ours_cold_s"] == 160.0 and modes["ref_warm_s"] == 6.0
    headers = [h for h, _, _ in report.mode_columns([modes])]
    assert "HF 1st compile cold s" in headers and not any(h.startswith("mmpretrain") for h in headers)
    [alone] = report.mode_rows([compiled])  # compiled only: no eager figures, the compiled steps compared
    assert alone["ours_eager_s"] is None and alone["ref_best_speedup"] == pytest.approx(1.2 / 1.25)
    assert [h for h, _, _ in report.comparison_columns([eager, compiled])][4] == "mode"
    assert "mode" not in [h for h, _, _ in report.comparison_columns([eager])]
    with_mm = [eager | {"mm_step_s": 1.1}, compiled | {"mm_step_s": 1.0}]  # every column kept: no copy to drop from
    for _ in range(2):  # one "mode" column each time: the columns of one table do not leak into the next
        assert [h for h, _, _ in report.comparison_columns(with_mm)].count("mode") == 1
    assert "mode" not in [h for h, _, _ in report.comparison_columns([eager | {"mm_step_s": 1.1}])]


@pytest.mark.compiles
def test_quick_runs_every_precision_and_mode_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(runtime.OPT_OUT, "1")
    out, page = tmp_path / "quick.json", tmp_path / "page.json"
    main(["--quick", "--model", NANO, "--img-size", "128", "--batch", "2", "--repeats", "1", "--json", str(out),
          "--peers", "none", "--mode", "both", "--backend", "eager", "--precision", "fp32,bf16", "--page",
          "--page-json", str(page), "--markdown", str(tmp_path / "page.md"), "--note", "A test."])
    results = json.loads(out.read_text())
    assert results["command"].startswith("simmim bench --quick --precision fp32,bf16 --mode both --backend eager")
    assert [(r["precision"], r["mode"]) for r in results["rows"]] == [
        ("fp32", "eager"), ("fp32", "compiled"), ("bf16", "eager"), ("bf16", "compiled")]
    assert "| ours eager s | ours compiled s | ours eager/compiled |" in capsys.readouterr().out
    [section] = json.loads(page.read_text())["runs"]
    assert section["comparison"] == results["rows"]
    text = (tmp_path / "page.md").read_text()
    assert "### Eager against compiled" in text and "A test." in text and "### Cost curve" not in text
