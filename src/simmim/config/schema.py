"""The config schema: typed dataclass sections with a docstring per field and their range checks, and
the whole run (`TrainConfig`), built from plain data with unknown keys refused by name."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import UnknownName, UsageError
from ..fsutil import atomic_write_text
from ..hardware import GEMM_ROUTES
from .values import convert, field_types, plain

TASKS = ("pretrain", "finetune")


def only(task: str, default: Any, off: Any = None) -> Any:
    """A field that runs of `task` alone read (the others would ignore it: `ignored_keys` names it);
    `off`, where given, is the value that turns off what the other task does not do anyway (vis_every=0
    in a shared list of overrides asks nothing of a fine-tuning run)."""
    return field(default=default, metadata={"task": task, "off": off if off is not None else default})


class _Section:
    """Shared behaviour of the config sections: type conversion, then the section's own checks."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not dataclasses.is_dataclass(hints[f.name]):
                setattr(self, f.name, convert(value, hints[f.name], self.key(f.name)))
        self.check()

    def check(self) -> None:
        """Range and choice checks of the section (after type conversion)."""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise UsageError(f"{self.key(name)}: expected {expected}, got {getattr(self, name)!r}")

    def choice(self, name: str, choices: Iterable[str]) -> None:
        choices = tuple(choices)
        self.require(getattr(self, name) in choices, name, "one of " + ", ".join(map(repr, choices)))


@dataclass
class ModelConfig(_Section):
    section: ClassVar[str] = "model"

    name: str = "simmim_pretrain__swin_base__img192_window6__100ep"
    """Zoo model to train (`simmim models` lists them): a pretraining model for `pretrain`, a classifier
    for `finetune`."""
    img_size: int | None = None
    """Input resolution; None keeps the zoo model's."""
    window_size: int | None = None
    """Swin window; None keeps the zoo model's."""
    pretrained_window_sizes: tuple[int, ...] | None = None
    """SwinV2: per stage, the windows of the pretraining whose weights fine-tune at `window_size`
    (e.g. 12,12,12,6); None keeps the zoo model's."""
    drop_path_rate: float | None = None
    """Stochastic depth of the last block; None keeps the zoo model's."""
    fused: bool = True
    """Compute through models/fused.py (index gathers, fused norm+linear, GELU recompute); false runs
    the plain reference path of the paper (same weights and outputs, slower)."""
    num_classes: int | None = only("finetune", None)
    """Classifier outputs; None takes the number of classes of the training data."""
    decoder: str = only("pretrain", "linear")
    """Pretraining head: 'linear' (the paper's 1x1 conv + PixelShuffle) or 'mlp' (a hidden 1x1 conv layer
    first, the paper's head ablation)."""
    loss: str = only("pretrain", "l1")
    """Pretraining loss on the masked pixels: 'l1' (the paper's) or 'l2'."""
    norm_target: bool | None = only("pretrain", None)
    """Pretraining: reconstruct each pixel standardised over its local window (the SwinV2 SimMIM
    releases' NORM_TARGET) instead of the pixels; None keeps the zoo model's (on for those releases)."""
    norm_target_patch_size: int = only("pretrain", 47)
    """The normalized target's window (odd, in pixels; the releases' 47)."""
    pretrained: str | None = None
    """Weights to start from (`simmim.zoo.sources`: a checkpoint file or folder of any supported layout,
    a training run's folder or checkpoint, an exported folder, a zoo name with published weights,
    `hf-hub:ORG/NAME[@REVISION][:FILE]`). Fine-tuning takes the encoder; pretraining the encoder, mask
    token and decoder (the last two fresh where the checkpoint has none). A resumed run keeps its own
    weights and does not read it."""

    def check(self) -> None:
        from ..zoo import get_spec

        try:
            get_spec(self.name)
        except UnknownName as err:
            raise UnknownName(f"model.name: {err}") from None
        self.require(self.img_size is None or self.img_size > 0, "img_size", "a positive size or none")
        self.require(self.window_size is None or self.window_size > 0, "window_size", "a positive size or none")
        self.require(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1, "drop_path_rate",
                     "a rate in [0, 1) or none")
        self.require(self.num_classes is None or self.num_classes > 0, "num_classes", "a positive count or none")
        self.choice("decoder", ("linear", "mlp"))
        self.choice("loss", ("l1", "l2"))
        self.require(self.norm_target_patch_size >= 3 and self.norm_target_patch_size % 2 == 1,
                     "norm_target_patch_size", "an odd window of at least 3 pixels")


