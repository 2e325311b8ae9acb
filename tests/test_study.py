"""The study's code paths at a tiny size on a local image folder (the real study reads Fashion-MNIST)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.cli import main
from simmim.hardware import auto_precision
from simmim.study import StudySettings
from simmim.study.report import precision_of
from simmim.study.runs import _settings, _stale


def make_folder(root, classes=6, train_per_class=4, val_per_class=2, size=28):
    """Six grey levels: the quick study's 3 labels per class fill one batch of 16."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            colour = np.full(3, 20 + 40 * label)
            folder = root / split / f"grey{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, size=(size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.slow
def test_study_probes_lengths_and_curves_on_a_tiny_folder(tmp_path):
    make_folder(tmp_path / "data")
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["study", "--quick", "--out", str(out), "--work", str(work), "--set", f"data.path={tmp_path / 'data'}",
            "--set", "data.num_workers=0", "--set", "runtime.threads=1"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    keys = {r["key"] for r in records}
    # per seed: a pretraining, two fine-tunings and two probes; lengths 1 and 2: a pretraining, a probe and
    # a fine-tuning each; two ablations: a pretraining and a fine-tuning each
    assert len(records) == len(keys) == 2 * 5 + 2 * 3 + 2 * 2
    assert {"probe/random/1%/seed1", "probe/simmim/1%/seed0", "probe/length2/1%/seed0",
            "finetune/length1/1%/seed0", "pretrain/length2/seed0"} <= keys
    for r in records:
        if r["key"].startswith("probe/"):
            assert all(0 <= r[k] <= 100 for k in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"))
        if r["key"].startswith("finetune/"):
            assert [epoch for epoch, _ in r["curve"]] == [1, 2]  # eval every epoch of a 2-epoch run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["probe"]["1%"]) == {"random knn", "random linear", "simmim knn", "simmim linear"}
    assert set(summary["pretrain_length"]) == {"1", "2"}
    text = (out / "README.md").read_text()
    assert "| 1% | 2 |" in text and "| random k-NN | SimMIM k-NN |" in text and "| 2 |" in text
    hours = sum(r.get("seconds", 0) for r in records) / 3600
    assert f"Precision: {auto_precision(torch.device('cpu'))[1]}. Compute: " in text
    assert f"wall times add up to {hours:.1f} h" in text
    for png in ("accuracy.png", "probes.png", "finetune_curves.png", "ablations.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert main(argv) == 0  # everything is in results.jsonl: nothing runs again
    assert len((work / "results.jsonl").read_text().splitlines()) == len(records)


@pytest.mark.slow
def test_study_precision_part_runs_the_demo_recipe_at_each_precision(tmp_path):
    make_folder(tmp_path / "data")
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["study", "--quick", "--only", "precision", "--out", str(out), "--work", str(work),
            "--set", f"data.path={tmp_path / 'data'}", "--set", "data.num_workers=0", "--set", "runtime.threads=1"]
    assert main(argv) == 0
    records = {r["key"]: r for r in map(json.loads, (work / "results.jsonl").read_text().splitlines())}
    # per seed and precision: a pretraining and two fine-tunings, nothing of the main part
    assert len(records) == 2 * 2 * 3
    assert {"pretrain/demo-bf16/seed1", "finetune/scratch-fp32/demo/seed0", "finetune/simmim-bf16/demo/seed1"} \
        <= set(records)
    configs = {p: (work / f"pretrain/demo-{p}/seed0").rglob("config.yaml") for p in ("fp32", "bf16")}
    for precision, found in configs.items():
        assert f"precision: {precision}" in next(found).read_text()
    summary = json.loads((out / "precision.json").read_text())
    for precision in ("fp32", "bf16"):
        gaps = [records[f"finetune/simmim-{precision}/demo/seed{s}"]["top1"]
                - records[f"finetune/scratch-{precision}/demo/seed{s}"]["top1"] for s in (0, 1)]
        assert summary[precision]["gap"]["seeds"] == pytest.approx(gaps, abs=0.01)
    text = (out / "precision.md").read_text()
    assert "| fp32 |" in text and "| bf16 |" in text and not (out / "README.md").exists()


def test_study_report_names_a_forced_precision():
    assert precision_of(StudySettings(extra=("runtime.precision=fp32",))) == "fp32 (runtime.precision=fp32)"
    assert precision_of(StudySettings()) == auto_precision(torch.device("cpu"))[1]


def test_study_reruns_a_run_recorded_at_another_length_or_from_another_checkpoint():
    done = {"finetune/simmim/10%/seed0": {"epochs": 30, "init": "a.pt"}, "probe/random/1%/seed0": {"top1": 50.0}}
    assert _stale(done, "finetune/simmim/10%/seed1", epochs=30, init="a.pt")  # not recorded
    assert not _stale(done, "finetune/simmim/10%/seed0", epochs=30, init="a.pt")
    assert _stale(done, "finetune/simmim/10%/seed0", epochs=60, init="a.pt")  # the budget grew
    assert _stale(done, "finetune/simmim/10%/seed0", epochs=30, init="b.pt")  # pretrained again
    assert not _stale(done, "probe/random/1%/seed0", init=None)  # a record from before init was kept
    assert _settings(("runtime.threads=1", "model.loss=l2", "data.num_workers=0", "mask.ratio=0.3")) == [
        "mask.ratio=0.3", "model.loss=l2"]


@pytest.mark.slow
def test_study_seeds_split_the_main_part_between_processes(tmp_path):
    make_folder(tmp_path / "data")
    work = tmp_path / "work"
    argv = ["study", "--quick", "--only", "main", "--seeds", "1", "--out", str(tmp_path / "results"), "--work",
            str(work), "--set", f"data.path={tmp_path / 'data'}", "--set", "data.num_workers=0",
            "--set", "runtime.threads=1"]
    assert main(argv) == 0
    keys = {json.loads(line)["key"] for line in (work / "results.jsonl").read_text().splitlines()}
    # seed 1's pretraining, two fine-tunings and two probes; the length curve is seed 0's part
    assert keys == {"pretrain/full/seed1", "finetune/scratch/1%/seed1", "finetune/simmim/1%/seed1",
                    "probe/random/1%/seed1", "probe/simmim/1%/seed1"}
    assert not (tmp_path / "results").exists()  # a part writes no report
    records = (work / "results.jsonl").read_text().splitlines()
    assert main([*argv, "--set", "runtime.threads=2"]) == 0  # how it runs: the records still count
    assert (work / "results.jsonl").read_text().splitlines() == records
    assert main([*argv, "--set", "mask.ratio=0.3"]) == 0  # another recipe: every run again, none mixed
    rerun = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()[len(records):]]
    assert {r["key"] for r in rerun} == keys and all("mask.ratio=0.3" in r["settings"] for r in rerun)


@pytest.mark.parametrize("seeds", ["x", "0,0", "-1", "1,,2"])
def test_study_refuses_a_bad_seed_list_in_one_line(seeds, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["study", "--seeds", seeds])
    assert exit_.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--seeds" in message and repr(seeds) in message


def make_fashion_mnist(root, train_per_class=8, test_per_class=4):
    """A tiny Fashion-MNIST in the Debian package's files (gzipped IDX): each class its own grey level."""
    import gzip

    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = np.clip(20 + 22 * labels[:, None, None] + rng.normal(0, 15, (len(labels), 28, 28)), 0, 255)
        for kind, array, magic in (("images-idx3", images.astype(np.uint8), 0x803),
                                   ("labels-idx1", labels, 0x801)):
            head = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
            with gzip.open(root / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(head + array.tobytes())


def _records(work):
    return [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_study_continue_part_runs_four_arms_resumes_and_reruns_what_a_change_touches(tmp_path, monkeypatch):
    from dataclasses import replace

    from simmim.study import quick, run_study
    from simmim.study.domains import ARMS

    make_fashion_mnist(tmp_path)
    monkeypatch.setenv("SIMMIM_FASHION_MNIST_DIR", str(tmp_path))
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["study", "--quick", "--only", "continue", "--out", str(out), "--work", str(work),
            "--set", "data.num_workers=0", "--set", "runtime.threads=1"]
    assert main(argv) == 0
    records = _records(work)
    keys = {r["key"] for r in records}
    # per seed: 3 pretrainings (first domain, second alone, continued), 4 fine-tunings and 4 probes
    assert len(records) == len(keys) == 2 * 11
    assert {"pretrain/domains-source/seed0", "pretrain/domains-continued/seed1", "pretrain/domains-target-only/seed0",
            "finetune/domains-scratch/4-per-class/seed1", "probe/domains-as-is/4-per-class/seed0"} <= keys
    by_key = {r["key"]: r for r in records}
    source = by_key["pretrain/domains-source/seed0"]
    assert by_key["pretrain/domains-continued/seed0"]["init"] == source["checkpoint"]
    assert by_key["pretrain/domains-target-only/seed0"]["init"] is None
    assert by_key["finetune/domains-as-is/4-per-class/seed0"]["init"] == source["checkpoint"]
    assert "data.classes=T-shirt/top,Trouser,Pullover,Dress,Coat,Shirt" in source["settings"]
    assert "data.classes=Sandal,Sneaker,Bag,Ankle boot" in by_key["finetune/domains-scratch/4-per-class/seed0"][
        "settings"]
    configs = {arm: next((work / f"finetune/domains-{arm}/4-per-class/seed0").rglob("config.yaml")).read_text()
               for arm in ARMS}
    assert all("- Ankle boot" in text and "- Trouser" not in text for text in configs.values())
    summary = json.loads((out / "continue.json").read_text())
    assert set(summary["arms"]) == set(ARMS) and summary["seeds"] == [0, 1]
    assert summary["arms"]["continued"]["finetune"]["seeds"] == [
        by_key[f"finetune/domains-continued/4-per-class/seed{s}"]["top1"] for s in (0, 1)]
    gap = [round(by_key[f"finetune/domains-continued/4-per-class/seed{s}"]["top1"]
                 - by_key[f"finetune/domains-as-is/4-per-class/seed{s}"]["top1"], 2) for s in (0, 1)]
    assert summary["finetune_differences"]["continued - as-is"]["seeds"] == gap
    text = (out / "continue.md").read_text()
    assert "| (b) continued on the second domain | " in text and "Precision: " in text
    assert f"| (b) continued - (a) as-is | {summary['finetune_differences']['continued - as-is']['mean']:.2f}" in text
    assert (out / "continue.png").read_bytes()[:4] == b"\x89PNG"

    assert main(argv) == 0  # resumed: everything is recorded, nothing runs again
    assert len(_records(work)) == len(records)
    # a longer continuation reruns arms (b) and (c) and what starts from them, not the first domain's runs
    s = quick(StudySettings(out, work, extra=("data.num_workers=0", "runtime.threads=1"), only="continue"))
    run_study(replace(s, seeds=(0,), domains=replace(s.domains, target_epochs=2)))
    rerun = {r["key"] for r in _records(work)[len(records):]}
    assert rerun == {f"{kind}/domains-{arm}{budget}/seed0" for arm in ("continued", "target-only")
                     for kind, budget in (("pretrain", ""), ("finetune", "/4-per-class"), ("probe", "/4-per-class"))}


@pytest.mark.slow
def test_study_continuation_starts_from_the_first_domains_model_decoder_included(tmp_path, monkeypatch):
    from simmim.engine.evaluation import load_run_model
    from simmim.study import quick
    from simmim.study.runs import Runs

    make_fashion_mnist(tmp_path)
    monkeypatch.setenv("SIMMIM_FASHION_MNIST_DIR", str(tmp_path))
    runs = Runs(quick(StudySettings(tmp_path / "out", tmp_path / "work", extra=("data.num_workers=0",
                                                                                  "runtime.threads=1"))))
    first = runs.pretrained(0, "source", 1)
    # a learning rate of ~0: the continuation's weights are those it started from
    still = ("optim.lr=1e-30", "optim.warmup_lr=0", "optim.min_lr=0", "optim.weight_decay=0")
    continued = runs.pretrained(0, "continued", 1, still, init=first)
    fresh = runs.pretrained(0, "fresh", 1, still)
    weights = {name: load_run_model(r["checkpoint"])[0].state_dict() for name, r in
               (("first", first), ("continued", continued), ("fresh", fresh))}
    assert any(k.startswith("decoder.") for k in weights["first"]) and "encoder.mask_token" in weights["first"]
    for key, tensor in weights["first"].items():
        torch.testing.assert_close(weights["continued"][key], tensor, rtol=0, atol=1e-6, msg=key)
    # the same seed's random weights, untrained, are not the first domain's trained ones
    assert any(not torch.allclose(weights["fresh"][key], tensor) for key, tensor in weights["first"].items())
