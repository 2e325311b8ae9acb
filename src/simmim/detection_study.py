"""The detection transfer study (`python -m simmim.detection_study`): does SimMIM pretraining help a detector?

Mosaics of Fashion-MNIST items (`data.mosaics`: exact boxes, masks and classes) train a Mask R-CNN with
FPN (box and mask mAP) and a semantic FPN head (mIoU) on (a) the encoder of the demo's SimMIM pretraining
and (b) the same encoder with random weights, with one recipe, over seeds. Metrics are torchmetrics'
(`MeanAveragePrecision` on pycocotools, `JaccardIndex`). Every run is appended to WORK/results.jsonl as it
finishes, with the settings that shape it; a rerun skips the runs recorded under the same settings and
reruns the others. The report (detection.md, .json, .png) goes to OUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from .checkpoint.io import atomic_save
from .config import load_config
from .data.mosaics import FashionMosaics, MosaicConfig, collate_detection
from .demo import PRETRAIN_PRESET, DemoSettings, pretrain_run
from .detection import detection_backbone, detector_param_groups
from .engine.logging import format_duration
from .engine.optim import LRSchedule
from .errors import UsageError
from .fsutil import append_record, atomic_write, atomic_write_text, read_records
from .hardware import cpu_model
from .models.detection import SemanticFPN

TASKS = ("detection", "segmentation")
ARMS = ("simmim", "random")
EVAL_SEED = 10_000
"""The held-out mosaics' seed (test-split items), the same for every run."""
PICTURED = 6
"""Held-out mosaics drawn in the picture."""


@dataclass(frozen=True)
class DetectionStudySettings:
    """What the study trains; `work`, `out`, `threads` and `only` do not change a run's result."""

    out: Path = Path("docs/results")
    """Where detection.md, detection.json and detection.png go."""
    work: Path = Path("runs/detection-study")
    """results.jsonl, the pictured predictions and (without `pretrained`) the demo's pretraining run."""
    pretrained: Path | None = None
    """The demo's pretraining (run folder or checkpoint); None runs it into WORK/pretrain (once)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    mosaics: MosaicConfig = MosaicConfig()
    train_mosaics: int = 2000
    """Training canvases (items of the training split; drawn per seed)."""
    eval_mosaics: int = 200
    """Held-out canvases (items of the test split; the same for every run)."""
    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    """AdamW peak lr, reached after `warmup` of the steps, then cosine to 1% of it."""
    warmup: float = 0.1
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    """Layer-wise lr decay of the pretrained encoder (the demo's fine-tuning recipe); the random encoder
    trains without it, as the demo's classifier from scratch does."""
    drop_path_rate: float = 0.1
    """The encoder's stochastic depth (the demo's classifier's)."""
    fpn_channels: int = 64
    threads: int | None = None
    """torch intra-op threads; None keeps torch's default."""
    only: str | None = None
    """'detection' or 'segmentation' runs that part only and writes no report."""
    arm: str | None = None
    """'simmim' or 'random' runs that arm only and writes no report (processes can share the work and
    results.jsonl; the random arm needs no pretraining, so it may start before it ends)."""
    report: bool = False
    """Write the report from the runs recorded so far, running nothing (missing runs are named in it)."""
    log_every: int = 50

    def shaping(self) -> dict:
        """The settings that shape a run's result: recorded beside it and compared on resume."""
        skip = {"out", "work", "pretrained", "seeds", "threads", "only", "arm", "report", "log_every"}
        return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self), default=str)).items() if k not in skip}


def file_digest(path: Path) -> str:
    """SHA-256 prefix of a checkpoint (a file, or a sharded folder's files): which weights a run started from."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def build_detector(backbone: nn.Module, num_classes: int, canvas: int, channels: int) -> nn.Module:
    """torchvision's Mask R-CNN sized for small canvases: no resizing, anchors of 12-192 px, slim heads."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    anchors = AnchorGenerator(((12,), (24,), (48,), (96,), (192,)), ((0.5, 1.0, 2.0),) * 5)
    return MaskRCNN(backbone, None, min_size=canvas, max_size=canvas, rpn_anchor_generator=anchors,
                    rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128, box_batch_size_per_image=64,
                    box_detections_per_img=20, box_head=TwoMLPHead(channels * 49, 256),
                    box_predictor=FastRCNNPredictor(256, num_classes),
                    mask_head=MaskRCNNHeads(channels, (channels, channels), 1),
                    mask_predictor=MaskRCNNPredictor(channels, channels, num_classes))


