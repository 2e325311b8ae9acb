"""The fused layers' kernel choices as run settings: runtime.gemm_route and runtime.recompute, refused
in one line when bad, overridden by their environment variables, decided once at a run's start (not
in its first forward), printed in its header, recorded in config.yaml and its checkpoints, and under
torchrun taken from rank 0 by every rank. Code without a run gets a default resolved once."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml

from simmim import hardware
from simmim.checkpoint import training as ckpt
from simmim.cli import main
from simmim.config import load_config
from simmim.engine import pretrain
from simmim.models import kernels

needs_onednn = pytest.mark.skipif(not kernels.ONEDNN, reason="torch built without oneDNN's linear")
ONEDNN_OP = "mkldnn::_linear_pointwise"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private cache directory, the environment variables unset, nothing resolved or installed; a
    calibration fails the test (the routes come from the config, the variables or the cache)."""
    monkeypatch.setenv("SIMMIM_CACHE", str(tmp_path / "cache"))
    for name in (kernels.ROUTE_ENV, kernels.RECOMPUTE_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("_calibrated", {}), ("_defaults", {}), ("_chosen", None)):
        monkeypatch.setattr(kernels, name, value)
    monkeypatch.setattr(kernels, "calibrate", lambda: pytest.fail("calibrated instead of reading the cache"))
    return tmp_path


def machine_key(threads: int) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return hardware.machine_key()
    finally:
        torch.set_num_threads(before)


def write_cache(folder, route: str, threads: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / kernels.CACHE_FILE).write_text(json.dumps({machine_key(threads): {"route": route}}))


