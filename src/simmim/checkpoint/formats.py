"""Key layouts of the published checkpoint formats, adapted to ours in one place each.

Our layout is the official microsoft/SimMIM one under a module prefix: `encoder.*` + `decoder.0.*`
for pretraining models and `encoder.*` + `fc_norm.*` + `head.*` for classifiers. Each foreign
format is a table of regex renames (theirs <-> ours) plus the tensor surgery its layout needs (HF
splits qkv; mmpretrain orders PatchMerging channels as `nn.Unfold` does), applied in both
directions so that conversions round trip exactly. The keys a format may carry that we drop are
listed: buffers derived from the config and mmpretrain's data preprocessor; any other key that
has no counterpart is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import UnknownName, UsageError

StateDict = dict[str, torch.Tensor]

# Keys the reference implementations save that we rebuild from the config, or do not model.
DROPPED_KEYS = re.compile(r"(relative_position_index|relative_coords_table|attn_mask)$|^data_preprocessor\.")


@dataclass(frozen=True)
class Rename:
    """One key rename; `ours` and `theirs` are regexes whose groups correspond in order."""

    ours: str
    theirs: str

    @staticmethod
    def _apply(src: str, dst: str, key: str) -> str | None:
        m = re.fullmatch(src, key)
        if m is None:
            return None
        groups = iter(m.groups())
        return re.sub(r"\([^()]*\)", lambda _: next(groups), dst).replace("\\.", ".")

    def to_ours(self, key: str) -> str | None:
        return self._apply(self.theirs, self.ours, key)

    def to_theirs(self, key: str) -> str | None:
        return self._apply(self.ours, self.theirs, key)


def _rename(state: StateDict, renames: Iterable[Rename], inbound: bool, fmt: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if inbound and DROPPED_KEYS.search(key):
            continue
        new = next((n for r in renames if (n := (r.to_ours(key) if inbound else r.to_theirs(key))) is not None), None)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        side = f"{fmt} checkpoint" if inbound else "simmim"
        target = "simmim models" if inbound else f"the {fmt} format"
        raise UnknownName(f"{side} keys with no counterpart in {target}: {', '.join(unknown[:5])}"
                       + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    return out


@dataclass(frozen=True)
class Format:
    """A checkpoint layout: `to_ours` / `from_ours` convert whole state dicts; `detect` tells it
    from its keys."""

    name: str
    detect: Callable[[StateDict], bool]
    to_ours: Callable[[StateDict], StateDict]
    from_ours: Callable[[StateDict], StateDict]


# ---- official microsoft/SimMIM: ours as is for pretraining; fine-tuned models without `encoder.`
_CLASSIFIER_OWN = re.compile(r"^(head|fc_norm)\.")


# some released SimMIM SwinV2 weights name the bias MLP `rpe_mlp` (microsoft/Swin-Transformer#271, #273)
_RPE_MLP = re.compile(r"\.attn\.rpe_mlp\.")


def _official_to_ours(state: StateDict) -> StateDict:
    state = {_RPE_MLP.sub(".attn.cpb_mlp.", k): v for k, v in state.items() if not DROPPED_KEYS.search(k)}
    if any(k.startswith("encoder.") for k in state):
        return state
    return {(k if _CLASSIFIER_OWN.match(k) else "encoder." + k): v for k, v in state.items()}


def _official_from_ours(state: StateDict) -> StateDict:
    if any(k.startswith("decoder.") for k in state):
        return dict(state)
    return {k.removeprefix("encoder."): v for k, v in state.items()}


def _is_official(state: StateDict) -> bool:
    return any(k.startswith(("encoder.", "layers.", "blocks.", "patch_embed.")) for k in state)


OFFICIAL = Format("official", _is_official, _official_to_ours, _official_from_ours)
# our native layout is the official pretraining layout; classifiers keep the `encoder.` prefix
SIMMIM = Format("simmim", lambda s: any(k.startswith("encoder.") for k in s), _official_to_ours, dict)


# ---- HF transformers (the layout of the files it writes, e.g. microsoft/swin-base-simmim-window6-192)
def _merge_qkv(state: StateDict) -> StateDict:
    """HF keeps query/key/value apart; we keep one fused projection (qkv = [q; k; v])."""
    out: StateDict = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*)\.attn\.(query|key|value)\.(weight|bias)", key)
        if m is None:
            out[key] = value
        elif m.group(2) == "query":
            out[f"{m.group(1)}.attn.qkv.{m.group(3)}"] = torch.cat(
                [state[f"{m.group(1)}.attn.{p}.{m.group(3)}"] for p in ("query", "key", "value")])
    return out


def _split_qkv(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*)\.attn\.qkv\.(weight|bias)", key)
        if m is None:
            out[key] = value
            continue
        for part, chunk in zip(("query", "key", "value"), value.chunk(3), strict=True):
            out[f"{m.group(1)}.attn.{part}.{m.group(2)}"] = chunk.clone()
    return out


_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_WB = r"(weight|bias)"


def _hf_renames(model: str, attention: tuple[tuple[str, str], ...]) -> tuple[Rename, ...]:
    """HF's layout under its model prefix (`swin`, `swinv2`): the renames both generations share
    and the attention's own, given as (ours, theirs) suffixes of a block's keys."""
    p = model + r"\."
    hf_block = p + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    return (
        *(Rename(_BLOCK + ours, hf_block + theirs) for ours, theirs in attention),
        Rename(r"encoder\.mask_token", p + r"embeddings\.mask_token"),
        Rename(r"encoder\.patch_embed\.proj\." + _WB, p + r"embeddings\.patch_embeddings\.projection\." + _WB),
        Rename(r"encoder\.patch_embed\.norm\." + _WB, p + r"embeddings\.norm\." + _WB),
        Rename(r"encoder\.absolute_pos_embed", p + r"embeddings\.position_embeddings"),
        Rename(_BLOCK + r"norm1\." + _WB, hf_block + r"layernorm_before\." + _WB),
        Rename(_BLOCK + r"norm2\." + _WB, hf_block + r"layernorm_after\." + _WB),
        Rename(_BLOCK + r"attn\.(query|key|value)\." + _WB, hf_block + r"attention\.self\.(query|key|value)\." + _WB),
        Rename(_BLOCK + r"attn\.proj\." + _WB, hf_block + r"attention\.output\.dense\." + _WB),
        Rename(_BLOCK + r"mlp\.fc1\." + _WB, hf_block + r"intermediate\.dense\." + _WB),
        Rename(_BLOCK + r"mlp\.fc2\." + _WB, hf_block + r"output\.dense\." + _WB),
        Rename(r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\." + _WB,
               p + r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\." + _WB),
        Rename(r"encoder\.norm\." + _WB, p + r"layernorm\." + _WB),
        Rename(r"decoder\.0\." + _WB, r"decoder\.0\." + _WB),
        Rename(r"head\." + _WB, r"classifier\." + _WB),
    )


HF_SWIN_RENAMES = _hf_renames("swin", (
    (r"attn\.relative_position_bias_table", r"attention\.self\.relative_position_bias_table"),
))
# V2: HF's query/value biases are the official q_bias/v_bias (there is no key bias); these come first,
# before the generic query/key/value rename whose qkv merge needs all three
HF_SWINV2_RENAMES = _hf_renames("swinv2", (
    (r"attn\.q_bias", r"attention\.self\.query\.bias"),
    (r"attn\.v_bias", r"attention\.self\.value\.bias"),
    (r"attn\.logit_scale", r"attention\.self\.logit_scale"),
    (r"attn\.cpb_mlp\.(\d+)\." + _WB, r"attention\.self\.continuous_position_bias_mlp\.(\d+)\." + _WB),
))


def _hf_to_ours(state: StateDict) -> StateDict:
    v2 = any(k.startswith("swinv2.") for k in state)
    return _merge_qkv(_rename(state, HF_SWINV2_RENAMES if v2 else HF_SWIN_RENAMES, True, "hf"))


def _hf_from_ours(state: StateDict) -> StateDict:
    v2 = any(".attn.cpb_mlp." in k for k in state)
    return _rename(_split_qkv(state), HF_SWINV2_RENAMES if v2 else HF_SWIN_RENAMES, False, "hf")


# one HF format for both Swin generations: the model prefix (`swin.` / `swinv2.`) tells them apart
HF = Format("hf", lambda s: any(k.startswith(("swin.", "swinv2.")) for k in s), _hf_to_ours, _hf_from_ours)


# ---- mmpretrain (backbone./neck./head.; PatchMerging channels in nn.Unfold order)
_UNFOLD_ORDER = [0, 2, 1, 3]  # official concat order x00,x10,x01,x11 <-> unfold's row-major 00,01,10,11


def _unfold_reorder(t: torch.Tensor, to_unfold: bool) -> torch.Tensor:
    """Reorders the 4C input channels of a PatchMerging norm or reduction; the permutation is its
    own inverse, only the (position, channel) nesting flips."""
    lead = t.shape[:-1]
    c = t.shape[-1] // 4
    if to_unfold:
        return t.reshape(*lead, 4, c)[..., _UNFOLD_ORDER, :].transpose(-1, -2).reshape(t.shape)
    return t.reshape(*lead, c, 4).transpose(-1, -2)[..., _UNFOLD_ORDER, :].reshape(t.shape)


def _reorder_merging(state: StateDict, to_unfold: bool) -> StateDict:
    pattern = re.compile(r".*\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")
    return {k: _unfold_reorder(v, to_unfold) if pattern.match(k) else v for k, v in state.items()}


_MM_BLOCK = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
MMPRETRAIN_RENAMES = (
    Rename(r"encoder\.mask_token", r"backbone\.mask_token"),
    Rename(r"encoder\.patch_embed\.proj\." + _WB, r"backbone\.patch_embed\.projection\." + _WB),
    Rename(r"encoder\.patch_embed\.norm\." + _WB, r"backbone\.patch_embed\.norm\." + _WB),
    Rename(r"encoder\.absolute_pos_embed", r"backbone\.absolute_pos_embed"),
    Rename(_BLOCK + r"(norm1|norm2)\." + _WB, _MM_BLOCK + r"(norm1|norm2)\." + _WB),
    Rename(_BLOCK + r"attn\.relative_position_bias_table", _MM_BLOCK + r"attn\.w_msa\.relative_position_bias_table"),
    Rename(_BLOCK + r"attn\.(qkv|proj)\." + _WB, _MM_BLOCK + r"attn\.w_msa\.(qkv|proj)\." + _WB),
    Rename(_BLOCK + r"mlp\.fc1\." + _WB, _MM_BLOCK + r"ffn\.layers\.0\.0\." + _WB),
    Rename(_BLOCK + r"mlp\.fc2\." + _WB, _MM_BLOCK + r"ffn\.layers\.1\." + _WB),
    Rename(r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\." + _WB,
           r"backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\." + _WB),
    Rename(r"encoder\.norm\." + _WB, r"backbone\.norm3\." + _WB),
    Rename(r"decoder\.0\." + _WB, r"neck\.decoder\.0\." + _WB),
    Rename(r"head\." + _WB, r"head\.fc\." + _WB),
)
MMPRETRAIN = Format(
    "mmpretrain",
    lambda s: any(k.startswith("backbone.") for k in s),
    lambda s: _reorder_merging(_rename(s, MMPRETRAIN_RENAMES, True, "mmpretrain"), to_unfold=False),
    lambda s: _rename(_reorder_merging(s, to_unfold=True), MMPRETRAIN_RENAMES, False, "mmpretrain"),
)

FORMATS = {f.name: f for f in (HF, MMPRETRAIN, OFFICIAL, SIMMIM)}


def unwrap(checkpoint: dict) -> tuple[StateDict, dict]:
    """The state dict of a checkpoint file's contents and the rest (config, meta, optimizer...):
    official and our runs keep it under `model`, mmengine under `state_dict`, HF files are flat."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], {k: v for k, v in checkpoint.items() if k != key}
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, {}
    raise UsageError(f"no state dict found (top-level keys: {', '.join(map(str, list(checkpoint)[:8]))})")


def detect_format(state: StateDict) -> Format:
    """The format of a state dict, told from its keys (after `module.`/`_orig_mod.` stripping)."""
    for fmt in (HF, MMPRETRAIN, OFFICIAL):
        if fmt.detect(state):
            return fmt
    raise UsageError(f"unrecognised checkpoint layout (first keys: {', '.join(list(state)[:5])}); expected official "
                     "SimMIM (encoder.*), mmpretrain (backbone.*) or HF transformers (swin.*, swinv2.*) keys")
