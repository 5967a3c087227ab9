"""What CPU this is: its model name and the vector-ISA flags that decide which kernels run, read from /proc/cpuinfo.

    from engine.cpu_info import cpu_info
    cpu_info()   # {"cpu_model": "AMD EPYC ...", "isa": ["avx2", "fma", "f16c", "avx512f", ...], "logical_cpus": 2}

Every benchmark JSON and every campaign shard records this, so a number can be traced to a CPU class (AVX2 only,
AVX-512 with bf16, AMX...). Off Linux, or where /proc/cpuinfo cannot be read, the model is platform.processor()
and the flag list is empty.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that change which code paths run or how fast (our C kernels, oneDNN's bf16 GEMM, llama.cpp's builds).
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo_fields() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_flags() -> set[str]:
    """Every flag of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    return _cpuinfo_fields()[1]


def native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): there oneDNN's bf16 GEMM runs ~2.3x
    (AVX512-BF16) to ~6.6x (AMX) fp32; elsewhere (AVX2 machines) bf16 is emulated and ~86x *slower* than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_info() -> dict:
    """{"cpu_model", "isa": the ISA_FLAGS this CPU has, in ISA_FLAGS order, "logical_cpus"}."""
    model, flags = _cpuinfo_fields()
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags], "logical_cpus": os.cpu_count() or 0}
