"""Build and install the pinned llama-cpp-python for this CPU: the one place its build options live.

    python -m bench.llama_build                # build once per (version, python, CPU flags), then install
    python -m bench.llama_build --cmake-args   # print the CMAKE_ARGS for this CPU; nothing built
    python -m bench.llama_build --newest       # the newest release in setup.py's `bench` range (refresh_constraints)

llama.cpp is a peer in tests (tests/test_export_gguf.py) and benchmarks (bench/generate.py, bench/quality.py), never
used by the engine. pip's default source build compiles ggml with -march=native: on an Intel Xeon with AMX its AMX
path faults (general protection fault in libggml-cpu.so), and a native wheel kept in pip's cache faults with SIGILL
on a CPU that lacks one of the builder's instructions. Here ggml is built with GGML_NATIVE=OFF and one ISA option
per flag this CPU has (/proc/cpuinfo, via kernels/cpu_info.py), AMX always off; the wheel is built with
--no-cache-dir into $MCL_CACHE/wheels/llama_cpp_python-<version>-<python>-<ISA tag>/ (default
~/.cache/mapcoder-lite), so a wheel built for one CPU is never installed on another; installed with --no-deps over
any other build, then its dependencies at their constraints.txt pins. The version is the llama_cpp_python pin in
constraints.txt. scripts/test.sh runs this after installing the `test` extra; `pip install -e ".[bench]"` would
instead build natively, hence this command.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from kernels.cpu_info import cpu_flags

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
DIST = "llama_cpp_python"
# ggml's CMake option -> the /proc/cpuinfo flags it compiles in (vendor/llama.cpp/ggml/src/ggml-cpu/CMakeLists.txt:
# GGML_AVX512 adds -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw). The VBMI / VNNI / BF16 options only
# count on top of GGML_AVX512.
ISA_OPTIONS = {
    "GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_BMI2": ("bmi2",),
    "GGML_FMA": ("fma",), "GGML_F16C": ("f16c",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_VNNI": ("avx512_vnni",), "GGML_AVX512_BF16": ("avx512_bf16",),
}
ALWAYS_OFF = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")   # ggml's AMX path faults on Sapphire Rapids


def isa_options(flags=None) -> dict[str, bool]:
    """ggml's ISA options, ON where this CPU (or the given flag set) has every flag the option compiles in."""
    flags = cpu_flags() if flags is None else set(flags)
    on = {opt: all(f in flags for f in need) for opt, need in ISA_OPTIONS.items()}
    for opt in ("GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"):
        on[opt] = on[opt] and on["GGML_AVX512"]
    return on


def cmake_args(flags=None) -> str:
    """The CMAKE_ARGS of the build: no -march=native, one option per ISA feature, AMX off."""
    opts = {"GGML_NATIVE": False, **isa_options(flags), **{o: False for o in ALWAYS_OFF}}
    return " ".join(f"-D{o}={'ON' if v else 'OFF'}" for o, v in opts.items())


def isa_tag(flags=None) -> str:
    """The wheel directory's CPU key: the ISA options built in, e.g. 'sse42+avx+avx2+bmi2+fma+f16c', and a short hash
    of the whole CMAKE_ARGS (a change of build options is a new directory too)."""
    on = [o.removeprefix("GGML_").lower() for o, v in isa_options(flags).items() if v] or ["generic"]
    return "+".join(on) + "-" + hashlib.sha256(cmake_args(flags).encode()).hexdigest()[:8]


def pinned_version(constraints: Path = CONSTRAINTS) -> str:
    """The llama_cpp_python==X pin in constraints.txt (the one pin)."""
    try:
        text = constraints.read_text()
    except OSError as e:
        raise SystemExit(f"bench/llama_build.py: cannot read {constraints}: {e.strerror}")
    m = re.search(r"^llama[-_]cpp[-_]python==(\S+)\s*$", text, re.M | re.I)
    if not m:
        raise SystemExit(f"bench/llama_build.py: {constraints} has no llama_cpp_python==<version> line")
    return m.group(1)


