"""What the machine is: CPU model and ISA flags read from /proc/cpuinfo, and the precision
runtime.precision=auto picks from them."""

import torch

from simmim import hardware
from simmim.engine.parallelize import resolve_precision


def test_auto_precision_follows_the_bf16_matrix_units():
    cpu = torch.device("cpu")
    amx = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    assert hardware.auto_precision(cpu, amx)[0] == "bf16"
    assert "amx_bf16" in hardware.auto_precision(cpu, amx)[1]
    assert hardware.auto_precision(cpu, frozenset({"avx2", "avx512f", "avx512_bf16"}))[0] == "bf16"
    epyc = frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert hardware.auto_precision(cpu, epyc) == (
        "fp32", "auto: fp32, the CPU has no native bf16 matrix units (no amx_bf16 or avx512_bf16)")
    assert hardware.auto_precision(torch.device("cuda"), epyc)[0] == "bf16"
    # the engine follows it on this machine, and an explicit precision is kept
    assert resolve_precision("auto", cpu) == hardware.auto_precision(cpu)[0]
    assert resolve_precision("fp32", cpu) == "fp32"


def test_cpu_info_reads_the_first_processor(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC 9B45\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = hardware.cpu_info.__wrapped__(str(info))
    assert model == "AMD EPYC 9B45 (family 26, model 2)"
    assert hardware.isa_flags(flags) == ["avx2", "avx512f", "avx512_bf16"]
    assert hardware.cpu_info.__wrapped__(str(tmp_path / "missing"))[1] == frozenset()
