"""Typed training configs: YAML, dotted overrides, errors, round trips and the published recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from simmim.config import PRESETS, TrainConfig, all_keys, load_config, parse_override
from simmim.zoo import SPECS, get_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_yaml_file_with_preset_and_strings_that_pyyaml_leaves_as_text(tmp_path):
    path = tmp_path / "run.yaml"
    # PyYAML reads 1e-4 (no dot) as a string; the field type turns it into a float
    path.write_text("preset: nano-pretrain\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\nschedule:\n  epochs: 3\n")
    cfg = load_config(path=path)
    assert cfg.preset == "nano-pretrain" and cfg.model.name == "simmim_swin-nano_test-64px"
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.schedule.epochs == 3
    assert cfg.mask.patch_size == 16  # from the preset, untouched by the file


def test_overrides_are_converted_by_field_type():
    cfg = load_config("nano-pretrain", overrides=[
        "optim.lr=3e-4", "schedule.epochs=7", "runtime.compile=true", "optim.betas=0.8,0.9",
        "schedule.milestones=[2, 5]", "optim.clip_grad=none", "data.num_workers=0", "augment.auto_augment=rand-m9",
        "model.drop_path_rate=0.2",
    ])
    assert (cfg.optim.lr, cfg.schedule.epochs, cfg.runtime.compile) == (3e-4, 7, True)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.schedule.milestones == (2, 5)
    assert cfg.optim.clip_grad is None and cfg.data.num_workers == 0
    assert cfg.augment.auto_augment == "rand-m9" and cfg.model.drop_path_rate == 0.2


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1e-4", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("shedule.epochs=3", "did you mean 'schedule.epochs'?"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("schedule.epochs=2.5", "schedule.epochs: expected an integer, got '2.5'"),
    ("runtime.compile=maybe", "runtime.compile: expected true/false, got 'maybe'"),
    ("optim.betas=0.9", "optim.betas: expected 2 values"),
    ("mask.ratio=1.5", "mask.ratio: expected a fraction in (0, 1), got 1.5"),
    ("runtime.precision=fp8", "runtime.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'"),
    ("optim=1", "'optim' is a section"),
    ("optim.lr", "expected KEY=VALUE"),
    ("model.name=swin-nano_test-64px", "is a classification model; a pretrain run needs a pretraining model"),
])
def test_errors_are_one_line_and_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_config("nano-pretrain", overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_a_file_is_reported_with_its_dotted_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: nano-finetune\naugment:\n  mixupp: 0.5\n")
    with pytest.raises(ValueError, match=r"'augment.mixupp'; did you mean 'augment.mixup'\?"):
        load_config(path=path)


def test_round_trip_through_plain_data_and_yaml(tmp_path):
    cfg = load_config("swin-large-finetune-224", overrides=["optim.accumulation_steps=4", "model.num_classes=100"])
    data = cfg.to_dict()
    assert isinstance(data["optim"]["betas"], list)  # plain data: no tuples
    assert TrainConfig.from_dict(data) == cfg
    assert load_config(path=cfg.save(tmp_path / "config.yaml")) == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == data
    assert {k.split(".")[0] for k in all_keys() if "." in k} == {
        "model", "data", "optim", "schedule", "mask", "augment", "runtime", "checkpoint", "eval"}


def test_override_paths_nest():
    assert parse_override("optim.lr=1e-4") == {"optim": {"lr": "1e-4"}}
    assert parse_override("data.path=/a=b") == {"data": {"path": "/a=b"}}


def test_pretraining_presets_reproduce_the_official_recipes():
    b100 = load_config("swin-base-pretrain-100e")
    assert (b100.optim.lr, b100.optim.warmup_lr, b100.optim.min_lr) == (2e-4, 1e-6, 1e-5)
    assert (b100.schedule.name, b100.schedule.epochs, b100.schedule.warmup_epochs) == ("cosine", 100, 10)
    assert (b100.optim.weight_decay, b100.optim.betas, b100.optim.eps, b100.optim.clip_grad) == (
        0.05, (0.9, 0.999), 1e-8, 5.0)
    assert (b100.mask.patch_size, b100.mask.ratio, b100.optim.lr_batch) == (32, 0.6, 512)
    assert b100.augment.crop_scale == (0.67, 1.0) and b100.augment.crop_ratio == (3 / 4, 4 / 3)
    assert b100.augment.mixup == 0 and b100.augment.auto_augment is None and b100.augment.reprob == 0
    for name in ("swin-base-pretrain-800e", "swin-large-pretrain-800e", "vit-base-pretrain-800e"):
        cfg = load_config(name)
        assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.schedule.name) == (1e-4, 5e-7, "multistep")
        assert (cfg.schedule.epochs, cfg.schedule.milestones, cfg.schedule.gamma) == (800, (700,), 0.1)
    assert load_config("vit-base-pretrain-800e").model.drop_path_rate == 0.1


@pytest.mark.parametrize(("name", "layer_decay", "drop_path"), [
    ("swin-base-finetune-192", 0.9, 0.1), ("swin-base-finetune-224", 0.9, 0.1),
    ("swin-base-800e-finetune-224", 0.8, 0.1), ("swin-large-finetune-224", 0.7, 0.2),
    ("vit-base-finetune-224", 0.65, 0.1),
])
def test_finetuning_presets_reproduce_the_official_recipes(name, layer_decay, drop_path):
    cfg = load_config(name)
    assert cfg.task == "finetune" and get_spec(cfg.model.name).task == "classification"
    assert (cfg.optim.layer_decay, cfg.model.drop_path_rate) == (layer_decay, drop_path)
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.min_lr) == (1.25e-3, 2.5e-7, 2.5e-7)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.name) == (100, 20, "cosine")
    a = cfg.augment
    assert (a.auto_augment, a.reprob, a.remode, a.recount, a.interpolation) == (
        "rand-m9-mstd0.5-inc1", 0.25, "pixel", 1, "bicubic")
    assert (a.mixup, a.cutmix, a.switch_prob, a.mixup_prob, a.label_smoothing) == (0.8, 1.0, 0.5, 1.0, 0.1)


def test_every_zoo_recipe_is_a_preset_and_zoo_names_resolve_to_model_plus_recipe():
    assert {s.recipe for s in SPECS if s.recipe} <= set(PRESETS)
    spec = get_spec("swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px")
    cfg = load_config(spec.name)
    assert cfg.model.name == spec.name and cfg.preset == spec.name
    assert cfg.optim.layer_decay == load_config(spec.recipe).optim.layer_decay
    assert load_config("swin-nano_test-64px").optim == load_config("nano-finetune").optim
    with pytest.raises(ValueError, match="has no training recipe"):
        load_config("simmim_swin-tiny-w6_in1k-192px")
    with pytest.raises(ValueError, match="unknown preset 'nano-pretrian'; did you mean 'nano-pretrain'"):
        load_config("nano-pretrian")


def test_mixup_needs_an_even_batch():
    with pytest.raises(ValueError, match="data.batch_size: expected an even size with mixup/cutmix, got 7"):
        load_config("nano-finetune", overrides=["data.batch_size=7"])
    assert load_config("nano-finetune", overrides=["data.batch_size=7", "augment.mixup=0", "augment.cutmix=0"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    assert load_config(path=path).task in ("pretrain", "finetune")


@pytest.mark.parametrize(("preset", "override", "task"), [
    ("nano-pretrain", "augment.mixup=0.8", "fine-tuning"),
    ("nano-pretrain", "data.labels_per_class=10", "fine-tuning"),
    ("nano-pretrain", "model.num_classes=5", "fine-tuning"),
    ("nano-pretrain", "runtime.eval_every=2", "fine-tuning"),
    ("nano-finetune", "mask.ratio=0.5", "pretraining"),
    ("nano-finetune", "eval.knn_every=1", "pretraining"),
    ("nano-finetune", "model.decoder=mlp", "pretraining"),
])
def test_a_key_the_task_does_not_read_is_refused_by_name(preset, override, task):
    key = override.partition("=")[0]
    with pytest.raises(ValueError) as err:
        load_config(preset, overrides=[override])
    assert str(err.value).startswith(f"{key}: read by {task} runs only") and "\n" not in str(err.value)


def test_a_task_only_key_in_a_yaml_file_is_refused_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: nano-pretrain\naugment:\n  label_smoothing: 0.1\n")
    with pytest.raises(ValueError, match=r"^augment\.label_smoothing: read by fine-tuning runs only"):
        load_config(path=path)


def test_keys_of_both_tasks_and_other_task_keys_at_their_defaults_pass():
    both = ["optim.lr=1e-3", "data.max_images=8", "model.pretrained=some.pt", "augment.hflip=0.2",
            "model.drop_path_rate=0.05", "schedule.epochs=3"]
    pre = load_config("nano-pretrain", overrides=[*both, "mask.ratio=0.5", "augment.mixup=0"])
    tuned = load_config("nano-finetune", overrides=[*both, "augment.mixup=0.2", "mask.ratio=0.6"])
    assert (pre.mask.ratio, tuned.augment.mixup, tuned.model.pretrained) == (0.5, 0.2, "some.pt")


def test_every_preset_sets_only_keys_its_task_reads():
    from simmim.config.schema import ignored_keys

    for name in PRESETS:
        cfg = load_config(name)
        assert ignored_keys(cfg, all_keys()) == [], name


def test_shortened_epochs_shorten_a_warmup_that_no_longer_fits(capsys):
    cfg = load_config("fashion-mnist-finetune", overrides=["schedule.epochs=1"])  # the recipe: 4 of 40 epochs
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (1, 0.1)
    note = capsys.readouterr().err
    assert "schedule.warmup_epochs 4 -> 0.1" in note and note.count("\n") == 1
    # a warm-up the user sets is kept, and a wrong one is named against the epochs, not as a fraction
    with pytest.raises(ValueError, match=r"schedule.warmup_epochs: expected at least 0 and at most "
                                         r"schedule.epochs=1, got 2\.0"):
        load_config("fashion-mnist-finetune", overrides=["schedule.epochs=1", "schedule.warmup_epochs=2"])
    assert load_config("fashion-mnist-finetune", overrides=["schedule.epochs=10"]).schedule.warmup_epochs == 4


def test_turning_off_what_the_task_does_not_do_passes():
    # a shared list of quiet overrides: fine-tuning draws no reconstruction grids, measures no held-out loss
    cfg = load_config("nano-finetune", overrides=["runtime.vis_every=0", "data.heldout_images=0"])
    assert cfg.runtime.vis_every == 0
    with pytest.raises(ValueError, match=r"^runtime\.vis_every: read by pretraining runs only"):
        load_config("nano-finetune", overrides=["runtime.vis_every=5"])


def test_overrides_for_several_runs_reach_the_runs_whose_task_reads_them():
    from simmim.config import task_overrides

    shared = ["mask.ratio=0.5", "data.labels_per_class=3", "optim.lr=1e-3", "data.heldout_images=16"]
    assert task_overrides(shared, "finetune") == ["data.labels_per_class=3", "optim.lr=1e-3"]
    assert task_overrides(shared, "pretrain") == ["mask.ratio=0.5", "optim.lr=1e-3", "data.heldout_images=16"]
    load_config("nano-finetune", overrides=task_overrides(shared, "finetune"))
