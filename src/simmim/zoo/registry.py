"""The model zoo: published names, how to build each model, and the figures published for it.

The names and figures need no torch (`simmim models` and `--help` start without it); the model
classes are imported when a model is built."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from ..errors import BadArgument, UnknownName

if TYPE_CHECKING:
    from torch import nn

    from ..models import SwinConfig, ViTConfig

MMPRETRAIN_URL = "https://download.openmmlab.com/mmselfsup/1.x/simmim/"

SWIN_SIZES = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # test- and demo-sized; not published
    "micro": dict(embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8)),
    "nano": dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 6)),
}
# SwinV2 (Liu et al., 2022, Table 1; "On Data Scaling in MIM" for giant, the SimMIM release's 1.06B model);
# SwinV2-G is the Swin V2 paper's 3B model, not released
SWINV2_SIZES = {
    **SWIN_SIZES,
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
    "giant": dict(embed_dim=448, depths=(2, 2, 18, 2), num_heads=(14, 28, 56, 112)),
    "G": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128)),
}
VIT_PRETRAIN = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_mean_pooling=False)
VIT_FINETUNE = dict(use_shared_rel_pos_bias=False, use_rel_pos_bias=True, use_mean_pooling=True)

SIMMIM_KEYS = ("mask_patch_size", "mask_ratio", "loss", "decoder", "norm_target_window")
CLASSIFIER_KEYS = ("num_classes",)
# published FLOPs of pretraining models are those of the backbone at 224 px (mmpretrain's default)
PRETRAIN_FLOPS_SIZE = 224


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its architecture, resolution, recipe and published figures."""

    name: str
    task: str
    """"pretrain" (SimMIM: encoder + decoder) or "classification" (encoder + head)."""
    arch: str
    """A key of archs(): "swin", "swinv2" or "vit"."""
    encoder: dict
    """Encoder config fields (SwinConfig / SwinV2Config / ViTConfig)."""
    num_classes: int = 1000
    test_size: int | None = None
    """Evaluation crop of a classifier; pretraining models have none."""
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    norm_target_window: int = 0
    """Pretraining target: 0 the pixels, else the normalized target over windows of this size."""
    recipe: str | None = None
    """Training preset that reproduces the model."""
    published_params: int | None = None
    published_flops: int | None = None
    published_size: str | None = None
    """Parameter count as a release rounds it ("655M", "1.06B") where no exact count is published."""
    top1: float | None = None
    weights: str | None = None
    """URL of the released weights, None where none is downloadable."""
    hub: str | None = None
    """Hugging Face Hub repository (ORG/NAME) that holds the weights, converted to HF's layout;
    `pretrained=True` reads it (through huggingface_hub) where there is no URL."""
    source: str = "mmpretrain"
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def img_size(self) -> int:
        return self.encoder["img_size"]

    @property
    def flops_size(self) -> int:
        """Resolution of the published-style FLOPs: the test crop, or for pretraining models with
        published figures 224 px (mmpretrain's default); otherwise the training resolution."""
        return self.test_size or (PRETRAIN_FLOPS_SIZE if self.published_flops else self.img_size)


def _swin(size: str, img: int, window: int, **extra) -> dict:
    return dict(SWIN_SIZES[size], img_size=img, window_size=window, **extra)


def _swinv2(size: str, img: int, window: int, **extra) -> dict:
    return dict(SWINV2_SIZES[size], img_size=img, window_size=window, **extra)


def _vit(img: int = 224, **extra) -> dict:
    return dict(img_size=img, patch_size=16, embed_dim=768, depth=12, num_heads=12, **extra)


MMPRE_B100 = MMPRETRAIN_URL + "simmim_swin-base_8xb256-amp-coslr-100e_in1k-192/"
MMPRE_B800 = MMPRETRAIN_URL + "simmim_swin-base_16xb128-amp-coslr-800e_in1k-192/"
MMPRE_L800 = MMPRETRAIN_URL + "simmim_swin-large_16xb128-amp-coslr-800e_in1k-192/"
OFFICIAL_NOTE = "official microsoft/SimMIM release, on Google Drive only: download the file and load it"
# converted by HF (convert_swin_simmim_to_pytorch.py, decoder included) from the official file; the
# converter's default is the 100-epoch base file, the large repository's epochs are not stated
HUB_NOTE = "official microsoft/SimMIM release (Google Drive); HF's conversion, decoder included, is on the Hub"

