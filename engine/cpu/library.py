"""The CPU kernels' C library: built with gcc, loaded through ctypes, checked against engine/cpu/cpu_kernels.h, and set to
the ISA variant of the integer kernels that this CPU runs best.

    from engine.cpu.library import library, isa, select_isa
    lib = library()      # built on first use into $MCL_CACHE/kernels, then loaded, checked, and its variant chosen
    isa()                # the variant qmatmul runs: "avx2", "avxvnni" or "avx512vnni"
    MCL_CPU_ISA=avx2 python ...           # force a variant (read at load)
    python -m engine.cpu.library          # build (or find) the library; print its path and the variant chosen

The interface. engine/cpu/cpu_kernels.h is its one definition; this file is the ctypes mirror: SIGNATURES (every
function Python calls), the Structures QWeight, LoraW and DecodeLayer (engine/cpu/decode_step.py fills them), and
ABI_VERSION. At load, library() compares the library's MCL_CPU_ABI and its table of struct field offsets and sizes
(mcl_layout) with the mirror and refuses the library in one line naming the header and the first field that
differs; a mismatch would otherwise corrupt memory silently.

The variants. As llama.cpp's ggml-cpu does, the integer kernels exist once per ISA, picked at run time from the
CPU's features, with the AVX2 one as the reference (VARIANTS: each one's source, gcc flags and the /proc/cpuinfo
flags it needs). All are compiled into the one library, each translation unit with its own flags; a variant this gcc
cannot build is left out. The choice is the last variant in VARIANTS that the CPU and the library have, or
MCL_CPU_ISA. The first time a variant other than AVX2 is chosen on a CPU model, it is run against the AVX2 variant on
random blocks of every layout, M = 1 and 3 (check_variant); the verdict is kept beside the library
(qmatmul-<key>.isa.json), and a variant that disagrees is replaced by AVX2 with one warning line on stderr. The
choice is process-wide: it also serves engine/cpu/cpu_ops.c's decode_layer, which calls qmatmul.

The build options live here, in one place: VARIANTS, COMMON_FLAGS and the shared sources, whose sha names the cached
library (a changed source, header or flag builds a new one).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from kernels.cpu_info import cpu_flags, cpu_model, isa as cpu_isa

HERE = Path(__file__).parent
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fPIC"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
NEEDS = ("avx2", "fma", "f16c")                # /proc/cpuinfo flags of the whole library
VARIANTS = {                                   # ISA -> (source, its gcc flags, the /proc/cpuinfo flags it needs)
    "avx2": ("qmatmul.c", AVX2, NEEDS),        # the reference; also dispatch, quantize_x, dequant
    "avxvnni": ("qmatmul_avxvnni.c", AVX2 + ["-mavxvnni"], NEEDS + ("avx_vnni",)),
    "avx512vnni": ("qmatmul_avx512vnni.c", AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                   NEEDS + ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
}
SHARED = [("cpu_ops.c", AVX2)]                 # sources without variants, with their flags
HEADERS = ["cpu_kernels.h", "qblocks.h"]

# --- the ctypes mirror of engine/cpu/cpu_kernels.h --------------------------------------------------------------------
ABI_VERSION = 2                                # MCL_CPU_ABI
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
    "dequant_bf16": (C, [P, P, P, C, P, P, C, C, C, I64, P, I64, I64, P, C]),
    "decode_attention": (C, [P, I64, P, I64, P, I64, P, P, P, P, I64, P, P, I64, I64, I64, I64, P, C]),
    "rmsnorm": (None, [P, P, I64, I64, ctypes.c_float, P]),
    "swiglu": (None, [P, I64, I64, P, C]),
    "lora_apply": (C, [P, I64, P, I64, I64, I64, I64, P, P, P, I64, P, C]),
    "decode_layer": (C, [P, P, I64, P, P, P, P, I64, P, P, P, C]),
    "mcl_isa": (C, [C, P]),
    "mcl_set_isa": (C, [C]),
    "mcl_abi_version": (C, []),
    "mcl_layout": (I64, [I64, P, P]),
}


def check_interface(lib: ctypes.CDLL) -> None:
    """RuntimeError, one line, unless the library's MCL_CPU_ABI and every struct field's offset and size (and each
    struct's size) equal this file's mirror."""
    where = "engine/cpu/cpu_kernels.h and its ctypes mirror (engine/cpu/library.py) disagree"
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
    if list(_isa_table(lib)) != list(VARIANTS):
        raise RuntimeError(f"{where}: ISA variants {list(_isa_table(lib))} in C, {list(VARIANTS)} here")


def _isa_table(lib: ctypes.CDLL) -> dict[str, tuple[int, bool]]:
    """The library's variants: name -> (its index, whether it was built)."""
    out, name = {}, ctypes.c_char_p()
    while (built := lib.mcl_isa(len(out), ctypes.byref(name))) >= 0:
        out[name.value.decode()] = (len(out), bool(built))
    return out


# --- building and loading -------------------------------------------------------------------------------------------
_LIB = None
_ISA = ""
_LOCK = threading.RLock()


def cache_dir() -> Path:
    return Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite") / "kernels"


def _gcc(args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["gcc", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("building engine/cpu/qmatmul.c needs gcc on PATH") from None


def _units() -> list[tuple[str, list[str]]]:
    return [(src, flags) for src, flags, _ in VARIANTS.values()] + SHARED


def so_path() -> Path:
    """Where the library of these sources, headers and flags is (or will be) built."""
    units = _units()
    text = b"".join((HERE / f).read_bytes() for f, _ in units) + b"".join((HERE / h).read_bytes() for h in HEADERS)
    key = hashlib.sha256(text + json.dumps([units, COMMON_FLAGS]).encode()).hexdigest()[:16]
    return cache_dir() / f"qmatmul-{key}.so"


def check_available() -> str | None:
    """None when the library can run here; else why not, in one line: the CPU lacks a flag of NEEDS, or gcc is not
    on PATH and the library is not built yet. Reads /proc/cpuinfo and PATH, compiles nothing (engine/loading/hub.py's
    load_model and `mcl main` ask before loading or training)."""
    missing = [f for f in NEEDS if f not in cpu_flags()]
    if missing:
        return (f"engine/cpu/qmatmul.c needs an x86 CPU with AVX2, FMA and F16C; this one ({cpu_model()}) has no "
                f"{', '.join(missing)}")
    if shutil.which("gcc") is None and not so_path().is_file():
        return "engine/cpu/qmatmul.c is compiled with gcc on first use, and gcc is not on PATH"
    return None


def build() -> Path:
    """The library's path, compiled first unless the cache has this sha of sources, headers and flags. Each source is
    compiled with its own flags; a variant other than AVX2 that fails to compile is left out of the library."""
    units = _units()
    so = so_path()
    cache = so.parent
    cache.mkdir(parents=True, exist_ok=True)
    if so.is_file():
        return so
    optional = [src for name, (src, _, _) in VARIANTS.items() if name != "avx2"]      # left out if they fail
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        objs = []
        for i, (src, flags) in enumerate(units):
            obj = f"{tmp}/{i}.o"
            r = _gcc([*COMMON_FLAGS, *flags, "-c", str(HERE / src), "-o", obj])
            if r.returncode == 0:
                objs.append(obj)
            elif src not in optional:
                raise RuntimeError(f"building engine/{src} failed: gcc {' '.join(COMMON_FLAGS + flags)}\n"
                                   f"{r.stderr.strip()[-2000:]}")
        r = _gcc(["-shared", "-fopenmp", *objs, "-o", f"{tmp}/lib.so", "-lm"])
        if r.returncode != 0:
            raise RuntimeError(f"linking engine/cpu/qmatmul.c failed:\n{r.stderr.strip()[-2000:]}")
        os.replace(f"{tmp}/lib.so", so)
    return so


def missing_flags(name: str) -> list[str]:
    """The /proc/cpuinfo flags variant `name` needs that this CPU lacks (empty: it runs here)."""
    have = cpu_flags()
    return [f for f in VARIANTS[name][2] if f not in have]


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call, checked against engine/cpu/cpu_kernels.h, its ISA variant
    chosen); RuntimeError with the reason when it cannot be built or does not match."""
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        reason = check_available()
        if reason:
            raise RuntimeError(f"{reason}; load with weights='fp32'")
        so = build()
        lib = ctypes.CDLL(str(so))
        for fn, (restype, argtypes) in SIGNATURES.items():
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = restype, argtypes
        check_interface(lib)
        _choose(lib, so, os.environ.get("MCL_CPU_ISA") or None)
        _LIB = lib
        return lib


def isa() -> str:
    """The ISA variant qmatmul runs (the library is loaded first)."""
    library()
    return _ISA


def select_isa(name: str | None = None) -> str:
    """Switch qmatmul to variant `name`, checked as at load (None: the load-time choice, MCL_CPU_ISA included); the
    variant that runs. For tests and benchmarks that compare the variants in one process; no kernel may be running."""
    with _LOCK:
        lib = library()
        return _choose(lib, Path(lib._name), name or os.environ.get("MCL_CPU_ISA") or None)


def _choose(lib: ctypes.CDLL, so: Path, want: str | None) -> str:
    """Set the library's variant: `want` (an error if unknown, not runnable here or not built) or the best one this
    CPU and the library have; a variant other than AVX2 only if it agrees with AVX2 (check_variant, cached)."""
    global _ISA
    table = _isa_table(lib)
    if want is not None:
        if want not in VARIANTS:
            raise ValueError(f"MCL_CPU_ISA={want!r}: expected one of {', '.join(VARIANTS)}")
        if missing_flags(want):
            raise RuntimeError(f"MCL_CPU_ISA={want}: this CPU lacks {', '.join(missing_flags(want))}")
        if not table[want][1]:
            raise RuntimeError(f"MCL_CPU_ISA={want}: engine/{VARIANTS[want][0]} did not build with this gcc")
    else:
        runnable = [n for n in VARIANTS if not missing_flags(n)]
        want = [n for n in runnable if table[n][1]][-1]
        if want != runnable[-1]:
            print(f"engine/cpu/library: engine/cpu/{VARIANTS[runnable[-1]][0]} did not build with this gcc; the "
                  f"{want} kernels run", file=sys.stderr)
    if want != "avx2":
        verdict = _verdict(lib, so, want)
        if not verdict["agrees"]:
            print(f"engine/cpu/library: the {want} kernels disagree with AVX2 on this CPU ({verdict['worst']}); "
                  f"the avx2 kernels run", file=sys.stderr)
            want = "avx2"
    if lib.mcl_set_isa(table[want][0]) != 0:
        raise RuntimeError(f"engine/cpu/qmatmul.c: mcl_set_isa refused {want}")
    _ISA = want
    return want


# --- the check of a variant against AVX2 ---------------------------------------------------------------------------
CHECK_LAYOUTS = ((8, 32, 1, 0), (4, 32, 1, 1), (4, 32, 2, 2), (5, 32, 1, 0), (6, 16, 2, 0))   # engine/cpu/qblocks.h's
CHECK_RTOL = 1e-5                              # the integers are equal; only float summation order may differ


def _verdict_file(so: Path) -> Path:
    return so.with_suffix(".isa.json")


def _verdict(lib: ctypes.CDLL, so: Path, name: str) -> dict:
    """check_variant's verdict on this CPU model (and ISA flags: a VM may show a generic model name), from the file
    beside the library or computed and added to it."""
    info = cpu_isa()
    path, cpu = _verdict_file(so), f"{info['cpu_model']} [{' '.join(info['cpu_flags'])}]"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if name not in known.get(cpu, {}):
        known.setdefault(cpu, {})[name] = check_variant(lib, name)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(known, f, indent=1)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError:                                    # a read-only cache: check again at the next load
            pass
    return known[cpu][name]


def _check_cases():
    """Random weights of every layout (kinds 8, 4, 5, 6; both scale encodings; with and without mins) and x of 1 and
    3 rows: (layout, M, the tensors). K is 17 blocks (the 8-block steps, a pair, an odd tail) or, for the K-quant
    encoding, 512."""
    g = torch.Generator().manual_seed(0)

    def scales(enc, N, n_groups, K):               # enc 1: fp16 per group; 2: int8 per group, fp32 per 256 weights
        if enc == 1:
            return (torch.randn(N, n_groups, generator=g) * 0.01).half(), None
        return (torch.randint(-64, 64, (N, n_groups), generator=g, dtype=torch.int8),
                torch.rand(N, K // 256, generator=g) * 0.01)

    for kind, G, senc, menc in CHECK_LAYOUTS:
        N, K = 4, 512 if 2 in (senc, menc) else 544
        w = torch.randint(0, 256, (N, K // 32 * {8: 32, 4: 16, 5: 20, 6: 24}[kind]), dtype=torch.uint8, generator=g)
        scale, sd = scales(senc, N, K // G, K)
        wmin, md = scales(menc, N, K // 32, K) if menc else (None, None)
        for M in (1, 3):
            yield (kind, G, senc, menc), M, (torch.randn(M, K, generator=g), w, scale, sd, wmin, md)


def _variant_output(lib: ctypes.CDLL, name: str, case) -> torch.Tensor:
    """y of one check case through variant `name` (one thread)."""
    (kind, G, senc, menc), M, (x, w, scale, sd, wmin, md) = case
    K, N = x.shape[1], w.shape[0]
    qx, dx, sx = torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32), torch.empty(M, K // 32)
    y = torch.empty(M, N)
    ptr = lambda t: None if t is None else t.data_ptr()
    lib.quantize_x(x.data_ptr(), M, K, qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), 1)
    if lib.mcl_set_isa(_isa_table(lib)[name][0]) or lib.qmatmul(
            qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), M, K, w.data_ptr(), scale.data_ptr(), ptr(sd), senc,
            ptr(wmin), ptr(md), menc, kind, G, N, y.data_ptr(), N, 1):
        raise RuntimeError(f"engine/cpu/qmatmul.c: variant {name} refused layout {kind, G, senc, menc}")
    return y


def check_variant(lib: ctypes.CDLL, name: str) -> dict:
    """Variant `name` against AVX2 on _check_cases: {"agrees": every output within CHECK_RTOL of AVX2's (relative to
    its largest), "worst": the largest relative difference and where}. Leaves the library on AVX2."""
    worst, where = -1.0, ""
    try:
        for case in _check_cases():
            ref, got = _variant_output(lib, "avx2", case), _variant_output(lib, name, case)
            d = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            if not d <= worst and not math.isnan(worst):               # a NaN is the worst, and stays
                worst, where = d, f"layout (kind, G, scale, min) {case[0]}, M {case[1]}"
    finally:
        lib.mcl_set_isa(_isa_table(lib)["avx2"][0])
    return {"agrees": worst <= CHECK_RTOL, "worst": f"max relative difference {worst:.2e} at {where}"}


if __name__ == "__main__":
    print(library()._name, isa())
