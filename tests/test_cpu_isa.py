"""The CPU classes the suite lands on, without their machines: a fake /proc/cpuinfo per class drives the flag reader
(kernels/cpu_info.py), the llama.cpp build options and wheel cache key (bench/llama_build.py), the packed-weights
check (engine.cpu.kernels.check_available) and engine/loading/hub.py's load_model (`mcl main`'s fallback:
tests/recipes/test_main_job.py), and the CPU record that every benchmark JSON carries (bench/common.py,
kernels/bench.py).

    python -m pytest tests/test_cpu_isa.py -q
"""
import ast
import sys
from pathlib import Path

import pytest

import kernels.cpu_info as cpu_info
from bench import llama_build
from engine.cpu import kernels as cpu_kernels, library as cpu_library
from engine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt aes"
CPUS = {                                               # model name, flags (as Linux spells them)
    "epyc_avx2": ("AMD EPYC 7B12", f"{BASE} avx avx2 fma f16c bmi1 bmi2"),
    "epyc_avx512": ("AMD EPYC 9B14", f"{BASE} avx avx2 fma f16c bmi1 bmi2 avx512f avx512dq avx512cd avx512bw "
                                     "avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bf16"),
    "xeon_amx": ("Intel(R) Xeon(R) Platinum 8481C", f"{BASE} avx avx2 fma f16c bmi1 bmi2 avx512f avx512dq avx512cd "
                 "avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8"),
    "old_avx": ("Intel(R) Xeon(R) CPU E5-2670", f"{BASE} avx"),
}


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """fake_cpu(name): /proc/cpuinfo reads as two processors of that class."""
    def use(name):
        model, flags = CPUS[name]
        block = f"processor\t: {{}}\nvendor_id\t: x\nmodel name\t: {model}\nflags\t\t: {flags}\n"
        path = tmp_path / f"cpuinfo_{name}"
        path.write_text(block.format(0) + "\n" + block.format(1))
        monkeypatch.setattr(cpu_info, "CPUINFO", path)
    return use


def test_isa_records_the_model_and_the_flags_present(fake_cpu, monkeypatch, tmp_path):
    fake_cpu("xeon_amx")
    got = cpu_info.isa()
    assert got["cpu_model"] == "Intel(R) Xeon(R) Platinum 8481C"
    assert got["cpu_flags"] == [f for f in cpu_info.ISA_FLAGS]        # this one has every flag we record
    fake_cpu("epyc_avx2")
    assert cpu_info.isa()["cpu_flags"] == ["avx2", "fma", "f16c"]
    monkeypatch.setattr(cpu_info, "CPUINFO", tmp_path / "absent")     # off Linux: no flags, still a model string
    assert cpu_info.isa()["cpu_flags"] == [] and cpu_info.isa()["cpu_model"]


@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_llama_cpp_build_fits_the_cpu_with_amx_off(fake_cpu, cpu):
    fake_cpu(cpu)
    args = llama_build.cmake_args()
    opts = dict(a.removeprefix("-D").split("=") for a in args.split())
    assert opts["GGML_NATIVE"] == "OFF" and "march" not in args, args
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF", args
    flags = set(CPUS[cpu][1].split())
    assert opts["GGML_AVX2"] == ("ON" if "avx2" in flags else "OFF"), args
    assert opts["GGML_FMA"] == opts["GGML_F16C"] == ("ON" if "fma" in flags else "OFF"), args
    assert opts["GGML_AVX512"] == opts["GGML_AVX512_VNNI"] == opts["GGML_AVX512_BF16"] == \
        ("ON" if "avx512f" in flags else "OFF"), args
    assert opts["GGML_AVX_VNNI"] == ("ON" if cpu == "xeon_amx" else "OFF"), args