def build_model(task: str, checkpoint: Path | None, s: DetectionStudySettings, num_classes: int) -> nn.Module:
    """The task's model on the demo's encoder: `checkpoint`'s weights, or random ones for None."""
    name = load_config(PRETRAIN_PRESET).model.name
    source = (checkpoint, name) if checkpoint else (name, None)
    backbone = detection_backbone(source[0], model=source[1], out_channels=s.fpn_channels,
                                  drop_path_rate=s.drop_path_rate)
    if task == "detection":
        return build_detector(backbone, num_classes, s.mosaics.canvas, s.fpn_channels)
    return SemanticFPN(backbone, num_classes, s.fpn_channels)


def _loss(task: str, model: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> torch.Tensor:
    if task == "detection":
        return sum(model(images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]).values())
    logits = model(torch.stack(images))
    return nn.functional.cross_entropy(logits, torch.stack([t["semantic"] for t in targets]))


def train_run(task: str, arm: str, seed: int, checkpoint: Path | None, s: DetectionStudySettings,
              train: FashionMosaics, held: FashionMosaics) -> tuple[dict, dict]:
    """One run: trains, evaluates on the held-out mosaics; (metrics and losses, the pictured predictions)."""
    torch.manual_seed(seed)
    model = build_model(task, checkpoint, s, len(train.classes)).train()
    groups = detector_param_groups(model, s.weight_decay, s.layer_decay if arm == "simmim" else 1.0)
    optimizer = torch.optim.AdamW(groups, lr=s.lr)
    schedule = LRSchedule(s.lr, s.lr * 0.01, s.lr * 0.01, s.steps, int(s.warmup * s.steps))
    order = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, s.batch_size, sampler=torch.utils.data.RandomSampler(
        train, replacement=True, num_samples=s.steps * s.batch_size, generator=order),
        collate_fn=collate_detection, drop_last=True)
    losses, start, name = [], time.perf_counter(), f"{task} {arm} seed {seed}"
    for step, (images, targets) in enumerate(loader):
        lr = schedule.apply(optimizer, step)
        loss = _loss(task, model, images, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            took = time.perf_counter() - start
            window = losses[-s.log_every:]
            print(f"  {name}: step {step + 1}/{s.steps}  loss {statistics.fmean(window):.4f}  lr {lr:.2e}  "
                  f"{took / (step + 1):.2f} s/step  eta {format_duration(took / (step + 1) * (s.steps - step - 1))}",
                  flush=True)
    seconds = time.perf_counter() - start
    metrics, pictured = evaluate(task, model.eval(), held, s.batch_size)
    return {"seconds": round(seconds, 1), "first_loss": losses[0], "last_loss": statistics.fmean(losses[-20:]),
            **metrics}, pictured


@torch.no_grad()
def evaluate(task: str, model: nn.Module, held: FashionMosaics, batch_size: int) -> tuple[dict, dict]:
    """torchmetrics on the held-out mosaics: box and mask mAP (COCO's, via pycocotools) or mIoU over the
    classes with the background (as PASCAL VOC's); and the predictions on the first PICTURED mosaics."""
    from torchmetrics.classification import MulticlassJaccardIndex
    from torchmetrics.detection import MeanAveragePrecision

    metric = (MeanAveragePrecision(iou_type=["bbox", "segm"]) if task == "detection"
              else MulticlassJaccardIndex(len(held.classes), average="macro"))
    loader = torch.utils.data.DataLoader(held, batch_size, collate_fn=collate_detection)
    pictured: dict[str, list] = {"boxes": [], "labels": [], "scores": [], "masks": [], "semantic": []}
    for images, targets in loader:
        if task == "detection":
            out = model(images)
            preds = [{"boxes": o["boxes"], "labels": o["labels"], "scores": o["scores"],
                      "masks": o["masks"][:, 0] > 0.5} for o in out]
            metric.update(preds, [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool()}
                                  for t in targets])
            for p in preds[: PICTURED - len(pictured["boxes"])]:
                for k in ("boxes", "labels", "scores", "masks"):
                    pictured[k].append(p[k])
        else:
            semantic = model(torch.stack(images)).argmax(1)
            metric.update(semantic, torch.stack([t["semantic"] for t in targets]))
            pictured["semantic"] += list(semantic[: PICTURED - len(pictured["semantic"])])
    value = metric.compute()
    if task == "detection":
        metrics = {k: round(100 * value[k].item(), 2) for k in ("bbox_map", "bbox_map_50", "segm_map", "segm_map_50")}
    else:
        metrics = {"miou": round(100 * value.item(), 2)}
    return metrics, pictured


