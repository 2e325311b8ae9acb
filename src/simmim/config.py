"""Training recipes as typed configs: dataclass sections with a docstring per field, loaded from a YAML
file or a named preset, overridden with dotted keys (`optim.lr=1e-4`), stored as plain data.

Values are converted to each field's declared type when a section is built, so YAML strings such as
`1e-4` (PyYAML reads them as text), command-line strings and Python values all go through one path;
every error is one line naming the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

TASKS = ("pretrain", "finetune")
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NONE = ("none", "null", "~", "")


class _Section:
    """Shared behaviour of the config sections: type conversion, then the section's own checks."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not dataclasses.is_dataclass(hints[f.name]):
                setattr(self, f.name, _convert(value, hints[f.name], self.key(f.name)))
        self.check()

    def check(self) -> None:
        """Range and choice checks of the section (after type conversion)."""

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{self.key(name)}: expected {expected}, got {getattr(self, name)!r}")

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
    num_classes: int | None = None
    """Classifier outputs; None takes the number of classes of the training data."""
    decoder: str = "linear"
    """Pretraining head: 'linear' (the paper's 1x1 conv + PixelShuffle) or 'mlp' (a hidden 1x1 conv layer
    first, the paper's head ablation)."""
    loss: str = "l1"
    """Pretraining loss on the masked pixels: 'l1' (the paper's) or 'l2'."""
    pretrained: str | None = None
    """Fine-tuning: checkpoint whose encoder initializes the model (a pretraining run's or any
    supported checkpoint); ignored when resuming."""

    def check(self) -> None:
        from .zoo import get_spec

        try:
            get_spec(self.name)
        except KeyError as err:
            raise ValueError(f"model.name: {err.args[0]}") from None
        self.require(self.img_size is None or self.img_size > 0, "img_size", "a positive size or none")
        self.require(self.window_size is None or self.window_size > 0, "window_size", "a positive size or none")
        self.require(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1, "drop_path_rate",
                     "a rate in [0, 1) or none")
        self.require(self.num_classes is None or self.num_classes > 0, "num_classes", "a positive count or none")
        self.choice("decoder", ("linear", "mlp"))
        self.choice("loss", ("l1", "l2"))


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
    """Loader processes per rank; None picks min(8, CPUs per rank - 1)."""
    labels_per_class: int | None = None
    """Fine-tune on a balanced labelled subset of this many images per class (chosen by data.seed)."""
    seed: int = 0
    """Seed of the labelled subset."""
    max_images: int | None = None
    """Use at most the first this many images of each split (smoke tests, quick looks); none uses all."""
    heldout_images: int = 256
    """Pretraining: held-out images (Fashion-MNIST's test split, or DIR/val) whose masked-pixel loss is
    measured after every epoch with fixed masks, and shown in the reconstruction grids; 0 turns it off."""
    shuffle_buffer: int = 4096
    """WebDataset shards: samples mixed at a time after the shard order is shuffled; larger mixes more,
    smaller keeps reading closer to sequential."""

    def check(self) -> None:
        self.require(self.batch_size > 0, "batch_size", "a positive count")
        self.require(self.heldout_images >= 0, "heldout_images", "a count >= 0")
        self.require(self.shuffle_buffer >= 1, "shuffle_buffer", "a positive count")
        self.require(self.max_images is None or self.max_images > 0, "max_images", "a positive count or none")
        self.require(self.num_workers is None or self.num_workers >= 0, "num_workers", "a count >= 0 or none")
        self.require(self.labels_per_class is None or self.labels_per_class > 0, "labels_per_class",
                     "a positive count or none")


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
        self.require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"a value in [0, {self.epochs}]")
        self.choice("name", ("cosine", "multistep"))
        self.require(list(self.milestones) == sorted(self.milestones), "milestones", "increasing epochs")
        self.require(0 < self.gamma <= 1, "gamma", "a factor in (0, 1]")


