"""`simmim convert`: rewrite a checkpoint of one format in another."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .ecosystem import to_timm
from .formats import FORMATS
from .io import atomic_save, atomic_save_safetensors
from .transfer import read_checkpoint

# timm is written, not read: its file is the official layout, which reads back as such
WRITERS = {**{name: fmt.from_ours for name, fmt in FORMATS.items()}, "timm": to_timm}


def convert(src: str | Path, dst: str | Path, to: str = "simmim") -> tuple[str, str]:
    """Reads src in any supported format and writes dst in format `to` (official, mmpretrain, hf,
    simmim, timm); `.safetensors` destinations are written as safetensors. Returns (from, to) names."""
    if to not in WRITERS:
        raise UsageError(f"unknown format {to!r}; expected one of {', '.join(WRITERS)}")
    state, fmt, _ = read_checkpoint(src)
    out = {k: v.contiguous() for k, v in WRITERS[to](state).items()}
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        atomic_save_safetensors(out, dst, metadata={"format": to})
    elif to == "mmpretrain":
        atomic_save({"meta": {"converted_by": "simmim", "from": fmt.name}, "state_dict": out}, dst)
    elif to in ("hf", "timm"):
        atomic_save(out, dst)  # HF's pytorch_model.bin and timm's files are flat state dicts
    else:
        atomic_save({"model": out}, dst)
    return fmt.name, to
