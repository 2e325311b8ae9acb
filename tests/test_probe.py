"""Frozen-encoder read-outs: k-NN against a direct computation, the linear probe on a separable toy
problem, and `simmim probe` end to end on a tiny image folder."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.cli import main
from simmim.engine import probe
from simmim.engine.probe import ProbeSettings, knn_scores, linear_probe, topk_accuracy
from simmim.zoo import build_model, get_spec
from simmim.zoo.hub import export


def test_knn_votes_by_hand():
    # bank: (1,0) class 0, (0,1) class 1, (1,1) class 0; query (1,0): cosine 1, 0, 1/sqrt(2)
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1, 0])
    votes = knn_scores(bank, labels, torch.tensor([[3.0, 0.0]]), num_classes=2, k=2, temperature=0.5)
    # the two nearest are (1,0) (sim 1) and (1,1) (sim 0.7071), both class 0
    assert votes[0, 0].item() == pytest.approx(math.exp(1 / 0.5) + math.exp(0.5**0.5 / 0.5), rel=1e-6)
    assert votes[0, 1].item() == 0
    all_three = knn_scores(bank, labels, torch.tensor([[3.0, 0.0]]), num_classes=2, k=3, temperature=0.5)
    assert all_three[0, 1].item() == pytest.approx(math.exp(0.0), rel=1e-6)


def direct_knn(bank, labels, queries, num_classes, k, temperature):
    """Sort every neighbour by cosine similarity in plain Python and add the weighted votes."""
    out = np.zeros((len(queries), num_classes))
    for i, q in enumerate(queries):
        sims = [float(np.dot(q, b) / np.linalg.norm(q) / np.linalg.norm(b)) for b in bank]
        for j in sorted(range(len(bank)), key=lambda j: -sims[j])[:k]:
            out[i, labels[j]] += math.exp(sims[j] / temperature)
    return out


def test_knn_matches_a_direct_computation_on_random_features(monkeypatch):
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(50, 6)), rng.normal(size=(7, 6))
    monkeypatch.setattr(probe, "KNN_CHUNK", 3)  # several chunks, the last one short
    labels = rng.integers(0, 4, size=50)
    got = knn_scores(torch.tensor(bank), torch.tensor(labels), torch.tensor(queries), 4, k=20, temperature=0.07)
    expected = direct_knn(bank, labels, queries, 4, 20, 0.07)
    assert np.allclose(got.double().numpy(), expected, rtol=1e-4)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.3, 0.5, 0.2]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 2])) == pytest.approx({"top1": 100 / 3, "top5": 100.0})


def test_linear_probe_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3 + 10  # far from zero: the BatchNorm centres them
    labels = torch.arange(300) % 3
    features = centers[labels] + torch.randn(300, 16, generator=g)
    head = linear_probe(features[:240], labels[:240], 3, ProbeSettings(epochs=30, batch_size=64))
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    with torch.no_grad():
        assert topk_accuracy(head(features[240:]), labels[240:])["top1"] == 100.0
    untrained = linear_probe(features[:240], labels[:240], 3, ProbeSettings(epochs=0))
    with torch.no_grad():
        assert topk_accuracy(untrained(features[240:]), labels[240:])["top1"] < 80


def make_folder(root, per_class=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 20))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 10, size=(size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_cli_probe_on_a_tiny_folder(tmp_path, capsys):
    make_folder(tmp_path / "data")
    export(build_model(get_spec("simmim_swin-nano_test-64px")), tmp_path / "model")
    out = tmp_path / "probe.json"
    assert main(["probe", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--epochs", "20",
                 "--k", "5", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["train_images"], result["val_images"], result["feature_dim"]) == (12, 12, 192)
    assert result["knn"]["top1"] == 100.0  # two flat colours: even a random encoder tells them apart
    assert 0 <= result["linear"]["top1"] <= 100 and result["linear"]["top5"] == 100.0
    assert "k-NN (k=5) top-1 100.00%" in line
    assert main(["probe", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--epochs", "2",
                 "--classes", "red", "--out", str(out)]) == 0  # one class of the two (as data.classes)
    assert (json.loads(out.read_text())["train_images"], json.loads(out.read_text())["val_images"]) == (6, 6)


def test_cli_probe_names_what_it_cannot_read(tmp_path, capsys):
    make_folder(tmp_path / "data", per_class=2)
    torch.save({"model": build_model(get_spec("simmim_swin-nano_test-64px")).state_dict()}, tmp_path / "w.pth")
    assert main(["probe", str(tmp_path / "w.pth"), "--data", str(tmp_path / "data")]) == 2
    assert "not a simmim training checkpoint" in capsys.readouterr().err
    assert main(["probe", str(tmp_path / "w.pth"), "--data", str(tmp_path / "data"), "--epochs", "2",
                 "--model", "simmim_swin-nano_test-64px"]) == 0


def test_knn_monitor_during_pretraining_records_its_metric_and_curve(tmp_path):
    from simmim.config import load_config
    from simmim.engine.pretraining import pretrain

    make_folder(tmp_path / "data", per_class=4, size=64)
    out = tmp_path / "run"
    cfg = load_config("nano-pretrain", overrides=[
        f"data.path={tmp_path / 'data'}", f"out_dir={out}", "data.batch_size=4", "data.num_workers=0",
        "runtime.threads=1", "runtime.vis_every=0", "schedule.epochs=3", "schedule.warmup_epochs=0",
        "eval.knn_every=2", "eval.knn_labels_per_class=3", "eval.knn_val_images=5"])
    pretrain(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [2, 3]  # every 2 epochs and after the last
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_top5"] == 100.0 for r in knn)
    assert (out / "knn_curve.png").stat().st_size > 0
    assert list((out / "tensorboard").iterdir())
