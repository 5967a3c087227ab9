"""The CPU library's interface (engine/cpu_kernels.h against its ctypes mirror in engine/cpu_library.py): a planted
mismatch of a struct or of the ABI version is refused at load in one line naming the header and the field, and every
prototype in the header matches the argtypes Python calls it with.

    python -m pytest tests/test_cpu_library.py -q
"""
import ctypes
import re

import pytest

import engine.cpu_library as cl
from engine.cpu_kernels import available

pytestmark = pytest.mark.skipif(not available(), reason="engine/qmatmul.c needs gcc and an AVX2 + FMA CPU")


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
    (lambda: ("ABI", 2), "MCL_CPU_ABI is 1 in the library, 2 here"),
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
    assert "engine/cpu_kernels.h" in str(e.value) and message in str(e.value) and "\n" not in str(e.value), str(e.value)


C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float, "double": ctypes.c_double,
           "void": None}


def header_prototypes() -> dict:
    """name -> (restype, argtypes) of every prototype in engine/cpu_kernels.h, as ctypes would spell them."""
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
        assert name in protos, f"{name}: bound in engine/cpu_library.py, not declared in engine/cpu_kernels.h"
        assert protos[name] == (restype, argtypes), f"{name}: header {protos[name]}, argtypes {(restype, argtypes)}"
    unbound = set(protos) - set(cl.SIGNATURES) - set(getattr(cl, "VARIANT_SYMBOLS", ()))
    assert not unbound, f"declared in engine/cpu_kernels.h but without argtypes: {sorted(unbound)}"