def newest_in_bench_range() -> str:
    """The newest llama-cpp-python release allowed by setup.py's `bench` extra (read from mapcoder-lite's installed
    metadata), as pip resolves it (metadata only, nothing compiled)."""
    reqs = [r for r in md.requires("mapcoder-lite") or []
            if re.match(r"llama[-_]cpp[-_]python\b", r, re.I) and re.search(r"extra\s*==\s*['\"]bench['\"]", r)]
    if not reqs:
        raise SystemExit("bench/llama_build.py: setup.py's `bench` extra names no llama-cpp-python range")
    spec = reqs[0].split(";")[0].strip()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        _pip("install", "-q", "--dry-run", "--no-deps", "--ignore-installed", "--report", str(report), spec)
        return json.loads(report.read_text())["install"][0]["metadata"]["version"]


def wheel_dir(version: str, cache: Path | None = None) -> Path:
    """$MCL_CACHE/wheels/llama_cpp_python-<version>-<python>-<isa_tag()>: one directory per build that can run here."""
    cache = cache or Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite")
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return cache / "wheels" / f"{DIST}-{version}-{py}-{isa_tag()}"


def _pip(*args: str, env=None) -> None:
    """pip in this interpreter; a failure is one line here (pip has printed its own output above it)."""
    r = subprocess.run([sys.executable, "-m", "pip", *args], env=env)
    if r.returncode:
        raise SystemExit(f"bench/llama_build.py: `pip {' '.join(args[:2])} ...` failed (exit code {r.returncode}); "
                         "pip's output is above")


def build(version: str) -> Path:
    """The wheel for this CPU, built (without pip's cache) the first time it is asked for."""
    out = wheel_dir(version)
    found = sorted(out.glob(f"{DIST}-{version}-*.whl"))
    if found:
        return found[0]
    if not (shutil.which("c++") or shutil.which("g++")):
        raise SystemExit("bench/llama_build.py: building llama-cpp-python needs a C++ compiler (g++) on PATH")
    args = cmake_args()
    print(f"llama_build: building llama-cpp-python {version} (5-20 min on 2 cores), CMAKE_ARGS={args}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        _pip("wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary", DIST, "-w", tmp, f"{DIST}=={version}",
             env=env)
        (Path(tmp) / "CMAKE_ARGS").write_text(args + "\n")
        os.replace(tmp, out)               # whole directory at once: a killed build leaves no half wheel behind
        os.mkdir(tmp)                      # for TemporaryDirectory's cleanup
    return sorted(out.glob(f"{DIST}-{version}-*.whl"))[0]


def installed_from(wheel: Path) -> bool:
    """Whether the installed llama-cpp-python is this very wheel (pip's direct_url.json names the file)."""
    try:
        url = json.loads(md.distribution(DIST).read_text("direct_url.json") or "{}").get("url", "")
    except md.PackageNotFoundError:
        return False
    return url.startswith("file://") and Path(unquote(urlparse(url).path)).resolve() == wheel.resolve()


def missing_dependencies() -> list[str]:
    """The installed llama-cpp-python's requirements (extras aside) that are not installed."""
    missing = []
    for req in md.requires(DIST) or []:
        if "extra ==" in req:
            continue
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return missing


def install(version: str) -> str:
    """Build (once) and install the wheel; returns llama.cpp's system-info line, read in a child process so that a
    library that does not run on this CPU is one line here and not a crash."""
    wheel = build(version)
    if not installed_from(wheel):
        _pip("install", "-q", "--no-deps", "--force-reinstall", str(wheel))   # over any other build of it
    if missing_dependencies():                                                # numpy, diskcache, jinja2, ...
        pins = ["-c", str(CONSTRAINTS)] if CONSTRAINTS.is_file() and version == pinned_version() else []
        _pip("install", "-q", *pins, str(wheel))
    r = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        why = f"signal {-r.returncode}" if r.returncode < 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"bench/llama_build.py: {wheel} installed but llama_cpp does not load here: {why}")
    return r.stdout.strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_build", description=__doc__.split("\n")[0])
    p.add_argument("--cmake-args", action="store_true", help="print this CPU's CMAKE_ARGS and exit")
    p.add_argument("--newest", action="store_true", help="the newest release in the bench range, not the pin")
    a = p.parse_args(argv)
    if a.cmake_args:
        print(cmake_args())
        return 0
    version = newest_in_bench_range() if a.newest else pinned_version()
    info = install(version)
    print(f"llama-cpp-python {version} ({wheel_dir(version).name}): {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
