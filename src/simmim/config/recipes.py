"""Named recipes: the published ones (microsoft/SimMIM configs, see REFERENCE 1.5/1.6) and small CPU
ones, as plain data that `load_config` resolves."""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import UnknownName, UsageError
from .values import merge

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
    # SwinV2-B fine-tuning of the "On Data Scaling in MIM" releases: their 224 px / window 14 model and
    # layer decay 0.75; the other settings are the SimMIM fine-tuning recipe above
    "swinv2-base-finetune-224": _finetune("swinv2-base-w14_simmim-500k-pre_in1k-224px", 0.75, 0.1),
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
    from ..zoo import SPECS, get_spec

    if name in PRESETS:
        return merge(PRESETS[name], {"preset": name})
    try:
        spec = get_spec(name)
    except UnknownName:
        close = difflib.get_close_matches(name, list(PRESETS) + [s.name for s in SPECS], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f" (presets: {', '.join(PRESETS)})"
        raise UnknownName(f"unknown preset {name!r}{hint}") from None
    recipe = spec.recipe or next((p for p, d in PRESETS.items() if d["model"]["name"] == spec.name), None)
    if recipe is None:
        raise UsageError(f"model {spec.name} has no training recipe; pick one with --preset "
                         f"<{' | '.join(PRESETS)}> --set model.name={spec.name}")
    return merge(PRESETS[recipe], {"preset": name, "model": {"name": spec.name}})


def source_recipe(source: str, task: str) -> dict[str, Any]:
    """The plain data of a run of `task` ('pretrain' or 'finetune') on the architecture that `source` (a
    run folder, training checkpoint or exported folder) names: its zoo model of that task with the
    model's recipe; a pretraining source's resolution and windows carry over to a pretraining run."""
    from ..zoo.runs import architecture_of

    found = architecture_of(source)
    if found is None:
        raise UsageError(f"{source} does not name its architecture (a published or foreign checkpoint): pass "
                         f"--preset NAME (presets: {', '.join(PRESETS)})")
    spec = found.counterpart("pretrain" if task == "pretrain" else "classification")
    if spec is None:
        raise UsageError(f"{source} is {found.describe()}, and the zoo has no {task} model of its sizes: pass --preset")
    data = preset(spec.name)
    if task == "pretrain" and found.task == "pretrain":
        data = merge(data, {"model": found.settings})
    return data