def test_a_wheel_is_keyed_by_version_python_and_cpu(fake_cpu, tmp_path):
    dirs = {}
    for cpu in CPUS:
        fake_cpu(cpu)
        dirs[cpu] = llama_build.wheel_dir("0.3.36", cache=tmp_path)
        assert dirs[cpu] == llama_build.wheel_dir("0.3.36", cache=tmp_path)           # stable for one CPU
    assert len(set(dirs.values())) == len(CPUS), dirs                                   # never shared by two
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert dirs["epyc_avx2"].name.startswith(f"llama_cpp_python-0.3.36-{py}-sse42+avx+avx2+bmi2+fma+f16c-")
    assert dirs["epyc_avx2"].parent == tmp_path / "wheels"


def test_the_version_is_the_one_pin_in_constraints(tmp_path):
    pins = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.lower().startswith("llama")]
    assert pins == [f"llama_cpp_python=={llama_build.pinned_version()}"]
    bad = tmp_path / "constraints.txt"
    bad.write_text("numpy==2.4.6\n")
    with pytest.raises(SystemExit, match=r"constraints.txt has no llama_cpp_python==<version> line"):
        llama_build.pinned_version(bad)


def test_setup_test_extra_leaves_llama_cpp_to_the_builder():
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(kw.value for n in ast.walk(tree) if isinstance(n, ast.Call)
                  for kw in n.keywords if kw.arg == "extras_require")
    test = next(v for k, v in zip(extras.keys, extras.values) if k.value == "test")
    assert not [e.value for e in test.elts if "llama" in e.value.lower()]
    assert "bench.llama_build" in (ROOT / "scripts" / "test.sh").read_text()


def test_packed_path_check_names_the_missing_flags(fake_cpu):
    fake_cpu("old_avx")
    reason = cpu_kernels.check_available()
    assert reason == ("engine/cpu/qmatmul.c needs an x86 CPU with AVX2, FMA and F16C; this one (Intel(R) Xeon(R) CPU "
                      "E5-2670) has no avx2, fma, f16c")
    fake_cpu("epyc_avx2")
    assert cpu_kernels.check_available() is None or "gcc" in cpu_kernels.check_available()


def test_packed_path_check_without_gcc(fake_cpu, monkeypatch, tmp_path):
    fake_cpu("epyc_avx512")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.check_available() == "engine/cpu/qmatmul.c is compiled with gcc on first use, and gcc is not on PATH"
    so = cpu_library.so_path()                            # already built for these sources: gcc is not needed
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")
    assert cpu_kernels.check_available() is None


def test_load_model_q4_fails_in_one_line_before_reading(fake_cpu, monkeypatch):
    fake_cpu("old_avx")
    monkeypatch.setattr("engine.loading.hub.resolve", lambda *a: pytest.fail("load_model read the model before checking"))
    from engine.loading.hub import load_model
    with pytest.raises(UserError) as e:
        load_model("smollm2-135m", device="cpu", weights="q4")
    msg = str(e.value)
    assert "\n" not in msg and "weights='q4'" in msg and "has no avx2, fma, f16c" in msg and "weights='fp32'" in msg


def test_a_bench_json_without_the_cpu_is_refused(tmp_path):
    from bench.common import isa, write_result
    from kernels.bench import _write
    with pytest.raises(ValueError, match=r"write_result\(x.json\): no cpu_model, cpu_flags"):
        write_result({"rows": []}, str(tmp_path / "x.json"), "x.json")
    with pytest.raises(ValueError, match=r"kernels/bench.py _write\(y.json\): no cpu_model, cpu_flags"):
        _write(tmp_path / "y.json", {"rows": []})
    write_result({**isa(), "rows": []}, str(tmp_path / "ok.json"), "ok.json")
    assert '"cpu_model"' in (tmp_path / "ok.json").read_text()


def test_every_bench_writer_records_the_cpu():
    """Each module that writes a benchmark JSON (write_result or kernels/bench.py's _write) calls isa()."""
    writers = {}
    for path in sorted((ROOT / "bench").glob("*.py")) + [ROOT / "kernels" / "bench.py"]:
        calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
                 for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)}
        if {"write_result", "_write"} & calls and path.name != "common.py":
            writers[path.name] = "isa" in calls
    assert len(writers) >= 7 and all(writers.values()), writers
