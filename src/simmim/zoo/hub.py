"""Models with their weights: zoo names with published or given weights (`sources.py` finds them),
and self-describing directories exported and loaded again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from ..checkpoint.io import atomic_save_safetensors
from ..checkpoint.transfer import load_weights
from ..errors import BadArgument, UsageError
from ..fsutil import atomic_write_text
from ..models import Classifier, FeatureMaps, SimMIM
from .registry import CLASSIFIER_KEYS, SIMMIM_KEYS, SPECS, arch_of, build_model, get_spec
from .runs import CONFIG_FILE, WEIGHTS_FILE, check_fits, is_exported, load_run
from .sources import HubFile, hub_download, parse_hub, published_weights, resolve


def model_config(model: nn.Module, name: str | None = None, classes: list[str] | None = None) -> dict:
    """Plain-data description from which `build_from_config` rebuilds the same architecture."""
    if not isinstance(model, SimMIM | Classifier):
        raise BadArgument(f"cannot describe a {type(model).__name__}; expected a SimMIM or Classifier model")
    encoder = dataclasses.asdict(model.encoder.cfg)
    config = {"name": name, "arch": arch_of(model.encoder.cfg), "encoder": encoder}
    if isinstance(model, SimMIM):
        config.update(task="pretrain", mask_patch_size=model.mask_generator.mask_patch_size,
                      mask_ratio=model.mask_generator.mask_ratio, loss=model.loss_kind, decoder=model.decoder_kind,
                      norm_target_window=model.norm_target_window)
    else:
        config.update(task="classification", num_classes=model.num_classes, classes=classes)
    return config


def build_from_config(config: dict) -> nn.Module:
    """Inverse of `model_config` (random weights)."""
    if not isinstance(config, dict) or not isinstance(config.get("encoder"), dict) or "task" not in config:
        raise UsageError("expected a mapping with 'task' and an 'encoder' mapping")
    spec = get_spec(config["name"]) if config.get("name") else None
    head = SIMMIM_KEYS if config["task"] == "pretrain" else CLASSIFIER_KEYS
    if spec is None:  # a model outside the zoo: any zoo entry of the same arch and task is a template
        spec = next((s for s in SPECS if (s.arch, s.task) == (config.get("arch"), config["task"])), None)
        if spec is None:
            raise UsageError(f"no zoo model of arch {config.get('arch')!r} and task {config['task']!r}")
    overrides = {k: v for k, v in config["encoder"].items() if k != "use_mask_token"}
    model = build_model(spec, **overrides, **{k: config[k] for k in head if config.get(k) is not None})
    if config.get("classes"):
        model.classes = list(config["classes"])
    return model


def export(model: nn.Module, out_dir: str | Path, name: str | None = None, classes: list[str] | None = None) -> Path:
    """Writes `model.safetensors` (our layout) and `config.json` to out_dir; `classes` defaults to
    the model's own class names (a fine-tuning run's, set by `load_run_model`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "simmim"})
    config = model_config(model, name, classes or getattr(model, "classes", None))
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n", "exported config")
    return out


