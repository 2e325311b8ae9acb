"""Key layouts of the published checkpoint formats, adapted to ours in one place each.

Our layout is the official microsoft/SimMIM one under a module prefix: `encoder.*` + `decoder.0.*`
for pretraining models and `encoder.*` + `fc_norm.*` + `head.*` for classifiers. Each foreign format
is a list of regex renames (theirs <-> ours) plus the tensor surgery its layout needs (HF splits
qkv; mmpretrain reorders PatchMerging channels), applied in both directions so conversions round
trip exactly. Derived buffers (relative position indices, shift masks) are the only keys a
format may carry that we drop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]

# Buffers that the reference implementations save but that are derived from the config.
DERIVED_BUFFERS = re.compile(r"(relative_position_index|relative_coords_table|attn_mask)$")


@dataclass(frozen=True)
class Rename:
    """One key rename, `ours` and `theirs` being regexes whose groups correspond in order."""

    ours: str
    theirs: str

    @staticmethod
    def _apply(src: str, dst: str, key: str) -> str | None:
        m = re.fullmatch(src, key)
        if m is None:
            return None
        out = dst
        for g in m.groups():
            out = re.sub(r"\([^()]*\)", lambda _, g=g: g, out, count=1)
        return out.replace("\\.", ".")

    def to_ours(self, key: str) -> str | None:
        return self._apply(self.theirs, self.ours, key)

    def to_theirs(self, key: str) -> str | None:
        return self._apply(self.ours, self.theirs, key)


@dataclass(frozen=True)
class Format:
    """A checkpoint format: renames plus tensor transforms applied after renaming in (to ours)
    and before renaming out (from ours)."""

    name: str
    renames: tuple[Rename, ...]
    split_in: Callable[[StateDict], StateDict] = lambda sd: sd
    split_out: Callable[[StateDict], StateDict] = lambda sd: sd

    def to_ours(self, state: StateDict) -> StateDict:
        out: StateDict = {}
        for key, value in state.items():
            if DERIVED_BUFFERS.search(key):
                continue
            new = next((n for r in self.renames if (n := r.to_ours(key)) is not None), None)
            if new is None:
                raise KeyError(f"{self.name} checkpoint key {key!r} has no counterpart in simmim models")
            out[new] = value
        return self.split_in(out)

    def from_ours(self, state: StateDict) -> StateDict:
        out: StateDict = {}
        for key, value in self.split_out(dict(state)).items():
            new = next((n for r in self.renames if (n := r.to_theirs(key)) is not None), None)
            if new is None:
                raise KeyError(f"simmim key {key!r} has no counterpart in the {self.name} format")
            out[new] = value
        return out


def _merge_qkv(state: StateDict) -> StateDict:
    """HF keeps query/key/value apart; we keep one fused projection (ours.attn.qkv = [q; k; v])."""
    out: StateDict = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*)\.attn\.(query|key|value)\.(weight|bias)", key)
        if m is None:
            out[key] = value
        elif m.group(2) == "query":
            parts = [state[f"{m.group(1)}.attn.{p}.{m.group(3)}"] for p in ("query", "key", "value")]
            out[f"{m.group(1)}.attn.qkv.{m.group(3)}"] = torch.cat(parts, 0)
    return out


def _split_qkv(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*)\.attn\.qkv\.(weight|bias)", key)
        if m is None:
            out[key] = value
            continue
        for part, chunk in zip(("query", "key", "value"), value.chunk(3, 0), strict=True):
            out[f"{m.group(1)}.attn.{part}.{m.group(2)}"] = chunk.clone()
    return out


_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_HF_BLOCK = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."

HF_SWIN = Format(
    "hf",
    (
        Rename(r"encoder\.mask_token", r"swin\.embeddings\.mask_token"),
        Rename(r"encoder\.patch_embed\.proj\.(weight|bias)",
               r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)"),
        Rename(r"encoder\.patch_embed\.norm\.(weight|bias)", r"swin\.embeddings\.norm\.(weight|bias)"),
        Rename(r"encoder\.absolute_pos_embed", r"swin\.embeddings\.position_embeddings"),
        Rename(_BLOCK + r"norm1\.(weight|bias)", _HF_BLOCK + r"layernorm_before\.(weight|bias)"),
        Rename(_BLOCK + r"norm2\.(weight|bias)", _HF_BLOCK + r"layernorm_after\.(weight|bias)"),
        Rename(_BLOCK + r"attn\.relative_position_bias_table",
               _HF_BLOCK + r"attention\.self\.relative_position_bias_table"),
        Rename(_BLOCK + r"attn\.(query|key|value)\.(weight|bias)",
               _HF_BLOCK + r"attention\.self\.(query|key|value)\.(weight|bias)"),
        Rename(_BLOCK + r"attn\.proj\.(weight|bias)", _HF_BLOCK + r"attention\.output\.dense\.(weight|bias)"),
        Rename(_BLOCK + r"mlp\.fc1\.(weight|bias)", _HF_BLOCK + r"intermediate\.dense\.(weight|bias)"),
        Rename(_BLOCK + r"mlp\.fc2\.(weight|bias)", _HF_BLOCK + r"output\.dense\.(weight|bias)"),
        Rename(r"encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
               r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)"),
        Rename(r"encoder\.norm\.(weight|bias)", r"swin\.layernorm\.(weight|bias)"),
        Rename(r"decoder\.0\.(weight|bias)", r"decoder\.0\.(weight|bias)"),
        Rename(r"head\.(weight|bias)", r"classifier\.(weight|bias)"),
    ),
    split_in=_merge_qkv,
    split_out=_split_qkv,
)