SPECS: tuple[ModelSpec, ...] = (
    # mmpretrain's metafile (configs/simmim/metafile.yml)
    ModelSpec("simmim_swin-base-w6_8xb256-amp-coslr-100e_in1k-192px", "pretrain", "swin",
              _swin("base", 192, 6, drop_path_rate=0.0), recipe="swin-base-pretrain-100e",
              published_params=89_874_104, published_flops=18_832_161_792,
              weights=MMPRE_B100 + "simmim_swin-base_8xb256-amp-coslr-100e_in1k-192_20220829-0e15782d.pth"),
    ModelSpec("simmim_swin-base-w6_16xb128-amp-coslr-800e_in1k-192px", "pretrain", "swin",
              _swin("base", 192, 6, drop_path_rate=0.0), recipe="swin-base-pretrain-800e",
              published_params=89_874_104, published_flops=18_832_161_792,
              weights=MMPRE_B800 + "simmim_swin-base_16xb128-amp-coslr-800e_in1k-192_20220916-a0e931ac.pth"),
    ModelSpec("simmim_swin-large-w12_16xb128-amp-coslr-800e_in1k-192px", "pretrain", "swin",
              _swin("large", 192, 12, drop_path_rate=0.0, pad_small_map=True), recipe="swin-large-pretrain-800e",
              published_params=199_920_372, published_flops=55_849_130_496,
              weights=MMPRE_L800 + "simmim_swin-large_16xb128-amp-coslr-800e_in1k-192_20220916-4ad216d3.pth",
              notes="pad_small_map: stage 4 keeps window 12 on its 6x6 map"),
    ModelSpec("swin-base-w6_simmim-100e-pre_8xb256-coslr-100e_in1k-192px", "classification", "swin",
              _swin("base", 192, 6, drop_path_rate=0.1), test_size=192, recipe="swin-base-finetune-192",
              published_params=87_750_176, published_flops=11_303_976_960, top1=82.7,
              weights=MMPRE_B100 + "swin-base_ft-8xb256-coslr-100e_in1k/"
              "swin-base_ft-8xb256-coslr-100e_in1k_20220829-9cf23aa1.pth"),
    ModelSpec("swin-base-w7_simmim-100e-pre_8xb256-coslr-100e_in1k", "classification", "swin",
              _swin("base", 224, 7, drop_path_rate=0.1), test_size=224, recipe="swin-base-finetune-224",
              published_params=87_768_224, published_flops=15_466_852_352, top1=83.5),
    ModelSpec("swin-base-w6_simmim-800e-pre_8xb256-coslr-100e_in1k-192px", "classification", "swin",
              _swin("base", 224, 7, drop_path_rate=0.1), test_size=224, recipe="swin-base-finetune-224",
              published_params=87_768_224, published_flops=15_466_852_352, top1=83.8,
              weights=MMPRE_B800 + "swin-base_ft-8xb256-coslr-100e_in1k-224/"
              "swin-base_ft-8xb256-coslr-100e_in1k-224_20221208-155cc6e6.pth",
              notes="despite its name a 224 px, window 7 model: its config, figures and weights are 224/w7"),
    ModelSpec("swin-large-w14_simmim-800e-pre_8xb256-coslr-100e_in1k", "classification", "swin",
              _swin("large", 224, 14, drop_path_rate=0.2, pad_small_map=True), test_size=224,
              recipe="swin-large-finetune-224", published_params=196_848_316, published_flops=38_853_083_136,
              top1=84.8, weights=MMPRE_L800 + "swin-large_ft-8xb256-coslr-ws14-100e_in1k-224/"
              "swin-large_ft-8xb256-coslr-ws14-100e_in1k-224_20220916-d4865790.pth",
              notes="pad_small_map: stage 4 keeps window 14 on its 7x7 map"),
    # the official microsoft/SimMIM release
    ModelSpec("simmim_pretrain__swin_base__img192_window6__100ep", "pretrain", "swin",
              _swin("base", 192, 6, drop_path_rate=0.0), recipe="swin-base-pretrain-100e", source="official",
              hub="microsoft/swin-base-simmim-window6-192", notes=HUB_NOTE),
    ModelSpec("simmim_finetune__swin_base__img192_window6__100ep", "classification", "swin",
              _swin("base", 192, 6, drop_path_rate=0.1), test_size=192, recipe="swin-base-finetune-192",
              top1=82.8, source="official", notes=OFFICIAL_NOTE),
    ModelSpec("simmim_finetune__swin_base__img224_window7__100ep", "classification", "swin",
              _swin("base", 224, 7, drop_path_rate=0.1), test_size=224, recipe="swin-base-finetune-224",
              top1=83.5, source="official", notes=OFFICIAL_NOTE),
    ModelSpec("simmim_pretrain__swin_base__img192_window6__800ep", "pretrain", "swin",
              _swin("base", 192, 6, drop_path_rate=0.0), recipe="swin-base-pretrain-800e", source="official",
              notes=OFFICIAL_NOTE),
    ModelSpec("simmim_finetune__swin_base__img224_window7__800ep", "classification", "swin",
              _swin("base", 224, 7, drop_path_rate=0.1), test_size=224, recipe="swin-base-800e-finetune-224",
              top1=84.0, source="official", notes=OFFICIAL_NOTE),
    ModelSpec("simmim_pretrain__swin_large__img192_window12__800ep", "pretrain", "swin",
              _swin("large", 192, 12, drop_path_rate=0.0), recipe="swin-large-pretrain-800e", source="official",
              hub="microsoft/swin-large-simmim-window12-192", notes=HUB_NOTE + "; stage 4 clamps the window to 6"),
    ModelSpec("simmim_finetune__swin_large__img224_window14__800ep", "classification", "swin",
              _swin("large", 224, 14, drop_path_rate=0.2), test_size=224, recipe="swin-large-finetune-224",
              top1=85.4, source="official", notes=OFFICIAL_NOTE + "; stage 4 clamps the window to 7"),
    ModelSpec("simmim_pretrain__vit_base__img224__800ep", "pretrain", "vit",
              _vit(224, drop_path_rate=0.1, **VIT_PRETRAIN), recipe="vit-base-pretrain-800e", source="official",
              notes=OFFICIAL_NOTE),
    ModelSpec("simmim_finetune__vit_base__img224__800ep", "classification", "vit",
              _vit(224, drop_path_rate=0.1, **VIT_FINETUNE), test_size=224, recipe="vit-base-finetune-224",
              top1=83.8, source="official", notes=OFFICIAL_NOTE),
    # unpublished sizes, for benchmarks and small machines
    ModelSpec("simmim_swin-tiny-w6_in1k-192px", "pretrain", "swin", _swin("tiny", 192, 6, drop_path_rate=0.0),
              source="simmim", notes="Swin-T with the Swin-B pretraining recipe"),
    ModelSpec("simmim_swin-small-w6_in1k-192px", "pretrain", "swin", _swin("small", 192, 6, drop_path_rate=0.0),
              source="simmim", notes="Swin-S with the Swin-B pretraining recipe"),
    # the demo's model for Fashion-MNIST: three stages, 48 px, 8 px mask blocks (the paper's proportions)
    ModelSpec("simmim_swin-micro-w6_fashion-mnist-48px", "pretrain", "swin", _swin("micro", 48, 6, drop_path_rate=0.0),
              mask_patch_size=8, recipe="fashion-mnist-pretrain", source="simmim",
              notes="the demo's pretraining model (`simmim demo`)"),
    ModelSpec("swin-micro-w6_fashion-mnist-48px", "classification", "swin", _swin("micro", 48, 6, drop_path_rate=0.1),
              test_size=48, num_classes=10, recipe="fashion-mnist-finetune", source="simmim",
              notes="the demo's classifier (`simmim demo`)"),
    # tiny variants for tests: same code paths, seconds on a CPU
    ModelSpec("simmim_swin-nano_test-64px", "pretrain", "swin", _swin("nano", 64, 4, drop_path_rate=0.0),
              source="simmim", notes="test-sized"),
    ModelSpec("swin-nano_test-64px", "classification", "swin", _swin("nano", 64, 4, drop_path_rate=0.1),
              test_size=64, num_classes=10, source="simmim", notes="test-sized"),
    ModelSpec("simmim_vit-nano_test-64px", "pretrain", "vit",
              dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.1,
                   **VIT_PRETRAIN), source="simmim", notes="test-sized"),
    ModelSpec("vit-nano_test-64px", "classification", "vit",
              dict(img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3, drop_path_rate=0.1,
                   **VIT_FINETUNE), test_size=64, num_classes=10, source="simmim", notes="test-sized"),
)
# SimMIM SwinV2 releases of "On Data Scaling in Masked Image Modeling" (Swin-Transformer MODELHUB_simmim.md),
# the 500k-iteration models on full ImageNet-1K/22K: (size, data, backbone size, validation loss, fine-tuned top-1)
NORM_TARGET_WINDOW = 47  # the releases' NORM_TARGET.PATCH_SIZE
SWINV2_URL = "https://msravcghub.blob.core.windows.net/simmim-release/swinv2/pretrain/"
SWINV2_RELEASES = (
    ("small", "1k", "49M", 0.4641, 84.08), ("base", "1k", "87M", 0.4588, 85.04),
    ("base", "22k", "87M", 0.4614, 85.11), ("large", "1k", "195M", 0.4507, 85.91),
    ("large", "22k", "195M", 0.4536, 85.81), ("huge", "1k", "655M", 0.4416, 86.34),
    ("huge", "22k", "655M", 0.4444, 86.27), ("giant", "1k", "1.06B", 0.4395, 86.46),
    ("giant", "22k", "1.06B", 0.4416, 86.53),
)
SWINV2_NOTE = ("trained with SimMIM's normalized target (47 px windows), as here; "
               "192 px, window 12 and drop path 0.1 as the official SwinV2-B SimMIM config; Azure links may be down "
               "(microsoft/Swin-Transformer#361)")
