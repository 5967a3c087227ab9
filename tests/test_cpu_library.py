"""The CPU library's interface (engine/cpu/cpu_kernels.h against its ctypes mirror in engine/cpu/library.py): a planted
mismatch of a struct or of the ABI version is refused at load in one line naming the header and the field, and every
prototype in the header matches the argtypes Python calls it with.

    python -m pytest tests/test_cpu_library.py -q
"""
import ctypes
import re

import pytest

from engine.cpu.kernels import available
import engine.cpu.library as cl

pytestmark = pytest.mark.skipif(not available(), reason="engine/cpu/qmatmul.c needs gcc and an AVX2 + FMA CPU")


def _with_field(cls, fields):
    return type(cls.__name__, (ctypes.Structure,), {"_fields_": fields})


@pytest.mark.parametrize("plant,message", [
    (lambda: ("QWeight", _with_field(cl.QWeight, cl.QWeight._fields_ + [("extra", ctypes.c_int64)])),
     "QWeight.extra is in the mirror, not in the header"),
    (lambda: ("DecodeLayer", _with_field(cl.DecodeLayer, [(f, ctypes.c_float if f == "eps" else t)
                                                          for f, t in cl.DecodeLayer._fields_])),
     "DecodeLayer.eps at offset 40 size 8 in C, offset 40 size 4 here"),
    (lambda: ("LoraW", _with_field(cl.LoraW, [cl.LoraW._fields_[i] for i in (1, 0, 2, 3)])),
     "LoraW.B at offset 8 size 8 in C, offset 0 size 8 here"),
    (lambda: ("ABI", cl.ABI_VERSION + 1), f"MCL_CPU_ABI is {cl.ABI_VERSION} in the library, {cl.ABI_VERSION + 1} here"),
])
def test_a_planted_mismatch_is_refused_at_load_in_one_line(monkeypatch, plant, message):
    name, value = plant()
    if name == "ABI":
        monkeypatch.setattr(cl, "ABI_VERSION", value)
    else:
        monkeypatch.setitem(cl.STRUCTS, name, value)
    monkeypatch.setattr(cl, "_LIB", None)                      # load again (the library itself is cached on disk)
    with pytest.raises(RuntimeError) as e:
        cl.library()
    assert "engine/cpu/cpu_kernels.h" in str(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double,
           "void": None}


def header_prototypes() -> dict:
    """name -> (restype, argtypes) of every prototype in engine/cpu/cpu_kernels.h, as ctypes would spell them."""
    text = (cl.HERE / "cpu_kernels.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"^#.*?(?<!\\)$", "", text, flags=re.S | re.M)             # preprocessor lines, continued ones too
    out = {}
    for ret, name, params in re.findall(r"([\w ]+?\**)\s*\b(\w+)\(([^()]*)\);", text):
        ptype = lambda p: ctypes.c_void_p if "*" in p else C_TYPES[p.replace("const", "").split()[0]]
        args = [] if params.strip() in ("", "void") else [ptype(p) for p in params.split(",")]
        out[name] = (ptype(ret.split()[-1] if "*" not in ret else "*"), args)
    return out


def test_every_prototype_in_the_header_matches_the_argtypes():
    protos = header_prototypes()
    assert {"qmatmul", "decode_layer", "mcl_layout"} <= set(protos)           # the parser found them
    for name, (restype, argtypes) in cl.SIGNATURES.items():
        assert name in protos, f"{name}: bound in engine/cpu/library.py, not declared in engine/cpu/cpu_kernels.h"
        assert protos[name] == (restype, argtypes), f"{name}: header {protos[name]}, argtypes {(restype, argtypes)}"
    unbound = set(protos) - set(cl.SIGNATURES)                 # (qmatmul's variants are declared by __typeof__)
    assert not unbound, f"declared in engine/cpu/cpu_kernels.h but without argtypes: {sorted(unbound)}"


def _runnable_variant() -> str:
    """A variant other than AVX2 that this CPU runs (the test skips, naming what the CPU lacks, when there is none)."""
    others = [n for n in cl.VARIANTS if n != "avx2"]
    ok = [n for n in others if not cl.missing_flags(n)]
    if not ok:
        pytest.skip("no ISA variant other than AVX2 runs on this CPU: " +
                    "; ".join(f"{n} needs {', '.join(cl.missing_flags(n))}" for n in others))
    return ok[-1]


def test_a_variant_that_disagrees_with_avx2_falls_back_with_one_warning_line(monkeypatch, tmp_path, capsys):
    """The first load on a CPU checks the chosen variant against AVX2; planted here: its outputs off by 1e-3
    (the check's input, on the Python side). AVX2 runs instead, one line on stderr says why, and the verdict is kept:
    the next load falls back again without running the check."""
    name = _runnable_variant()
    real = cl._variant_output
    monkeypatch.setattr(cl, "_variant_output", lambda lib, n, case: real(lib, n, case) * (1 + 1e-3 * (n != "avx2")))
    monkeypatch.setattr(cl, "_verdict_file", lambda so: tmp_path / "verdicts.json")
    monkeypatch.delenv("MCL_CPU_ISA", raising=False)
    try:
        for load in range(2):
            monkeypatch.setattr(cl, "_LIB", None)
            cl.library()
            assert cl.isa() == "avx2"
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"the {name} kernels disagree with AVX2" in err[0], err
            assert "max relative difference 1.00e-03" in err[0], err
            monkeypatch.setattr(cl, "check_variant", lambda *a: pytest.fail("the verdict was not reused"))
    finally:
        monkeypatch.undo()
        cl.select_isa()
    assert cl.isa() == name                                       # undone: the variant agrees again


def test_mcl_cpu_isa_forces_a_variant_at_load_and_is_refused_by_name_when_it_cannot_run(monkeypatch):
    monkeypatch.setenv("MCL_CPU_ISA", "avx2")
    monkeypatch.setattr(cl, "_LIB", None)
    try:
        assert cl.library() and cl.isa() == "avx2"
        with pytest.raises(ValueError, match=r"MCL_CPU_ISA='sse2': expected one of avx2, avxvnni, avx512vnni"):
            cl.select_isa("sse2")
        for name in cl.VARIANTS:
            if cl.missing_flags(name):
                with pytest.raises(RuntimeError, match=f"MCL_CPU_ISA={name}: this CPU lacks"):
                    cl.select_isa(name)
    finally:
        monkeypatch.undo()
        cl.select_isa()