@pytest.mark.parametrize(("setting", "expected"), [
    ("runtime.gemm_route=mkl", "runtime.gemm_route: expected one of 'auto', 'onednn', 'mixed', 'aten', got 'mkl'"),
    ("runtime.recompute=1", "runtime.recompute: expected one of 'auto', 'recompute', 'keep', got '1'"),
])
def test_bad_kernel_settings_are_refused_in_one_line(tmp_path, capsys, setting, expected):
    assert main(["pretrain", "--preset", "nano-pretrain", "--data", str(tmp_path), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err == f"simmim: error: {expected}\n"


def test_the_environment_variables_override_the_config(fresh, monkeypatch):
    chosen = kernels.resolve("aten", "keep")
    assert (chosen.gemm_route, chosen.recompute) == ("aten", "keep")
    assert (chosen.route_why, chosen.recompute_why) == ("runtime.gemm_route=aten", "runtime.recompute=keep")
    forced = "onednn" if kernels.ONEDNN else "aten"
    monkeypatch.setenv(kernels.ROUTE_ENV, forced)
    monkeypatch.setenv(kernels.RECOMPUTE_ENV, "1")
    chosen = kernels.resolve("auto" if kernels.ONEDNN else "onednn", "keep")
    assert (chosen.gemm_route, chosen.recompute) == (forced, "recompute")
    assert chosen.recompute_why == "SIMMIM_RECOMPUTE=1, overriding runtime.recompute=keep"
    assert chosen.route_why.startswith(f"SIMMIM_GEMM_ROUTE={forced}, overriding runtime.gemm_route=")
    monkeypatch.setenv(kernels.RECOMPUTE_ENV, "yes")
    with pytest.raises(ValueError, match=r"^SIMMIM_RECOMPUTE='yes': expected auto, 1 \(recompute\) or 0 \(keep\)$"):
        kernels.resolve()


@needs_onednn
def test_an_auto_route_comes_from_the_cache_of_this_machine_and_thread_count(fresh):
    write_cache(fresh / "cache", "aten", threads=torch.get_num_threads())
    chosen = kernels.resolve()
    assert chosen.gemm_route == "aten" and chosen.route_why.startswith("runtime.gemm_route=auto: cached in ")
    # a GPU run routes no float32 CPU GEMMs: nothing to read or calibrate
    assert kernels.resolve(calibrate_route=False).route_why == "runtime.gemm_route=auto: no CPU GEMMs to route"


def test_code_without_a_run_gets_a_default_resolved_once(fresh, monkeypatch):
    calls = []
    resolve = kernels.resolve
    monkeypatch.setattr(kernels, "resolve", lambda: calls.append(1) or resolve("aten"))
    assert kernels.gemm_route() == "aten" and kernels.recompute("norm", torch.float32)
    assert kernels.gemm_route() == "aten" and len(calls) == 1
    with kernels.using(kernels.Kernels("aten", "keep")):  # a run's choice wins while it runs
        assert not kernels.recompute("norm", torch.float32)
    assert kernels.recompute("norm", torch.float32) and len(calls) == 1


def _run(tmp_path, settings, image_folder, name: str, *extra: str):
    """A small fp32 pretraining run, profiled: (its result, whether oneDNN's linear ran, its config.yaml)."""
    data = image_folder(tmp_path / "images")
    cfg = load_config("nano-pretrain", overrides=settings("pretrain", data, tmp_path / name, "schedule.epochs=1",
                                                          "runtime.precision=fp32", *extra))
    with torch.profiler.profile() as prof:
        result = pretrain(cfg)
    ran = ONEDNN_OP in {e.name for e in prof.events()}
    return result, ran, yaml.safe_load((result.run_dir / "config.yaml").read_text())["runtime"]


@needs_onednn
def test_a_run_decides_its_kernels_once_prints_records_and_uses_them(fresh, settings, image_folder, monkeypatch,
                                                                    capsys):
    write_cache(fresh / "cache", "onednn")  # for the run's 1 thread
    resolved = []
    resolve = kernels.resolve
    monkeypatch.setattr(kernels, "resolve", lambda *a, **k: resolved.append(a) or resolve(*a, **k))
    result, ran, runtime = _run(fresh, settings, image_folder, "auto")
    assert len(resolved) == 1  # at the start, whatever the forwards and backwards after
    assert ran and (runtime["gemm_route"], runtime["recompute"]) == ("onednn", "auto")
    assert ckpt.load(result.checkpoint)["config"]["runtime"]["gemm_route"] == "onednn"
    header = capsys.readouterr().out
    assert (f"kernels: fp32 GEMM route onednn (runtime.gemm_route=auto: cached in "
            f"{fresh / 'cache' / kernels.CACHE_FILE} for 1 thread), recompute auto (runtime.recompute=auto)") in header
    assert kernels._chosen is None  # the run's choice ends with it

    # the environment variable wins over the config, and the run says so
    monkeypatch.setenv(kernels.ROUTE_ENV, "aten")
    result, ran, runtime = _run(fresh, settings, image_folder, "forced", "runtime.gemm_route=onednn",
                                "runtime.recompute=keep")
    assert not ran and (runtime["gemm_route"], runtime["recompute"]) == ("aten", "keep")
    assert ("kernels: fp32 GEMM route aten (SIMMIM_GEMM_ROUTE=aten, overriding runtime.gemm_route=onednn), "
            "recompute keep (runtime.recompute=keep)") in capsys.readouterr().out


WORKER = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path

    rank = int(os.environ["RANK"])
    os.environ["SIMMIM_CACHE"] = str(Path(sys.argv[1]) / f"cache{rank}")  # each rank a cache of its own
    import torch
    from simmim.config import load_config
    from simmim.engine import loop, pretrain

    fit, seen = loop.Run.fit, {}

    def profiled(run):
        with torch.profiler.profile() as prof:
            result = fit(run)
        seen["onednn"] = "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
        return result

    loop.Run.fit = profiled
    pretrain(load_config("nano-pretrain", overrides=sys.argv[2:]))
    print("RANK", json.dumps({"rank": rank, **seen}), flush=True)
    from simmim.runtime import exit_worker
    exit_worker(0)
""")


@pytest.mark.distributed
@needs_onednn
def test_under_torchrun_every_rank_takes_rank_0s_route(tmp_path, image_folder, torchrun):
    data = image_folder(tmp_path / "images", train_per_class=4)
    write_cache(tmp_path / "cache0", "onednn")  # the runs compute on 1 thread per rank
    write_cache(tmp_path / "cache1", "aten")  # rank 1 alone would take the other route
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = torchrun(2, str(tmp_path), f"data.path={data}", f"out_dir={tmp_path / 'run'}", "data.batch_size=2",
                   "data.num_workers=0", "runtime.threads=1", "runtime.precision=fp32", "schedule.epochs=1",
                   "schedule.warmup_epochs=0", "runtime.tensorboard=false", "runtime.vis_every=0", launcher=script)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = sorted((json.loads(line.split(" ", 1)[1]) for line in run.stdout.splitlines() if line.startswith("RANK ")),
                   key=lambda r: r["rank"])
    assert ranks == [{"rank": 0, "onednn": True}, {"rank": 1, "onednn": True}]
    assert "kernels: fp32 GEMM route onednn (runtime.gemm_route=auto: cached in" in run.stdout
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["runtime"]["gemm_route"] == "onednn"
    # rank 1 neither read nor rewrote its cache into another choice
    assert json.loads((tmp_path / "cache1" / kernels.CACHE_FILE).read_text()) == {machine_key(1): {"route": "aten"}}
