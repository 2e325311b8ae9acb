"""What this machine is, as far as kernel and precision choices go: the CPU model and its ISA flags,
whether it has native bf16 matrix units, the precision `runtime.precision=auto` picks, and the
cache directory where measured choices (fused.py's GEMM route) are kept per machine."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
"""The /proc/cpuinfo flags that change which CPU kernels are fast (named in keys and in the bench)."""
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""Native bf16 matrix units: AMX tiles, or AVX-512 bf16 dot products."""


GEMM_ROUTE_ENV = "SIMMIM_GEMM_ROUTE"
"""Environment variable forcing the CPU float32 GEMM route: 'onednn', 'mixed', 'aten' or 'auto' (calibrated)."""
GEMM_ROUTES = ("onednn", "mixed", "aten")
"""oneDNN for every float32 GEMM of the fused layers; oneDNN but for the weight gradients, which torch's
BLAS computes without copying a transposed operand; torch's BLAS for all."""
GEMM_ROUTE_VALUES = ", ".join(repr(route) for route in GEMM_ROUTES) + " or 'auto'"
"""What SIMMIM_GEMM_ROUTE takes, as its error messages say it."""


def requested_gemm_route() -> str | None:
    """The route SIMMIM_GEMM_ROUTE forces, None for 'auto' or unset; a ValueError for a bad value (checked
    without torch, so that a command refuses it before its work starts)."""
    forced = os.environ.get(GEMM_ROUTE_ENV, "auto")
    if forced not in ("auto", *GEMM_ROUTES):
        raise UsageError(f"{GEMM_ROUTE_ENV}={forced!r}: expected {GEMM_ROUTE_VALUES}")
    return None if forced == "auto" else forced


def cache_dir() -> Path:
    """Where downloaded weights and per-machine measurements live: $SIMMIM_CACHE, else ~/.cache/simmim."""
    return Path(os.environ.get("SIMMIM_CACHE", Path.home() / ".cache" / "simmim"))


ISA_NAMES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
"""/proc/cpuinfo flags and the names the benchmark page gives them."""


def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; {} where there is none (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip() and fields:
                    break  # the first processor's block ends here
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def isa_names(fields: dict[str, str]) -> list[str]:
    """The instruction sets of ISA_NAMES the CPU of `fields` has, by their page names."""
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return [name for flag, name in ISA_NAMES if flag in flags]


def cpu_model(fields: dict[str, str] | None = None, isa: bool = True) -> str:
    """e.g. 'Intel(R) Xeon(R) Processor (family 6, model 207; AVX2, AVX-512, AVX512-BF16, AMX-BF16)';
    without `isa`, the name and family/model only (virtual machines often name the CPU generically)."""
    fields = cpu_fields() if fields is None else fields
    if not fields:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']}, model {fields.get('model', '?')}")
    if isa and isa_names(fields):
        details.append(", ".join(isa_names(fields)))
    return f"{name} ({'; '.join(details)})" if details else name


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name with family and model numbers, flags) of the first CPU; no flags where
    /proc/cpuinfo is not readable (not Linux)."""
    fields = cpu_fields(path)
    return cpu_model(fields, isa=False), frozenset((fields.get("flags") or fields.get("Features") or "").split())


def isa_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The ISA_FLAGS this CPU has, in ISA_FLAGS order."""
    flags = cpu_info()[1] if flags is None else flags
    return [f for f in ISA_FLAGS if f in flags]


def auto_precision(device: torch.device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision, why) for runtime.precision=auto: bf16 on a GPU; on the CPU bf16 autocast where it
    has native bf16 matrix units (there bf16 GEMMs run several times faster than fp32; docs/kernels.md
    has the figures), fp32 elsewhere (bf16 is emulated and no faster)."""
    if device.type != "cpu":
        return "bf16", f"auto: bf16 on {device.type}"
    flags = cpu_info()[1] if flags is None else flags
    native = [f for f in BF16_FLAGS if f in flags]
    if native:
        return "bf16", f"auto: bf16, the CPU has native bf16 matrix units ({', '.join(native)})"
    return "fp32", "auto: fp32, the CPU has no native bf16 matrix units (no amx_bf16 or avx512_bf16)"


ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
"""The variables that cap the instruction sets torch's own kernels, MKL and oneDNN dispatch to."""


def isa_caps() -> dict[str, str]:
    """The ISA caps (ISA_CAPS) set for this process."""
    return {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}


def machine_key() -> str:
    """CPU model, ISA flags and caps, torch version and thread count: what a measured kernel choice depends on."""
    import torch

    caps = "".join(f" {name}={value}" for name, value in isa_caps().items())
    return (f"{cpu_info()[0]} [{' '.join(isa_flags())}]{caps} torch {torch.__version__} "
            f"threads {torch.get_num_threads()}")
