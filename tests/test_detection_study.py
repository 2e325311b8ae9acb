"""The detection study's mosaics (exact labels, deterministic per seed) and the study at smoke size:
records, report, resume that skips finished runs and reruns changed ones."""

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops import masks_to_boxes

import simmim
from simmim.data.mosaics import FashionMosaics, MosaicConfig, draw_mosaic
from simmim.detection_study import DetectionStudySettings, main, run_study

CFG = MosaicConfig(canvas=96, items=(2, 4), sizes=(24, 48))


@pytest.fixture(scope="module")
def mosaics() -> FashionMosaics:
    return FashionMosaics("test", 20, CFG, seed=3, pool=500)


def test_mosaic_labels_are_exact(mosaics):
    counts = []
    for i in range(len(mosaics)):
        image, target = mosaics[i]
        masks = target["masks"].bool()
        counts.append(len(masks))
        assert image.shape == (3, 96, 96) and torch.equal(image[0], image[2])
        # boxes: tight around the masks (torchvision's masks_to_boxes gives the last pixel, ours one past it)
        torch.testing.assert_close(target["boxes"], masks_to_boxes(masks) + torch.tensor([0.0, 0, 1, 1]))
        assert masks.sum(0).max() <= 1  # items never overlap
        # the masks are exactly the canvas's bright pixels, and the semantic map their classes
        assert torch.equal(masks.any(0), image[0] * 255 > CFG.threshold)
        expected = (masks.long() * target["labels"][:, None, None]).sum(0)
        assert torch.equal(target["semantic"], expected)
        assert target["labels"].min() >= 1 and target["labels"].max() <= 10
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1


def test_mosaics_are_a_function_of_seed_and_index(mosaics):
    again = FashionMosaics("test", 20, CFG, seed=3, pool=500)
    for i in (7, 0, 19):
        a, b = mosaics[i], again[i]
        assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    other = FashionMosaics("test", 20, CFG, seed=4, pool=500)
    assert not torch.equal(mosaics[0][0], other[0][0])
    canvas, items = draw_mosaic(mosaics.images, mosaics.labels, CFG, 3, 5)
    assert torch.equal(torch.from_numpy(canvas).float() / 255, mosaics[5][0][0])
    with pytest.raises(IndexError):
        mosaics[20]


@pytest.mark.parametrize("bad, message", [(dict(items=(3, 2)), "items=\\(3, 2\\)"),
                                          (dict(sizes=(24, 200)), "sizes=\\(24, 200\\)"),
                                          (dict(threshold=300), "threshold=300")])
def test_bad_mosaic_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        MosaicConfig(**bad)


def _records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_study_at_smoke_size_reports_and_resumes(tmp_path, capsys, one_thread):
    checkpoint = tmp_path / "pretrained.pth"
    torch.save({"model": simmim.get_model("simmim_swin-micro-w6_fashion-mnist-48px").state_dict()}, checkpoint)
    s = DetectionStudySettings(out=tmp_path / "out", work=tmp_path / "work", pretrained=checkpoint, seeds=(0, 1),
                               mosaics=MosaicConfig(canvas=48, items=(1, 2), sizes=(16, 24)), train_mosaics=8,
                               eval_mosaics=4, steps=1, batch_size=2, fpn_channels=16, log_every=1)
    summary = run_study(s)
    records = _records(s.work)
    assert [r["key"] for r in records] == [f"{task}/{arm}/seed{seed}" for task in ("detection", "segmentation")
                                           for seed in (0, 1) for arm in ("simmim", "random")]
    assert all(r["weights"] == "random" for r in records if "/random/" in r["key"])
    assert len({r["weights"] for r in records if "/simmim/" in r["key"]}) == 1
    for name in ("detection.md", "detection.json", "detection.png"):
        assert (s.out / name).is_file()
    saved = json.loads((s.out / "detection.json").read_text())
    assert saved["table"] == summary["table"] and saved["table"]["simmim"]["miou"]["seeds"] == [
        r["miou"] for r in records if r["key"].startswith("segmentation/simmim")]
    assert "| SimMIM-pretrained |" in (s.out / "detection.md").read_text()
    capsys.readouterr()

    run_study(s)  # everything recorded: nothing runs
    assert "== " not in capsys.readouterr().out and len(_records(s.work)) == len(records)

    # a changed setting reruns that part; new weights rerun the SimMIM arm only
    run_study(DetectionStudySettings(**{**s.__dict__, "steps": 2, "only": "segmentation"}))
    assert capsys.readouterr().out.count("== ") == 4 and len(_records(s.work)) == len(records) + 4
    torch.save({"model": simmim.get_model("simmim_swin-micro-w6_fashion-mnist-48px").state_dict()}, checkpoint)
    run_study(DetectionStudySettings(**{**s.__dict__, "only": "detection"}))
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and "detection/simmim/seed0" in out and "random" not in out


def test_the_command_refuses_bad_seeds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--seeds", "0,x"])
    assert exit_info.value.code == 2 and "--seeds '0,x': expected comma-separated integers" in capsys.readouterr().err


def test_the_report_alone_names_the_runs_not_recorded(tmp_path):
    s = DetectionStudySettings(out=tmp_path / "out", work=tmp_path / "work", seeds=(0, 1), eval_mosaics=2,
                               report=True)
    s.work.mkdir()
    records = [{"key": f"segmentation/random/seed{seed}", "settings": s.shaping(), "weights": "random",
                "seconds": 1.0, "miou": value} for seed, value in ((0, 20.0), (1, 22.0))]
    (s.work / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = run_study(s)
    assert summary["table"]["random"]["miou"] == {"mean": 21.0, "std": 1.41, "seeds": [20.0, 22.0]}
    assert "segmentation/simmim/seed0" in summary["missing"] and len(summary["missing"]) == 6
    report = (s.out / "detection.md").read_text()
    assert "| random weights | not run | not run | not run | not run | 21.00 ± 1.41 |" in report
    assert "Not recorded yet" in report and (s.out / "detection.png").is_file()
