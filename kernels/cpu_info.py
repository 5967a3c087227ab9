"""The CPU this process runs on: its model name and the x86 ISA flags our kernels and llama.cpp's build care about.

    from kernels.cpu_info import cpu_model, cpu_flags, isa, native_bf16
    isa()              # {"cpu_model": "AMD EPYC ...", "cpu_flags": ["avx2", "fma", "f16c", "avx512f", ...]}
    python -m kernels.cpu_info

One reader of /proc/cpuinfo for the whole project (engine/cpu/kernels.py's check, bench/llama_build.py's CMake
flags, every benchmark JSON). Standard library only, so kernels/ still imports nothing of ours; off Linux (no
/proc/cpuinfo) the model is platform.processor() and the flag set is empty.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# The flags that choose a code path, as /proc/cpuinfo spells them: our C kernels need the first three; llama.cpp's
# CPU backend is built per flag (bench/llama_build.py); AMX is the Intel path that faulted.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def _first_cpu() -> dict[str, str]:
    """The `key: value` lines of /proc/cpuinfo's first processor block ({} where it cannot be read)."""
    return _parse(CPUINFO)


@functools.lru_cache(maxsize=8)
def _parse(path: Path) -> dict[str, str]:
    """Read once per path and process: the hot paths ask per call (engine/cpu/kernels.gemm_dtype per GEMM)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    block = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines()) if _}


def cpu_flags() -> frozenset[str]:
    """Every flag of the `flags` line (x86 Linux); empty where there is none."""
    return frozenset(_first_cpu().get("flags", "").split())


def cpu_model() -> str:
    """/proc/cpuinfo's `model name` (e.g. 'AMD EPYC 9554 64-Core Processor'), else what platform knows."""
    return _first_cpu().get("model name") or platform.processor() or platform.machine()


def native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): there oneDNN's bf16 GEMM runs ~2.3x
    (AVX512-BF16) to ~6.6x (AMX) fp32; elsewhere (AVX2 machines) bf16 is emulated and ~86x *slower* than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def isa() -> dict:
    """What every benchmark JSON records about the CPU: cpu_model, and cpu_flags: the ISA_FLAGS it has, in that
    order (an empty list off x86 Linux)."""
    flags = cpu_flags()
    return {"cpu_model": cpu_model(), "cpu_flags": [f for f in ISA_FLAGS if f in flags]}


if __name__ == "__main__":
    info = isa()
    print(info["cpu_model"])
    print(" ".join(info["cpu_flags"]) or "(none of the ISA flags)")
