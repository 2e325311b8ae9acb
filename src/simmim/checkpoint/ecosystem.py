"""Files other libraries load as they are: an HF transformers directory (`config.json` +
`model.safetensors`, read by `AutoModel.from_pretrained`) and a timm state dict (read by timm's
Swin `checkpoint_filter_fn`, e.g. through `pretrained_cfg_overlay=dict(file=...)`).

The mmpretrain layout (`convert --to mmpretrain`) needs nothing here: it is already what
mmdetection/mmsegmentation load with `init_cfg=dict(type='Pretrained', prefix='backbone.')`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import BadArgument, UsageError
from ..fsutil import atomic_write_text
from ..models import Classifier, SimMIM, SwinTransformer, SwinTransformerV2
from .formats import HF, OFFICIAL, StateDict
from .io import atomic_save_safetensors

HF_ARCHITECTURES = {  # (generation, task) -> (model_type, architecture class)
    ("swin", "pretrain"): ("swin", "SwinForMaskedImageModeling"),
    ("swin", "classification"): ("swin", "SwinForImageClassification"),
    ("swinv2", "pretrain"): ("swinv2", "Swinv2ForMaskedImageModeling"),
    ("swinv2", "classification"): ("swinv2", "Swinv2ForImageClassification"),
}


def _task(model: nn.Module) -> str:
    if isinstance(model, SimMIM):
        return "pretrain"
    if isinstance(model, Classifier):
        return "classification"
    raise BadArgument(f"cannot export a {type(model).__name__}; expected a SimMIM or Classifier model")


def hf_config(model: nn.Module, classes: list[str] | None = None) -> dict:
    """The `config.json` of HF's SwinConfig / Swinv2Config for a Swin or SwinV2 model of ours."""
    task, encoder = _task(model), model.encoder
    if not isinstance(encoder, SwinTransformer):
        raise UsageError(f"HF export covers Swin and SwinV2; a {type(encoder).__name__} has no HF counterpart "
                         "(HF's ViT has absolute positions and no layer scale)")
    cfg = encoder.cfg
    if cfg.pad_small_map:
        raise UsageError("HF Swin clamps windows to small maps; a model with pad_small_map=True computes "
                         "otherwise and has no HF counterpart")
    if task == "pretrain" and model.decoder_kind != "linear":
        raise UsageError(f"HF's masked image modeling head is the linear decoder, not {model.decoder_kind!r}")
    if task == "classification" and model.fc_norm is not None:
        raise UsageError("HF Swin classifiers pool without fc_norm")
    generation = "swinv2" if isinstance(encoder, SwinTransformerV2) else "swin"
    grid = cfg.img_size // cfg.patch_size
    small = [i for i in range(len(cfg.depths)) if grid // 2**i < cfg.window_size]
    if generation == "swin" and small:  # there our table is the clamped window's, HF's the configured one's
        raise UsageError(f"stage {small[0] + 1}'s {grid // 2**small[0]}px map is smaller than window "
                         f"{cfg.window_size}: HF Swin cannot load it (each stage's map must be at least one window)")
    model_type, architecture = HF_ARCHITECTURES[generation, task]
    config = {
        "model_type": model_type, "architectures": [architecture],
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "embed_dim": cfg.embed_dim, "depths": list(cfg.depths), "num_heads": list(cfg.num_heads),
        "window_size": cfg.window_size, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias,
        "hidden_dropout_prob": cfg.drop_rate, "attention_probs_dropout_prob": cfg.attn_drop_rate,
        "drop_path_rate": cfg.drop_path_rate, "hidden_act": "gelu", "use_absolute_embeddings": cfg.ape,
        "layer_norm_eps": 1e-5, "encoder_stride": encoder.encoder_stride,
    }
    if generation == "swinv2":
        config["pretrained_window_sizes"] = list(cfg.pretrained_window_sizes or (0,) * len(cfg.depths))
    if task == "classification":
        names = classes or getattr(model, "classes", None) or [str(i) for i in range(model.num_classes)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    return config


def export_hf(model: nn.Module, out_dir: str | Path, classes: list[str] | None = None) -> Path:
    """Writes `config.json` and `model.safetensors` in HF's layout, for `from_pretrained(out_dir)`."""
    config = hf_config(model, classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in HF.from_ours(model.state_dict()).items()}
    atomic_save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    text = json.dumps(config, indent=2) + "\n"
    atomic_write_text(out / "config.json", text, "config")
    return out


def to_timm(state: StateDict) -> StateDict:
    """The official fine-tuning layout without the pretraining-only tensors (mask token, decoder):
    what timm's Swin / SwinV2 `checkpoint_filter_fn` reads (it moves the downsampling and the head)."""
    return OFFICIAL.from_ours({k: v for k, v in state.items()
                               if not k.startswith("decoder.") and k != "encoder.mask_token"})
