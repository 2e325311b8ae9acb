"""`simmim convert`: rewrite a checkpoint of one format in another."""

from __future__ import annotations

from pathlib import Path

from .formats import FORMATS
from .io import atomic_save, atomic_save_safetensors
from .transfer import read_checkpoint


def convert(src: str | Path, dst: str | Path, to: str = "simmim") -> tuple[str, str]:
    """Reads src in any supported format and writes dst in format `to` (official, mmpretrain, hf,
    simmim); `.safetensors` destinations are written as safetensors. Returns (from, to) names."""
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}; expected one of {', '.join(FORMATS)}")
    state, fmt, _ = read_checkpoint(src)
    out = {k: v.contiguous() for k, v in FORMATS[to].from_ours(state).items()}
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        atomic_save_safetensors(out, dst, metadata={"format": to})
    elif to == "mmpretrain":
        atomic_save({"meta": {"converted_by": "simmim", "from": fmt.name}, "state_dict": out}, dst)
    elif to == "hf":
        atomic_save(out, dst)  # HF's pytorch_model.bin is a flat state dict
    else:
        atomic_save({"model": out}, dst)
    return fmt.name, to
