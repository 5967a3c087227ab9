"""The CPU kernels' C library: built with gcc, loaded through ctypes, and checked against engine/cpu_kernels.h.

    from engine.cpu_library import library
    lib = library()     # built on first use into $MCL_CACHE/kernels, then loaded and checked
    python -m engine.cpu_library          # build (or find) the library and print its path

engine/cpu_kernels.h is the one definition of the C interface; this file is its ctypes mirror: SIGNATURES (every
function Python calls), the Structures QWeight, LoraW and DecodeLayer (engine/decode_step.py fills them), and
ABI_VERSION. At load, library() compares the library's MCL_CPU_ABI and its table of struct field offsets and sizes
(mcl_layout) with the mirror and refuses the library in one line naming the header and the first field that
differs; a mismatch would otherwise corrupt memory silently. The build options live here, in one place: SOURCES and
FLAGS, whose sha names the cached library (a changed source, header or flag builds a new one).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from engine.cpu_info import cpu_flags

HERE = Path(__file__).parent
SOURCES = [HERE / "qmatmul.c", HERE / "cpu_ops.c"]
HEADERS = [HERE / "cpu_kernels.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
NEEDS = ("avx2", "fma", "f16c")                # /proc/cpuinfo flags the library needs

# --- the ctypes mirror of engine/cpu_kernels.h --------------------------------------------------------------------
ABI_VERSION = 1                                # MCL_CPU_ABI
P, I64, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class QWeight(ctypes.Structure):
    _fields_ = [("w", P), ("scale", P), ("sd", P), ("wmin", P), ("md", P),
                ("senc", I64), ("menc", I64), ("kind", I64), ("G", I64), ("N", I64)]


class LoraW(ctypes.Structure):
    _fields_ = [("A", P), ("B", P), ("scales", P), ("R", I64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("norm1", P), ("norm2", P), ("bq", P), ("bk", P), ("bv", P), ("eps", ctypes.c_double),
                ("qkv", QWeight * 3), ("o", QWeight), ("gu", QWeight * 2), ("down", QWeight),
                ("n_qkv", I64), ("n_gu", I64),
                ("lq", LoraW), ("lk", LoraW), ("lv", LoraW), ("lo", LoraW), ("lg", LoraW), ("lu", LoraW), ("ld", LoraW),
                ("dim", I64), ("nh", I64), ("nkv", I64), ("hd", I64), ("inter", I64)]


STRUCTS = {"QWeight": QWeight, "LoraW": LoraW, "DecodeLayer": DecodeLayer}
_QMATMUL = [P, P, P, I64, I64, P, P, P, C, P, P, C, C, C, I64, P, I64, C]
SIGNATURES = {                                 # name -> (restype, argtypes), in the header's order
    "quantize_x": (None, [P, I64, I64, P, P, P, C]),
    "qmatmul": (C, _QMATMUL),
    "dequant": (C, [P, P, P, C, P, P, C, C, C, I64, P, I64, I64, P, C]),
    "decode_attention": (C, [P, I64, P, I64, P, I64, P, P, P, P, I64, P, P, I64, I64, I64, I64, P, C]),
    "rmsnorm": (None, [P, P, I64, I64, ctypes.c_float, P]),
    "lora_apply": (C, [P, I64, P, I64, I64, I64, I64, P, P, P, I64, P, C]),
    "decode_layer": (C, [P, P, I64, P, P, P, P, I64, P, P, P, C]),
    "mcl_abi_version": (C, []),
    "mcl_layout": (I64, [I64, P, P]),
}


def check_interface(lib: ctypes.CDLL) -> None:
    """RuntimeError, one line, unless the library's MCL_CPU_ABI and every struct field's offset and size (and each
    struct's size) equal this file's mirror."""
    where = "engine/cpu_kernels.h and its ctypes mirror (engine/cpu_library.py) disagree"
    if lib.mcl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{where}: MCL_CPU_ABI is {lib.mcl_abi_version()} in the library, {ABI_VERSION} here")
    table, name, size = {}, ctypes.c_char_p(), ctypes.c_int64()
    while (value := lib.mcl_layout(len(table), ctypes.byref(name), ctypes.byref(size))) >= 0:
        table[name.value.decode()] = (value, size.value)
    for s in dict.fromkeys(n.partition(".")[0] for n in table):
        if s not in STRUCTS:
            raise RuntimeError(f"{where}: struct {s} has no ctypes mirror")
    for s, cls in STRUCTS.items():
        mine = [f for f, _ in cls._fields_]
        theirs = [n.partition(".")[2] for n in table if n.startswith(s + ".")]
        for f in mine:
            if f not in theirs:
                raise RuntimeError(f"{where}: {s}.{f} is in the mirror, not in the header")
            got = (getattr(cls, f).offset, getattr(cls, f).size)
            if table[f"{s}.{f}"] != got:
                raise RuntimeError(f"{where}: {s}.{f} at offset {table[f'{s}.{f}'][0]} size {table[f'{s}.{f}'][1]}"
                                   f" in C, offset {got[0]} size {got[1]} here")
        for f in theirs:
            if f not in mine:
                raise RuntimeError(f"{where}: {s}.{f} is in the header, not in the mirror")
        if table.get(s, (None,))[0] != ctypes.sizeof(cls):
            raise RuntimeError(f"{where}: sizeof({s}) is {table.get(s, (None,))[0]} in C, {ctypes.sizeof(cls)} here")


# --- building and loading -------------------------------------------------------------------------------------------
_LIB = None
_LOCK = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite") / "kernels"


def build() -> Path:
    """The library's path, compiled first unless the cache has this sha of sources, header and flags."""
    key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES + HEADERS) + " ".join(FLAGS).encode()).hexdigest()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"qmatmul-{key[:16]}.so"
    if so.is_file():
        return so
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(fd)
    cmd = ["gcc", *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        os.unlink(tmp)
        raise RuntimeError("building engine/qmatmul.c needs gcc on PATH") from None
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building engine/qmatmul.c failed: {' '.join(cmd)}\n{r.stderr.strip()[-2000:]}")
    os.replace(tmp, so)
    return so


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call, checked against engine/cpu_kernels.h); RuntimeError with the
    reason when it cannot be built or does not match."""
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        missing = [f for f in NEEDS if f not in cpu_flags()]
        if missing:
            raise RuntimeError(f"engine/qmatmul.c needs an x86 CPU with AVX2, FMA and F16C (this one lacks "
                               f"{', '.join(missing)}); load with weights='fp32' or 'bf16'")
        lib = ctypes.CDLL(str(build()))
        for fn, (restype, argtypes) in SIGNATURES.items():
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, argtypes
        check_interface(lib)
        _LIB = lib
        return lib


if __name__ == "__main__":
    print(library()._name)
