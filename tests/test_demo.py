"""The main job end to end at a tiny scale: three runs and a report."""

import json

import pytest
import torch

from simmim.cli import main
from simmim.data.fashion_mnist import FASHION_MNIST_DIR
from simmim.hardware import auto_precision
from simmim.serve import load_served_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is missing")]


def test_demo_writes_a_report_with_both_classifiers(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--pretrain-epochs", "2", "--finetune-epochs", "2",
                 "--labels-per-class", "7", "--set", "data.max_images=256", "--set", "data.heldout_images=32",
                 "--set", "data.batch_size=64", "--set", "data.num_workers=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == 70 and summary["pretrain"]["epochs"] == 2
    for run in ("scratch", "simmim"):
        assert 0 <= summary[run]["top1"] <= summary[run]["top5"] <= 100
    for png in ("reconstruction.png", "pretrain_loss.png", "heldout_loss.png", "finetune_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    text = (out / "summary.md").read_text()
    assert f"| from scratch | {summary['scratch']['top1']:.2f} |" in text
    assert "Held-out reconstruction loss" in text and "![reconstructions](reconstruction.png)" in text
    precision, why = auto_precision(torch.device("cpu"))  # the demo's default precision is auto
    assert summary["precision"] == precision and f", in {precision}. Run folders" in text
    assert f"`simmim serve {out / 'pretrain'}`" in text  # the command the report suggests loads that run
    served, _, weights = load_served_model(str(out / "pretrain"))
    assert weights.startswith(str(out / "pretrain" / "ckpt-")) and served.training is False
    out = capsys.readouterr().out
    assert why in out  # each run's header says what auto chose and why
    stages = [line for line in out.splitlines() if line.startswith("== ")]
    assert [line[:7] for line in stages] == ["== 1/3 ", "== 2/3 ", "== 3/3 "]  # the three runs, in order
    assert f"scratch {summary['scratch']['top1']:.2f} vs SimMIM {summary['simmim']['top1']:.2f}" in out


def test_study_writes_summary_tables_and_plots_and_resumes(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["study", "--quick", "--out", str(out), "--work", str(work), "--set", "data.num_workers=0"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())["finetune"]
    assert set(summary) == {"1%"}
    for budget in summary.values():
        for run in ("scratch", "simmim"):
            assert set(budget[run]) == {"mean", "std", "seeds"} and len(budget[run]["seeds"]) == 2
    text = (out / "README.md").read_text()
    assert "| 1% |" in text and "| mask ratio 0.6 (paper) |" in text and "| mask ratio 0.9 |" in text
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG" and (out / "ablations.png").stat().st_size
    runs = len((work / "results.jsonl").read_text().splitlines())
    # per seed: a pretraining, two fine-tunings and two probes; pretraining lengths 1 and 2: a pretraining,
    # a probe and a fine-tuning each; two ablations: a pretraining and a fine-tuning each
    assert runs == 2 * (1 + 2 + 2) + 2 * 3 + 2 * 2
    assert main(argv) == 0  # everything is in results.jsonl: nothing runs again
    assert len((work / "results.jsonl").read_text().splitlines()) == runs