@dataclass
class DataConfig(_Section):
    section: ClassVar[str] = "data"

    path: str = ""
    """A folder (train/ and val/ with one subfolder per class; for pretraining also any folder of
    images, searched recursively), a text file with one image path per line, 'fashion-mnist', or
    WebDataset shards: a .tar, a brace pattern (train-{000000..000099}.tar) or a folder of .tar files
    (also as DIR/train and DIR/val)."""
    batch_size: int = 128
    """Images per process and micro-step; the effective batch is this x processes x accumulation."""
    num_workers: int | None = None
    """Loader processes per rank; None picks them: on a GPU min(8, CPUs per rank - 1), on the CPU with
    runtime.threads from the measured loading and step rates."""
    labels_per_class: int | None = only("finetune", None)
    """Fine-tune on a balanced labelled subset of this many images per class (chosen by data.seed)."""
    seed: int = 0
    """Seed of the labelled subset."""
    max_images: int | None = None
    """Use at most the first this many images of each split (smoke tests, quick looks); none uses all."""
    heldout_images: int = only("pretrain", 256, off=0)
    """Pretraining: held-out images (Fashion-MNIST's test split, or DIR/val) whose masked-pixel loss is
    measured after every epoch with fixed masks, and shown in the reconstruction grids; 0 turns it off."""
    shuffle_buffer: int = 4096
    """WebDataset shards: samples mixed at a time after the shard order is shuffled; larger mixes more,
    smaller keeps reading closer to sequential."""
    classes: tuple[str, ...] | None = None
    """Use only the images of these classes (names as the data gives them, e.g. Sandal,Sneaker,Bag,Ankle boot
    for Fashion-MNIST, or class folder names), labelled 0..k-1 in this order, in every split: one domain
    of a dataset. Fashion-MNIST and image folders with one subfolder per class; none uses every class."""

    def check(self) -> None:
        self.require(self.batch_size > 0, "batch_size", "a positive count")
        self.require(self.heldout_images >= 0, "heldout_images", "a count >= 0")
        self.require(self.shuffle_buffer >= 1, "shuffle_buffer", "a positive count")
        self.require(self.max_images is None or self.max_images > 0, "max_images", "a positive count or none")
        self.require(self.num_workers is None or self.num_workers >= 0, "num_workers", "a count >= 0 or none")
        self.require(self.labels_per_class is None or self.labels_per_class > 0, "labels_per_class",
                     "a positive count or none")
        self.require(self.classes is None or (len(self.classes) > 0 and len(set(self.classes)) == len(self.classes)),
                     "classes", "distinct class names or none")