SPECS += tuple(
    ModelSpec(f"swinv2_{size}_{data}_500k", "pretrain", "swinv2", _swinv2(size, 192, 12, drop_path_rate=0.1),
              published_size=params, norm_target_window=NORM_TARGET_WINDOW,
              weights=f"{SWINV2_URL}swinv2_{size}_{data}_500k.pth", source="official",
              notes=f"ImageNet-{data.upper()}, 500k iterations: validation loss {loss}, fine-tuned top-1 {top1}; "
                    + SWINV2_NOTE)
    for size, data, params, loss, top1 in SWINV2_RELEASES
) + (
    # paper sizes without a SimMIM release
    ModelSpec("simmim_swinv2-tiny-w12_in1k-192px", "pretrain", "swinv2", _swinv2("tiny", 192, 12, drop_path_rate=0.1),
              source="simmim", notes="SwinV2-T with the SwinV2-B SimMIM recipe"),
    ModelSpec("simmim_swinv2-G-w12_in22k-ext-192px", "pretrain", "swinv2",
              _swinv2("G", 192, 12, drop_path_rate=0.2, extra_norm_period=6), published_size="3.0B",
              source="paper", notes="the Swin V2 paper's 3B SwinV2-G (not released), with its extra LayerNorm on the "
                                    "main branch every 6 blocks"),
    # fine-tuning of the releases (Swin-Transformer configs/simmim): 224 px with window 14, the log-spaced
    # position coordinates normalised by the pretraining windows 12,12,12,6 (stage 4's 6x6 map at 192 px)
    ModelSpec("swinv2-base-w14_simmim-500k-pre_in1k-224px", "classification", "swinv2",
              _swinv2("base", 224, 14, drop_path_rate=0.1, pretrained_window_sizes=(12, 12, 12, 6)),
              test_size=224, recipe="swinv2-base-finetune-224", source="official",
              notes="fine-tunes swinv2_base_1k_500k / swinv2_base_22k_500k (their notes give the published top-1)"),
    ModelSpec("simmim_swinv2-nano_test-64px", "pretrain", "swinv2", _swinv2("nano", 64, 4, drop_path_rate=0.0),
              source="simmim", notes="test-sized"),
    ModelSpec("swinv2-nano_test-64px", "classification", "swinv2", _swinv2("nano", 64, 4, drop_path_rate=0.1),
              test_size=64, num_classes=10, source="simmim", notes="test-sized"),
)
_BY_NAME = {spec.name.lower(): spec for spec in SPECS}


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Names matching a case-insensitive wildcard (a trailing `*` is implied, as in mmpretrain)."""
    pattern = pattern.lower() if pattern.endswith("*") else pattern.lower() + "*"
    return [s.name for s in SPECS if fnmatch.fnmatchcase(s.name.lower(), pattern) and task in (None, s.task)]


def get_spec(name: str) -> ModelSpec:
    """The spec of a published name (case-insensitive); unknown names suggest the closest ones."""
    spec = _BY_NAME.get(name.lower())
    if spec is None:
        close = difflib.get_close_matches(name.lower(), _BY_NAME, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(_BY_NAME[c].name for c in close)}?" if close else ""
        raise UnknownName(f"unknown model {name!r}{hint} (`simmim models` lists them)")
    return spec


@dataclass(frozen=True)
class Arch:
    """An encoder architecture: its config class and its module."""

    config: type
    encoder: type[nn.Module]


@cache
def archs() -> dict[str, Arch]:
    """The architectures by the names specs use ("swin", "swinv2", "vit")."""
    from ..models import SwinConfig, SwinTransformer, SwinTransformerV2, SwinV2Config, VisionTransformer, ViTConfig

    return {"swin": Arch(SwinConfig, SwinTransformer), "swinv2": Arch(SwinV2Config, SwinTransformerV2),
            "vit": Arch(ViTConfig, VisionTransformer)}


def arch_of(cfg: object) -> str:
    """The archs() key of an encoder config."""
    return next(name for name, arch in archs().items() if type(cfg) is arch.config)


def encoder_config(spec: ModelSpec, **overrides) -> SwinConfig | ViTConfig:
    return archs()[spec.arch].config(**{**spec.encoder, "use_mask_token": spec.task == "pretrain", **overrides})


def build_model(spec: ModelSpec, **overrides) -> nn.Module:
    """Builds the model of a spec with random weights. Overrides take the usual names: any encoder
    field (img_size, embed_dim, depths, num_heads, window_size, pad_small_map, drop_path_rate, ...),
    num_classes for classifiers, mask_patch_size / mask_ratio / loss / decoder for SimMIM."""
    from ..models import Classifier, SimMIM

    arch = archs()[spec.arch]
    head_keys = SIMMIM_KEYS if spec.task == "pretrain" else CLASSIFIER_KEYS
    allowed = {f.name for f in dataclasses.fields(arch.config)} | set(head_keys)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BadArgument(f"{spec.name}: unknown setting {key!r}{hint}")
    head = {k: overrides.pop(k) for k in head_keys if k in overrides}
    encoder = arch.encoder(encoder_config(spec, **overrides))
    if spec.task == "pretrain":
        head.setdefault("mask_patch_size", spec.mask_patch_size)
        head.setdefault("mask_ratio", spec.mask_ratio)
        head.setdefault("norm_target_window", spec.norm_target_window)
        return SimMIM(encoder, **head)
    return Classifier(encoder, head.get("num_classes", spec.num_classes),
                      fc_norm=getattr(encoder.cfg, "use_mean_pooling", False))