def run_study(s: DetectionStudySettings) -> dict:
    """Runs what WORK/results.jsonl lacks under these settings, then writes the report (unless `only`)."""
    if s.only not in (None, *TASKS):
        raise UsageError(f"only={s.only!r}: expected one of {', '.join(TASKS)} or none")
    if s.arm not in (None, *ARMS):
        raise UsageError(f"arm={s.arm!r}: expected one of {', '.join(ARMS)} or none")
    if s.threads:
        torch.set_num_threads(s.threads)
    s.work.mkdir(parents=True, exist_ok=True)
    results = s.work / "results.jsonl"
    done = read_records(results)
    if s.report:
        return write_report(s, done)
    arms = ARMS if s.arm is None else (s.arm,)
    checkpoint = _pretrained(s, done, results) if "simmim" in arms else None
    digest, shaping = file_digest(checkpoint) if checkpoint else None, s.shaping()
    held = FashionMosaics("test", s.eval_mosaics, s.mosaics, EVAL_SEED)
    tasks = TASKS if s.only is None else (s.only,)
    runs = [(task, seed, arm) for task in tasks for seed in s.seeds for arm in arms]
    for i, (task, seed, arm) in enumerate(runs):
        key = f"{task}/{arm}/seed{seed}"
        expected = {"settings": shaping, "weights": digest if arm == "simmim" else "random"}
        if key in done and all(done[key].get(k) == v for k, v in expected.items()):
            continue
        print(f"== {i + 1}/{len(runs)} {key}", flush=True)
        train = FashionMosaics("train", s.train_mosaics, s.mosaics, seed)
        metrics, pictured = train_run(task, arm, seed, checkpoint if arm == "simmim" else None, s, train, held)
        atomic_save(pictured, picture_file(s, key))
        done[key] = append_record(results, {"key": key, **expected, **metrics,
                                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        print(f"   {key}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()), flush=True)
    return write_report(s, done) if s.only is None and s.arm is None else {}


def picture_file(s: DetectionStudySettings, key: str) -> Path:
    return s.work / f"pictured-{key.replace('/', '-')}.pt"


def _pretrained(s: DetectionStudySettings, done: dict, results: Path) -> Path:
    """The demo's pretraining checkpoint: the given one, or the one this study ran (running it once)."""
    from .checkpoint.training import list_checkpoints

    if s.pretrained is not None:
        found = list_checkpoints(s.pretrained) if s.pretrained.is_dir() else [s.pretrained]
        if not found or not found[-1].exists():
            raise FileNotFoundError(f"pretrained={s.pretrained}: no checkpoint there "
                                    "(expected a run folder or a checkpoint file)")
        return found[-1]
    if "pretrain" not in done or not Path(done["pretrain"]["checkpoint"]).exists():
        print(f"== the demo's SimMIM pretraining ({PRETRAIN_PRESET}) -> {s.work / 'pretrain'}", flush=True)
        run = pretrain_run(DemoSettings(out=s.work, seed=0))
        done["pretrain"] = append_record(results, {"key": "pretrain", "checkpoint": str(run.checkpoint),
                                             "seconds": round(run.seconds, 1), **run.metrics})
    return Path(done["pretrain"]["checkpoint"])


METRICS = (("bbox_map", "box mAP"), ("bbox_map_50", "box mAP50"), ("segm_map", "mask mAP"),
           ("segm_map_50", "mask mAP50"), ("miou", "mIoU"))


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0, "seeds": values}


def summarize(s: DetectionStudySettings, done: dict) -> dict:
    """Mean and spread over the recorded seeds of each arm's metrics, the runs' added-up wall time, and
    the runs not recorded (yet)."""
    table: dict[str, dict] = {arm: {} for arm in ARMS}
    seconds, missing = 0.0, []
    for task in TASKS:
        for arm in ARMS:
            keys = [f"{task}/{arm}/seed{seed}" for seed in s.seeds]
            missing += [k for k in keys if k not in done]
            records = [done[k] for k in keys if k in done]
            seconds += sum(r["seconds"] for r in records)
            for metric, _ in METRICS:
                if records and metric in records[0]:
                    table[arm][metric] = _stats([r[metric] for r in records])
    return {"table": table, "run_seconds": round(seconds, 1), "missing": missing}


def write_report(s: DetectionStudySettings, done: dict) -> dict:
    """detection.json, detection.md and detection.png in OUT."""
    s.out.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python -m simmim.detection_study",
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "seeds": list(s.seeds), "settings": s.shaping(), **summarize(s, done)}
    if "pretrain" in done:
        summary["pretrain_seconds"] = done["pretrain"]["seconds"]
    summary["pretrained"] = str(s.pretrained or done.get("pretrain", {}).get("checkpoint"))
    atomic_write_text(s.out / "detection.json", json.dumps(summary, indent=2) + "\n", "study results")
    draw_predictions(s, s.out / "detection.png")
    table = summary["table"]
    def cell(arm: str, m: str) -> str:
        if m not in table[arm]:
            return "not run"
        stats = table[arm][m]
        return f"{stats['mean']:.2f} ± {stats['std']:.2f}" + (f" ({len(stats['seeds'])} seeds)"
                                                              if len(stats["seeds"]) != len(s.seeds) else "")

    def diff(m: str) -> str:
        both = m in table["simmim"] and m in table["random"]
        return f"{table['simmim'][m]['mean'] - table['random'][m]['mean']:+.2f}" if both else "-"

    heads = [label for _, label in METRICS]
    c, m = s.mosaics, summary["settings"]
    lines = [
        "# Detection and segmentation transfer on Fashion-MNIST mosaics",
        "",
        f"{c.canvas} px canvases of {c.items[0]}-{c.items[1]} Fashion-MNIST items each ({c.sizes[0]}-{c.sizes[1]} px, "
        f"not overlapping; masks are the items' pixels above grey level {c.threshold}); {s.train_mosaics:,} training "
        f"canvases of training-split items per seed, {s.eval_mosaics} held-out canvases of test-split items. "
        f"Mask R-CNN with FPN (torchvision) and a semantic FPN head on the demo's Swin (48 px pretraining, window 6), "
        f"{s.steps} AdamW steps of {s.batch_size} canvases each (lr {s.lr:g}, cosine, weight decay {s.weight_decay:g}, "
        f"drop path {s.drop_path_rate:g}; layer decay {s.layer_decay:g} for the pretrained encoder only). "
        f"Metrics: torchmetrics' MeanAveragePrecision (COCO mAP@[.5:.95] and mAP@.5 through pycocotools) "
        f"and JaccardIndex (mIoU over the 10 classes and the background). Mean ± std over seeds {list(s.seeds)}.",
        "",
        "| encoder | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
        "| SimMIM-pretrained | " + " | ".join(cell("simmim", k) for k, _ in METRICS) + " |",
        "| random weights | " + " | ".join(cell("random", k) for k, _ in METRICS) + " |",
        "| difference | " + " | ".join(diff(k) for k, _ in METRICS) + " |",
        "",
        *([f"Not recorded yet (the table leaves them out; rerun the command to add them): "
           f"{', '.join(summary['missing'])}.", ""] if summary["missing"] else []),
        "![predictions](detection.png)",
        "",
        "Held-out mosaics: the labels, then each encoder's Mask R-CNN (boxes and masks with score > 0.5) and "
        "semantic head (of the first seed whose run is recorded).",
        "",
        f"Produced by `{summary['command']}` on {summary['date']} ({summary['machine']}); the runs took "
        f"{format_duration(summary['run_seconds'])} added up"
        + (f", the pretraining {format_duration(summary['pretrain_seconds'])}" if "pretrain_seconds" in summary else "")
        + f". SimMIM encoder: `{summary['pretrained']}`. Settings: `{json.dumps(m)}`.",
    ]
    atomic_write_text(s.out / "detection.md", "\n".join(lines) + "\n", "study report")
    print(f"report: {s.out / 'detection.md'}")
    for arm in ARMS:
        print(f"  {arm}: " + ", ".join(f"{label} {cell(arm, k)}" for k, label in METRICS))
    return summary


def _pictured(s: DetectionStudySettings, task: str, arm: str) -> tuple[int, dict] | None:
    """(seed, pictured predictions) of the first of the study's seeds whose run saved them."""
    for seed in s.seeds:
        if (path := picture_file(s, f"{task}/{arm}/seed{seed}")).is_file():
            return seed, torch.load(path, weights_only=True)
    return None


def draw_predictions(s: DetectionStudySettings, path: Path, scale: int = 2, threshold: float = 0.5) -> None:
    """Rows: ground truth, then per arm its Mask R-CNN's boxes and masks and its semantic map; columns:
    the first PICTURED held-out mosaics."""
    from PIL import Image, ImageDraw
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

    held = FashionMosaics("test", min(PICTURED, s.eval_mosaics), s.mosaics, EVAL_SEED)
    names = [n.split("/")[0] for n in held.classes]
    palette = [(0, 0, 0)] + [tuple(int(255 * v) for v in c) for c in
                             ((.9, .1, .1), (.1, .7, .1), (.2, .3, 1), (1, .7, 0), (.8, .2, .9), (0, .8, .8),
                              (1, .4, .6), (.6, .4, .1), (.5, .9, .3), (.6, .6, 1))]

    def upscale(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(scale, -1).repeat_interleave(scale, -2)

    def detections(image, boxes, labels, masks, scores=None) -> torch.Tensor:
        keep = torch.ones(len(labels), dtype=torch.bool) if scores is None else scores > threshold
        canvas = upscale((image * 255).to(torch.uint8))
        if keep.any():
            colours = [palette[int(k)] for k in labels[keep]]
            canvas = draw_segmentation_masks(canvas, upscale(masks[keep].bool()), alpha=0.45, colors=colours)
            canvas = draw_bounding_boxes(canvas, boxes[keep] * scale, [names[int(k)] for k in labels[keep]],
                                         colors=colours)
        return canvas

    def semantic(image, classes) -> torch.Tensor:
        masks = torch.stack([classes == k for k in range(1, len(names))])
        return draw_segmentation_masks(upscale((image * 255).to(torch.uint8)), upscale(masks), alpha=0.6,
                                       colors=palette[1:])

    items = [held[i] for i in range(len(held))]
    rows = [("labels", [detections(im, t["boxes"], t["labels"], t["masks"]) for im, t in items])]
    for arm in ARMS:
        label = "SimMIM" if arm == "simmim" else "random"
        if (det := _pictured(s, "detection", arm)) is not None:
            seed, det = det
            rows.append((f"{label}: Mask R-CNN\n(seed {seed})", [
                detections(im, det["boxes"][i], det["labels"][i], det["masks"][i], det["scores"][i])
                for i, (im, _) in enumerate(items)]))
        if (seg := _pictured(s, "segmentation", arm)) is not None:
            seed, seg = seg
            rows.append((f"{label}: semantic FPN\n(seed {seed})", [semantic(im, seg["semantic"][i])
                                                                  for i, (im, _) in enumerate(items)]))
    grid = make_grid(torch.stack([p for _, panels in rows for p in panels]), nrow=len(held), padding=4, pad_value=255)
    side, margin = s.mosaics.canvas * scale + 4, 150
    picture = Image.new("RGB", (grid.shape[2] + margin, grid.shape[1]), "white")
    picture.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (margin, 0))
    draw = ImageDraw.Draw(picture)
    for r, (title, _) in enumerate(rows):
        draw.multiline_text((6, r * side + side // 2 - 12), title, fill="black")
    atomic_write(path, lambda f: picture.save(f, format="PNG"), "picture")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simmim.detection_study", description=__doc__.split("\n\n")[0])
    d = DetectionStudySettings()
    p.add_argument("--work", type=Path, default=d.work, help="results.jsonl and the runs' pictured predictions")
    p.add_argument("--out", type=Path, default=d.out, help="where detection.md/.json/.png go")
    p.add_argument("--pretrained", type=Path, help="the demo's pretraining run folder or checkpoint "
                                                   "(default: run it into WORK/pretrain)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--train-mosaics", type=int, default=d.train_mosaics)
    p.add_argument("--eval-mosaics", type=int, default=d.eval_mosaics)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--only", choices=TASKS, help="run that part only, without the report")
    p.add_argument("--arm", choices=ARMS, help="run that arm only, without the report")
    p.add_argument("--report", action="store_true", help="write the report from the recorded runs, running nothing")
    args = p.parse_args(argv)
    try:
        seeds = tuple(int(v) for v in args.seeds.split(","))
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    settings = DetectionStudySettings(out=args.out, work=args.work, pretrained=args.pretrained, seeds=seeds,
                                      steps=args.steps, train_mosaics=args.train_mosaics,
                                      eval_mosaics=args.eval_mosaics, threads=args.threads, only=args.only,
                                      arm=args.arm, report=args.report)
    start = time.perf_counter()
    run_study(settings)
    print(f"detection study: {format_duration(time.perf_counter() - start)}")


if __name__ == "__main__":
    main()