@dataclass
class OptimConfig(_Section):
    section: ClassVar[str] = "optim"

    lr: float = 2e-4
    """Base learning rate for a total batch of `lr_batch` images; the run uses
    lr x effective batch / lr_batch (the official linear scaling rule)."""
    warmup_lr: float = 1e-6
    """Learning rate the warmup starts from, scaled like `lr`."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine schedule, scaled like `lr`."""
    lr_batch: int = 512
    """Batch size the base learning rates refer to."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay; never applied to 1-D parameters, biases, tokens and position tables."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment decay rates."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float | None = 5.0
    """Maximum global gradient norm; none turns clipping off."""
    layer_decay: float = 1.0
    """Layer-wise lr decay: block i of N gets lr x decay ** (N + 1 - layer id); 1 turns it off."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (keeps the effective batch on fewer devices)."""

    def check(self) -> None:
        for name in ("lr", "warmup_lr", "min_lr"):
            self.require(getattr(self, name) >= 0, name, "a learning rate >= 0")
        self.require(self.lr > 0, "lr", "a positive learning rate")
        self.require(self.lr_batch > 0, "lr_batch", "a positive batch size")
        self.require(self.weight_decay >= 0, "weight_decay", "a value >= 0")
        self.require(all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        self.require(self.eps > 0, "eps", "a positive value")
        self.require(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "a positive norm or none")
        self.require(0 < self.layer_decay <= 1, "layer_decay", "a factor in (0, 1]")
        self.require(self.accumulation_steps >= 1, "accumulation_steps", "a count >= 1")


@dataclass
class ScheduleConfig(_Section):
    section: ClassVar[str] = "schedule"

    epochs: int = 100
    """Passes over the training data."""
    warmup_epochs: float = 10
    """Linear warmup from optim.warmup_lr to optim.lr, per iteration."""
    name: str = "cosine"
    """'cosine' (to optim.min_lr at the last step) or 'multistep' (x gamma at each milestone)."""
    milestones: tuple[int, ...] = (700,)
    """Epochs at which 'multistep' multiplies the learning rate by gamma."""
    gamma: float = 0.1
    """Factor of each 'multistep' decay."""

    def check(self) -> None:
        self.require(self.epochs >= 1, "epochs", "a count >= 1")
        self.require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs",
                     f"at least 0 and at most schedule.epochs={self.epochs}")
        self.choice("name", ("cosine", "multistep"))
        self.require(list(self.milestones) == sorted(self.milestones), "milestones", "increasing epochs")
        self.require(0 < self.gamma <= 1, "gamma", "a factor in (0, 1]")


@dataclass
class MaskConfig(_Section):
    section: ClassVar[str] = "mask"

    patch_size: int = only("pretrain", 32)
    """Side in pixels of the square blocks that are masked together."""
    ratio: float = only("pretrain", 0.6)
    """Fraction of blocks masked (rounded up, as the official generator)."""

    def check(self) -> None:
        self.require(self.patch_size > 0, "patch_size", "a positive size")
        self.require(0 < self.ratio < 1, "ratio", "a fraction in (0, 1)")