@dataclass
class MaskConfig(_Section):
    section: ClassVar[str] = "mask"

    patch_size: int = 32
    """Side in pixels of the square blocks that are masked together."""
    ratio: float = 0.6
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
    mixup: float = 0.0
    """Mixup alpha; 0 turns mixup off."""
    cutmix: float = 0.0
    """CutMix alpha; 0 turns CutMix off."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch at all."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of Mixup when both are on."""
    mixup_mode: str = "batch"
    """Mix per 'batch', 'pair' or 'elem'."""
    label_smoothing: float = 0.0
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
    """'auto' (bf16 on GPU, fp32 on CPU), 'fp32', 'bf16' (autocast) or 'fp16' (autocast + grad scaler)."""
    parallel: str = "ddp"
    """With several processes: 'ddp' (replicated weights) or 'fsdp' (FSDP2, sharded per block)."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
    seed: int = 0
    """Seed of weight init, data order, augmentation and masks (the same on every rank)."""
    threads: int | None = None
    """CPU training: intra-op threads per process; None takes the cores the loader workers leave free."""
    log_every: int = 10
    """Optimizer steps between progress lines and metrics records (the loss is read from the device
    only then)."""
    vis_every: int = 1
    """Epochs between reconstruction grids of a pretraining run; 0 turns them off."""
    eval_every: int = 1
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

    def check(self) -> None:
        from .zoo import get_spec

        self.choice("task", TASKS)
        spec = get_spec(self.model.name)
        wanted = "pretrain" if self.task == "pretrain" else "classification"
        if spec.task != wanted:
            kind = "a pretraining model" if wanted == "pretrain" else "a classifier"
            raise ValueError(f"model.name: {spec.name} is a {spec.task} model; a {self.task} run needs {kind}")
        if self.task == "finetune" and self.augment.mixes and self.data.batch_size % 2:
            raise ValueError(f"data.batch_size: expected an even size with mixup/cutmix, got {self.data.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings) that YAML and weights-only loading accept."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from (possibly partial) plain data; missing keys take their defaults."""
        return _build(cls, data, "")

    def save(self, path: str | Path) -> Path:
        """Writes the resolved config as YAML."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


# ---------------------------------------------------------------------------------------------------------
# conversion, building and overrides


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "a comma-separated list of " + {int: "integers", float: "numbers"}.get(typing.get_args(tp)[0], "values")
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "none"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (a Python value or a command-line/YAML string) as type `tp`, or a one-line error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE)):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key)
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removeprefix("(").removesuffix("]").removesuffix(")")
            value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail
        fixed = origin is tuple and not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
        return origin(_convert(v, args[i] if fixed else args[0], key) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise fail
    if tp in (int, float):
        if isinstance(value, bool):
            raise fail
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise fail from None
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise fail
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def all_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. 'optim.lr'."""
    keys = []
    for name, tp in _hints(cls).items():
        if name == "section":
            continue
        keys += all_keys(tp, f"{prefix}{name}.") if dataclasses.is_dataclass(tp) else [prefix + name]
    return keys


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else " (see configs/ for the keys)"
    return ValueError(f"unknown config key {key!r}{hint}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = {k: v for k, v in _hints(cls).items() if k != "section"}
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(prefix + str(key))
        tp = hints[key]
        kwargs[key] = _build(tp, value, f"{prefix}{key}.") if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict `base` updated by `update`, section by section."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'optim.lr=1e-4' -> {'optim': {'lr': '1e-4'}}; the value is converted when the config is built."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    if key not in all_keys():
        sections = {k.split(".")[0] for k in all_keys() if "." in k}
        if key in sections:
            raise ValueError(f"--set {key}: {key!r} is a section; set one of its keys, e.g. {key}.<name>=VALUE")
        raise _unknown(key)
    *path, leaf = key.split(".")
    out: dict[str, Any] = {leaf: value}
    for part in reversed(path):
        out = {part: out}
    return out


# ---------------------------------------------------------------------------------------------------------
# presets: the published recipes (microsoft/SimMIM configs, see REFERENCE 1.5/1.6) and small CPU ones

FINETUNE_AUGMENT = dict(crop_scale=(0.08, 1.0), interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1",
                        color_jitter=0.4, reprob=0.25, remode="pixel", recount=1, mixup=0.8, cutmix=1.0,
                        mixup_prob=1.0, switch_prob=0.5, mixup_mode="batch", label_smoothing=0.1)


def _pretrain(model: str, lr: float, warmup_lr: float, schedule: dict, drop_path: float, **extra) -> dict:
    return merge(dict(task="pretrain", model=dict(name=model, drop_path_rate=drop_path),
                      optim=dict(lr=lr, warmup_lr=warmup_lr), schedule=schedule), extra)


def _finetune(model: str, layer_decay: float, drop_path: float, **extra) -> dict:
    return merge(dict(task="finetune", model=dict(name=model, drop_path_rate=drop_path),
                      optim=dict(lr=1.25e-3, warmup_lr=2.5e-7, min_lr=2.5e-7, layer_decay=layer_decay),
                      schedule=dict(epochs=100, warmup_epochs=20, name="cosine"), augment=FINETUNE_AUGMENT), extra)


COSINE_100E = dict(epochs=100, warmup_epochs=10, name="cosine")
MULTISTEP_800E = dict(epochs=800, warmup_epochs=10, name="multistep", milestones=(700,), gamma=0.1)

PRESETS: dict[str, dict] = {
    "swin-base-pretrain-100e": _pretrain("simmim_pretrain__swin_base__img192_window6__100ep", 2e-4, 1e-6,
                                         COSINE_100E, 0.0, optim=dict(min_lr=1e-5)),
    "swin-base-pretrain-800e": _pretrain("simmim_pretrain__swin_base__img192_window6__800ep", 1e-4, 5e-7,
                                         MULTISTEP_800E, 0.0, optim=dict(min_lr=5e-6)),
    "swin-large-pretrain-800e": _pretrain("simmim_pretrain__swin_large__img192_window12__800ep", 1e-4, 5e-7,
                                          MULTISTEP_800E, 0.0, optim=dict(min_lr=5e-6)),
    "vit-base-pretrain-800e": _pretrain("simmim_pretrain__vit_base__img224__800ep", 1e-4, 5e-7,
                                        MULTISTEP_800E, 0.1, optim=dict(min_lr=5e-6)),
    "swin-base-finetune-192": _finetune("simmim_finetune__swin_base__img192_window6__100ep", 0.9, 0.1),
    "swin-base-finetune-224": _finetune("simmim_finetune__swin_base__img224_window7__100ep", 0.9, 0.1),
    "swin-base-800e-finetune-224": _finetune("simmim_finetune__swin_base__img224_window7__800ep", 0.8, 0.1),
    "swin-large-finetune-224": _finetune("simmim_finetune__swin_large__img224_window14__800ep", 0.7, 0.2),
    "vit-base-finetune-224": _finetune("simmim_finetune__vit_base__img224__800ep", 0.65, 0.1),
    # CPU-sized: the 64 px nano Swin on Fashion-MNIST; 16 px mask blocks are 1/4 of the side as 32 px
    # are 1/6 of 192 px, and the base lrs give ~1e-3 at batch 64
    "nano-pretrain": _pretrain("simmim_swin-nano_test-64px", 8e-3, 8e-5,
                               dict(epochs=5, warmup_epochs=1, name="cosine"), 0.0,
                               optim=dict(min_lr=8e-5), mask=dict(patch_size=16),
                               data=dict(path="fashion-mnist", batch_size=64), runtime=dict(log_every=50)),
    # the demo on Fashion-MNIST (`simmim demo`): 48 px, patch 4, window 6 and 8 px mask blocks keep the
    # paper's proportions (12x12 tokens, 6x6 mask blocks at ratio 0.6); lrs give ~1e-3 at these batches
    "fashion-mnist-pretrain": _pretrain("simmim_swin-micro-w6_fashion-mnist-48px", 4e-3, 4e-5,
                                        dict(epochs=3, warmup_epochs=1, name="cosine"), 0.0,
                                        optim=dict(min_lr=4e-5), mask=dict(patch_size=8),
                                        data=dict(path="fashion-mnist", batch_size=128), runtime=dict(log_every=50)),
    # 1,000 labelled 28 px images: crops, flips and label smoothing only, without the published fine-tuning
    # augmentation (RandAugment, random erasing, Mixup/CutMix), which is too strong here (docs/notes.md)
    "fashion-mnist-finetune": _finetune("swin-micro-w6_fashion-mnist-48px", 0.75, 0.1,
                                        optim=dict(lr=8e-3, warmup_lr=8e-6, min_lr=8e-6),
                                        schedule=dict(epochs=40, warmup_epochs=4),
                                        augment=dict(crop_scale=(0.6, 1.0), auto_augment=None, color_jitter=0.0,
                                                     reprob=0.0, mixup=0.0, cutmix=0.0),
                                        data=dict(path="fashion-mnist", batch_size=64, labels_per_class=100),
                                        runtime=dict(log_every=50, eval_every=10)),
    "nano-finetune": _finetune("swin-nano_test-64px", 0.9, 0.1, optim=dict(lr=1e-2, warmup_lr=1e-5, min_lr=1e-5),
                               schedule=dict(epochs=10, warmup_epochs=1),
                               data=dict(path="fashion-mnist", batch_size=64), runtime=dict(log_every=50)),
}


def preset(name: str) -> dict[str, Any]:
    """The plain data of a preset, or of `--preset <zoo model>`: that model with its recipe."""
    from .zoo import SPECS, get_spec

    if name in PRESETS:
        return merge(PRESETS[name], {"preset": name})
    try:
        spec = get_spec(name)
    except KeyError:
        close = difflib.get_close_matches(name, list(PRESETS) + [s.name for s in SPECS], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f" (presets: {', '.join(PRESETS)})"
        raise ValueError(f"unknown preset {name!r}{hint}") from None
    recipe = spec.recipe or next((p for p, d in PRESETS.items() if d["model"]["name"] == spec.name), None)
    if recipe is None:
        raise ValueError(f"model {spec.name} has no training recipe; pick one with --preset "
                         f"<{' | '.join(PRESETS)}> --set model.name={spec.name}")
    return merge(PRESETS[recipe], {"preset": name, "model": {"name": spec.name}})


def load_config(preset_name: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Resolves a config: `base` (e.g. a checkpoint's config) or the preset, then the YAML file (which
    may name its own `preset`), then dotted `key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    file_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            file_data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(file_data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(file_data).__name__}")
    name = preset_name or file_data.get("preset")
    if name:
        data = merge(data, preset(name))
    data = merge(data, file_data)
    if preset_name:
        data["preset"] = preset_name
    for text in overrides:
        data = merge(data, parse_override(text))
    return TrainConfig.from_dict(data)