def load_directory(path: str | Path, weights: str | Path | None = None, random_decoder: bool = False) -> nn.Module:
    """A model exported with `export`; `weights` loads another checkpoint into its architecture."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an exported model: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_file.read_text())
        model = build_from_config(config)
    except (json.JSONDecodeError, UsageError) as err:
        raise UsageError(f"{config_file}: not a simmim model config ({err})") from None
    if weights:
        _load_pretrained(model, config.get("name") or str(path), weights, random_decoder)
    else:
        load_weights(model, path / WEIGHTS_FILE)
    return model


def get_model(name: str | Path, pretrained: bool | str | Path = False, features_only: bool = False,
              out_indices: tuple[int, ...] | None = None, random_decoder: bool = False, **overrides) -> nn.Module:
    """A zoo model by name (case-insensitive), or a model that carries its architecture and weights: an
    exported directory (on disk or on the Hub, `hf-hub:ORG/NAME[@REVISION]`), a training run's folder
    (its newest checkpoint) or a training checkpoint; in eval mode. For a zoo name, pretrained=True
    downloads the published weights (cached); any other weights source (`sources.py`: a checkpoint file
    or folder of any supported format, official, mmpretrain, HF or ours, a zoo name, `hf-hub:...`) is
    loaded, adapting windows as needed; an encoder-only file is refused for a pretraining model (its
    reconstructions would come from a random decoder) unless `random_decoder`. features_only=True
    returns its encoder as `FeatureMaps`: a list of NCHW maps, one per stage (or ViT block) in
    `out_indices` (all when None)."""
    if out_indices is not None and not features_only:
        raise BadArgument("out_indices applies only with features_only=True")
    weights = None if isinstance(pretrained, bool) else pretrained
    hub = parse_hub(str(name))
    if hub is not None and not overrides:
        model = load_directory(hub_directory(hub), weights, random_decoder)
    elif is_exported(name) and not overrides:  # its architecture, with its own weights or `pretrained`
        model = load_directory(name, weights, random_decoder)
    elif Path(name).exists():
        if weights or overrides:
            raise UsageError(f"{name} carries its own architecture and weights: pass it without pretrained= "
                             "or model settings")
        model = _run_model(name)
    else:
        model = _zoo_model(str(name), pretrained, random_decoder, **overrides)
    return (FeatureMaps(model.encoder, out_indices) if features_only else model).eval()


def hub_directory(hub: HubFile) -> Path:
    """The local snapshot of an exported directory on the Hub (its config.json and weights)."""
    if hub.filename:
        raise UsageError(f"{hub}: a model on the Hub is a repository with {CONFIG_FILE} and {WEIGHTS_FILE}, not a "
                         f"file; load a file as weights: get_model(NAME, pretrained='{hub}') or --weights")
    config = hub_download(dataclasses.replace(hub, filename=CONFIG_FILE))
    if "arch" not in json.loads(config.read_text()):  # HF's config.json: no simmim architecture to build
        raise UsageError(f"{hub}: not a folder that `simmim export` wrote (an HF transformers repository?); name "
                         f"its architecture: get_model(NAME, pretrained='{hub}'), or --model NAME / MODEL --weights")
    hub_download(dataclasses.replace(hub, filename=WEIGHTS_FILE))
    return config.parent


def _run_model(path: str | Path) -> nn.Module:
    found = load_run(path)
    if found is None:
        raise UsageError(f"{path} is not a simmim training checkpoint, a training run's folder or an exported folder "
                         f"({CONFIG_FILE} + {WEIGHTS_FILE}); for a published checkpoint name its zoo architecture and "
                         "pass the file as its weights (--model, or --weights after a zoo name)")
    return found[0]


def _zoo_model(name: str, pretrained: bool | str | Path, random_decoder: bool = False, **overrides) -> nn.Module:
    spec = get_spec(str(name))
    model = build_model(spec, **overrides)
    if pretrained:
        source = published_weights(spec.name) if pretrained is True else pretrained
        _load_pretrained(model, spec.name, source, random_decoder)
    return model


def _load_pretrained(model: nn.Module, name: str, source: str | Path, random_decoder: bool) -> None:
    """Loads a checkpoint of any supported format (a run folder: its newest) into `model` (called `name`),
    refusing one that names another architecture, and for a pretraining model one without a decoder."""
    source = resolve(source)
    check_fits(source, model, name, "name {name} instead, or pass the source alone (it names its own architecture)")
    report = load_weights(model, source)
    if not random_decoder and any(k.startswith("decoder.") for k in report.initialized):
        raise UsageError(f"{source} holds no decoder for {name} (an encoder-only file): its reconstructions would "
                         "come from random decoder weights; continue pretraining from it (simmim pretrain "
                         "--pretrained), or pass random_decoder=True (simmim reconstruct --random-decoder) to see "
                         "them anyway")
    print(f"{name}: {report.summary()}")