@dataclass
class AugmentConfig(_Section):
    section: ClassVar[str] = "augment"

    crop_scale: tuple[float, float] = (0.67, 1.0)
    """RandomResizedCrop area range."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    interpolation: str = "bilinear"
    """Resampling of the training crop: 'bilinear' or 'bicubic'."""
    auto_augment: str | None = None
    """timm RandAugment policy, e.g. 'rand-m9-mstd0.5-inc1'; none turns it off."""
    color_jitter: float = 0.0
    """Color jitter strength (timm ignores it when auto_augment is set)."""
    reprob: float = 0.0
    """Random erasing probability."""
    remode: str = "pixel"
    """Random erasing fill: 'const', 'rand' or 'pixel'."""
    recount: int = 1
    """Random erasing count."""
    mixup: float = only("finetune", 0.0)
    """Mixup alpha; 0 turns mixup off."""
    cutmix: float = only("finetune", 0.0)
    """CutMix alpha; 0 turns CutMix off."""
    mixup_prob: float = only("finetune", 1.0)
    """Probability of mixing a batch at all."""
    switch_prob: float = only("finetune", 0.5)
    """Probability of CutMix instead of Mixup when both are on."""
    mixup_mode: str = only("finetune", "batch")
    """Mix per 'batch', 'pair' or 'elem'."""
    label_smoothing: float = only("finetune", 0.0)
    """Label smoothing of the classification loss (inside the mixed targets when mixing)."""

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def check(self) -> None:
        lo, hi = self.crop_scale
        self.require(0 < lo <= hi <= 1, "crop_scale", "0 < low <= high <= 1")
        self.require(0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", "0 < low <= high")
        for name in ("hflip", "reprob", "mixup_prob", "switch_prob"):
            self.require(0 <= getattr(self, name) <= 1, name, "a probability in [0, 1]")
        self.choice("interpolation", ("bilinear", "bicubic"))
        self.choice("remode", ("const", "rand", "pixel"))
        self.choice("mixup_mode", ("batch", "pair", "elem"))
        for name in ("color_jitter", "mixup", "cutmix"):
            self.require(getattr(self, name) >= 0, name, "a value >= 0")
        self.require(self.recount >= 1, "recount", "a count >= 1")
        self.require(0 <= self.label_smoothing < 1, "label_smoothing", "a value in [0, 1)")


@dataclass
class RuntimeConfig(_Section):
    section: ClassVar[str] = "runtime"

    device: str = "auto"
    """'auto' (the GPU when there is one), 'cpu', 'cuda' or 'cuda:N'; under torchrun every process
    takes cuda:LOCAL_RANK."""
    precision: str = "auto"
    """'auto' (bf16 on GPU and on CPUs with native bf16 matrix units, AMX-BF16 or AVX512-BF16; fp32 on
    other CPUs), 'fp32', 'bf16' (autocast) or 'fp16' (autocast + grad scaler)."""
    parallel: str = "ddp"
    """With several processes: 'ddp' (replicated weights) or 'fsdp' (FSDP2, sharded per block)."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    seed: int = 0
    """Seed of weight init, data order, augmentation and masks (the same on every rank)."""
    threads: int | None = None
    """CPU runs: intra-op threads per process; None chooses them with data.num_workers from the cores and
    the measured loading and step rates (every core computes where loading is light; the header says why)."""
    gemm_route: str = "auto"
    """Route of the float32 CPU GEMMs of the fused layers: 'onednn', 'aten' (torch's BLAS), 'mixed'
    (oneDNN, but the BLAS for weight gradients) or 'auto' (calibrated at the run's start, cached per
    machine and thread count; under torchrun rank 0 decides).
    SIMMIM_GEMM_ROUTE, when set, overrides it; the run records the route it took."""
    recompute: str = "auto"
    """Norm and GELU outputs in the backward of the fused layers: 'recompute' (less memory), 'keep' (one
    elementwise pass less), or 'auto' (keep only 16-bit GELU outputs). SIMMIM_RECOMPUTE=1|0|auto, when
    set, overrides it."""
    log_every: int = 10
    """Optimizer steps between progress lines and metrics records (the loss is read from the device
    only then)."""
    vis_every: int = only("pretrain", 1, off=0)
    """Epochs between reconstruction grids of a pretraining run; 0 turns them off."""
    eval_every: int = only("finetune", 1)
    """Epochs between evaluations of a fine-tuning run (the last epoch is always evaluated)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under RUN_DIR/tensorboard."""
    max_bad_steps: int = 10
    """Consecutive steps with a non-finite loss (each skipped) that stop the run."""

    def check(self) -> None:
        d = self.device
        ok = d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())
        self.require(ok, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        self.choice("precision", ("auto", "fp32", "bf16", "fp16"))
        self.choice("parallel", ("ddp", "fsdp"))
        self.choice("gemm_route", ("auto", *GEMM_ROUTES))
        self.choice("recompute", ("auto", "recompute", "keep"))
        self.require(self.log_every >= 1, "log_every", "a count >= 1")
        self.require(self.vis_every >= 0, "vis_every", "a count >= 0")
        self.require(self.eval_every >= 1, "eval_every", "a count >= 1")
        self.require(self.threads is None or self.threads >= 1, "threads", "a count >= 1 or none")
        self.require(self.max_bad_steps >= 1, "max_bad_steps", "a count >= 1")


@dataclass
class CheckpointConfig(_Section):
    section: ClassVar[str] = "checkpoint"

    every_epochs: int = 1
    """Epochs between checkpoints (the last epoch always gets one)."""
    every_steps: int = 0
    """Also save every this many optimizer steps, mid-epoch included; 0 turns it off."""
    keep: int = 3
    """Newest checkpoints kept in the run folder; older ones are deleted."""
    resume: str | None = None
    """'auto' (the newest checkpoint in the run folder, if any) or a checkpoint file or sharded
    checkpoint directory to continue from."""
    sharded: bool | None = None
    """Save every rank's shards with torch.distributed.checkpoint into a directory ckpt-<step>/ instead
    of gathering the full state into one file; None: sharded under FSDP with several processes."""

    def check(self) -> None:
        self.require(self.every_epochs >= 1, "every_epochs", "a count >= 1")
        self.require(self.every_steps >= 0, "every_steps", "a count >= 0")
        self.require(self.keep >= 1, "keep", "a count >= 1")


@dataclass
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"

    knn_every: int = only("pretrain", 0)
    """Pretraining: a k-NN monitor of the frozen encoder every this many epochs (and after the last);
    0 turns it off. Records eval/knn_top1 and knn_top5 (metrics.jsonl, TensorBoard, knn_curve.png)."""
    knn_data: str | None = only("pretrain", None)
    """Labelled images of the monitor: DIR with train/ and val/ class folders, or 'fashion-mnist';
    None takes data.path."""
    knn_labels_per_class: int = only("pretrain", 20)
    """Training images per class in the monitor's neighbour bank (a balanced subset)."""
    knn_val_images: int = only("pretrain", 500)
    """Validation images the monitor classifies (the first ones)."""

    def check(self) -> None:
        self.require(self.knn_every >= 0, "knn_every", "a count >= 0")
        self.require(self.knn_labels_per_class >= 1, "knn_labels_per_class", "a count >= 1")
        self.require(self.knn_val_images >= 1, "knn_val_images", "a count >= 1")


@dataclass
class TrainConfig(_Section):
    """A whole run: what to train, on what, how, and where to write it."""

    task: str = "pretrain"
    """'pretrain' (SimMIM) or 'finetune' (classification)."""
    preset: str | None = None
    """Preset the config started from (informational)."""
    out_dir: str = ""
    """Run folder; empty picks runs/<preset>-<timestamp>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        from ..zoo import get_spec

        self.choice("task", TASKS)
        spec = get_spec(self.model.name)
        wanted = "pretrain" if self.task == "pretrain" else "classification"
        if spec.task != wanted:
            kind = "a pretraining model" if wanted == "pretrain" else "a classifier"
            raise UsageError(f"model.name: {spec.name} is a {spec.task} model; a {self.task} run needs {kind}")
        if self.task == "finetune" and self.augment.mixes and self.data.batch_size % 2:
            raise UsageError(f"data.batch_size: expected an even size with mixup/cutmix, got {self.data.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings) that YAML and weights-only loading accept."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from (possibly partial) plain data; missing keys take their defaults."""
        return build(cls, data, "")

    def save(self, path: str | Path) -> Path:
        """Writes the resolved config as YAML."""
        path = Path(path)
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False), "config")
        return path


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. 'optim.lr'."""
    keys = []
    for name, tp in field_types(cls).items():
        if name == "section":
            continue
        keys += all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return keys


def unknown_key(key: str) -> UnknownName:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if close:
        return UnknownName(f"unknown config key {key!r}; did you mean {close[0]!r}?")
    # no near miss: the keys of its section, or the sections and top-level keys (an installed wheel has
    # no configs/ folder to point at)
    section = key.split(".")[0] + "."
    valid = [k for k in keys if k.startswith(section)] or sorted({k.split(".")[0] for k in keys})
    return UnknownName(f"unknown config key {key!r}; expected one of {', '.join(valid)}")


def key_task(key: str) -> str | None:
    """The one task that reads dotted `key` (declared with `only`); None where both do (or for a key
    that is not one, which the config load names)."""
    cls, *path, leaf = (TrainConfig, *key.split("."))
    for name in path:
        cls = field_types(cls).get(name)
        if not dataclasses.is_dataclass(cls):
            return None
    return next((f.metadata.get("task") for f in dataclasses.fields(cls) if f.name == leaf), None)


def ignored_keys(cfg: TrainConfig, keys: Iterable[str]) -> list[str]:
    """Those of `keys` (dotted) that the run's task does not read and that hold another value than
    their default (or their `off`): settings the run would silently ignore."""
    out = []
    for key in keys:
        task = key_task(key)
        if task is None or task == cfg.task:
            continue
        *path, leaf = key.split(".")
        section = cfg
        for name in path:
            section = getattr(section, name)
        spec = next(f for f in dataclasses.fields(section) if f.name == leaf)
        if getattr(section, leaf) not in (spec.default, spec.metadata["off"]):
            out.append(key)
    return out


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Section `cls` from (possibly partial) plain data; an unknown key is a one-line error."""
    if not isinstance(data, Mapping):
        raise UsageError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = {k: v for k, v in field_types(cls).items() if k != "section"}
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(prefix + str(key))
        tp = hints[key]
        kwargs[key] = build(tp, value, f"{prefix}{key}.") if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)
