"""Loading weights of any published format into our models, including pretrain -> fine-tune transfer.

One function decides what may differ between a checkpoint and a model, explicitly:
- a classifier may leave out the pretraining decoder and mask token, start its head (and ViT
  `fc_norm`) fresh, and drop the pretraining ViT's final norm and shared position table (copied
  into every block, as the official code does);
- a pretraining model may start its decoder and mask token fresh and leave out a classifier's head
  and `fc_norm` (continued pretraining from an encoder-only or fine-tuned file);
- relative position bias tables are resampled when the window changes, absolute position
  embeddings when the grid changes.
Anything else missing, extra or of another shape is an error naming the keys.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import UsageError
from ..models import Classifier, SimMIM
from .formats import Format, StateDict, detect_format, unwrap
from .io import load_checkpoint_file, strip_prefixes
from .resample import resample_rel_pos_bias, resize_abs_pos_embed
from .sharded import consolidate, is_sharded_checkpoint

SHARED_VIT_TABLE = "encoder.rel_pos_bias.relative_position_bias_table"
BEIT_EXTRA_ROWS = 3  # cls->patch, patch->cls, cls->cls


@dataclass
class LoadReport:
    """What a load did, for the user to read."""

    format: str
    loaded: int = 0
    resampled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded ({self.format} layout)"]
        if self.resampled:
            parts.append(f"{len(self.resampled)} position tables resampled")
        if self.dropped:
            parts.append(f"dropped {_brief(self.dropped)}")
        if self.initialized:
            parts.append(f"freshly initialized {_brief(self.initialized)}")
        return "; ".join(parts)


def _brief(keys: list[str]) -> str:
    prefixes = sorted({k.split(".")[0] if not k.startswith("encoder.") else ".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(prefixes)


def read_checkpoint(source: str | Path | dict) -> tuple[StateDict, Format, dict]:
    """Any checkpoint (a file of any supported format, a sharded checkpoint directory, or loaded
    contents) -> (state dict in our layout, the format it was in, everything else the file held:
    config, meta, optimizer...)."""
    if isinstance(source, str | Path):
        contents = consolidate(source) if is_sharded_checkpoint(source) else load_checkpoint_file(source)
    else:
        contents = source
    state, rest = unwrap(contents)
    state = strip_prefixes(state)
    fmt = detect_format(state)
    return fmt.to_ours(state), fmt, rest


def _allowed_missing(model: nn.Module) -> re.Pattern:
    if isinstance(model, Classifier):
        return re.compile(r"^(head|fc_norm)\.")
    return re.compile(r"^(decoder\.|encoder\.mask_token$)")


def _allowed_extra(model: nn.Module) -> re.Pattern:
    if isinstance(model, Classifier):
        return re.compile(r"^(decoder\.|encoder\.mask_token$|encoder\.norm\.|encoder\.rel_pos_bias\.)")
    return re.compile(r"^(head|fc_norm)\.")


def _rel_pos_window(rows: int, extra: int) -> int:
    side = math.isqrt(rows - extra)
    if side * side != rows - extra:
        raise UsageError(f"a relative position table of {rows} rows is not square")
    return (side + 1) // 2


def _adapt(state: StateDict, target: StateDict, report: LoadReport) -> StateDict:
    """Fits position tables and embeddings of `state` to the shapes of `target`."""
    state = dict(state)
    per_block = [k for k in target if re.fullmatch(r"encoder\.blocks\.\d+\.attn\.relative_position_bias_table", k)]
    if SHARED_VIT_TABLE in state and SHARED_VIT_TABLE not in target and per_block:
        for key in per_block:  # the official ViT fine-tuning starts every block from the shared table
            state.setdefault(key, state[SHARED_VIT_TABLE].clone())
    for key, value in list(state.items()):
        if key not in target or target[key].shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table"):
            extra = BEIT_EXTRA_ROWS if key.startswith(("encoder.blocks.", "encoder.rel_pos_bias.")) else 0
            src, dst = _rel_pos_window(value.shape[0], extra), _rel_pos_window(target[key].shape[0], extra)
            state[key] = resample_rel_pos_bias(value.float(), src, dst, extra_tokens=extra).to(value.dtype)
            report.resampled.append(key)
        elif key in ("encoder.absolute_pos_embed", "encoder.pos_embed"):
            extra = 1 if key == "encoder.pos_embed" else 0
            side = math.isqrt(target[key].shape[1] - extra)
            state[key] = resize_abs_pos_embed(value, (side, side), num_extra_tokens=extra)
            report.resampled.append(key)
    return state


def load_weights(model: nn.Module, source: str | Path | dict, new_head: bool = False) -> LoadReport:
    """Loads a checkpoint of any supported format into `model` (SimMIM or Classifier), adapting
    what may differ (see the module docstring) and refusing anything else. `new_head=True` lets a
    classifier start its head fresh where the checkpoint's head is for another number of classes."""
    state, fmt, _ = read_checkpoint(source)
    target = model.state_dict()
    report = LoadReport(fmt.name)
    state = _adapt(state, target, report)
    missing_ok, extra_ok = _allowed_missing(model), _allowed_extra(model)

    if isinstance(model, Classifier) and new_head:
        for key in ("head.weight", "head.bias"):
            if key in state and key in target and state[key].shape != target[key].shape:
                state.pop(key)
                report.dropped.append(key)
    extra = sorted(set(state) - set(target))
    bad_extra = [k for k in extra if not extra_ok.search(k)]
    missing = sorted(set(target) - set(state))
    bad_missing = [k for k in missing if not missing_ok.search(k)]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                  for k in set(state) & set(target) if state[k].shape != target[k].shape]
    problems = []
    if bad_missing:
        problems.append(f"missing {len(bad_missing)} keys ({', '.join(bad_missing[:4])})")
    if bad_extra:
        problems.append(f"unexpected {len(bad_extra)} keys ({', '.join(bad_extra[:4])})")
    if mismatched:
        problems.append(f"other shapes: {'; '.join(sorted(mismatched)[:4])}")
    if problems:
        kind = "pretraining model" if isinstance(model, SimMIM) else "classifier"
        raise UsageError(f"checkpoint does not fit this {kind}: {', '.join(problems)}")

    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    report.loaded = len(set(state) & set(target))
    report.dropped += extra
    report.initialized = missing
    return report
