"""The CPU a run measured on: its model name, family/model and the instruction sets that decide its
kernels (AVX-512, and the bf16 matrix units AVX512-BF16 and AMX-BF16)."""

from __future__ import annotations

import platform

ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))
"""/proc/cpuinfo flags and the names the benchmark page gives them."""


def cpu_fields(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; {} where there is none (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def isa_flags(fields: dict[str, str]) -> list[str]:
    """The instruction sets of ISA the CPU has, by their page names."""
    flags = set(fields.get("flags", "").split())
    return [name for flag, name in ISA if flag in flags]


def cpu_model(fields: dict[str, str] | None = None, isa: bool = True) -> str:
    """e.g. 'Intel(R) Xeon(R) Processor (family 6, model 207; AVX2, AVX-512, AVX512-BF16, AMX-BF16)';
    without `isa`, the name and family/model only."""
    fields = cpu_fields() if fields is None else fields
    if not fields:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']}, model {fields.get('model', '?')}")
    if isa and isa_flags(fields):
        details.append(", ".join(isa_flags(fields)))
    return f"{name} ({'; '.join(details)})" if details else name
