"""engine/loading/gguf_header.py against the gguf package's GGUFReader (the oracle): the embedded models' headers, small
files of every value type written with GGUFWriter, and bad input. Run: python -m pytest -q tests/test_gguf_header.py
(the Qwen comparison runs when its GGUF is cached or MCL_TEST_QWEN=1; GGUFReader spends ~8 s on its vocabulary)."""
import os
import struct

import gguf
import numpy as np
import pytest

from engine.loading.gguf_header import read_header
from engine.loading.weights import gguf_metadata, open_gguf

Q, V = gguf.GGMLQuantizationType, gguf.GGUFValueType


def assert_same_as_reader(path):
    h, r = read_header(path), open_gguf(path)
    want = gguf_metadata(r)
    assert list(h.meta) == list(want)
    for k, v in want.items():                    # equal values of equal types, element by element for lists
        assert h.meta[k] == v and type(h.meta[k]) is type(v), k
        if isinstance(v, list):
            assert [type(x) for x in h.meta[k]] == [type(x) for x in v], k
    assert (h.alignment, h.data_start) == (r.alignment, r.data_offset)
    assert [(t.name, t.tensor_type, t.shape, t.data_offset, t.n_bytes, t.have_bytes) for t in h.tensors] == \
        [(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes),
          int(t.data.nbytes)) for t in r.tensors]
    return h


def test_smollm2_header_matches_reader():
    from engine.loading.hub import model_path
    h = assert_same_as_reader(model_path("smollm2-135m"))
    assert h.meta["general.architecture"] == "llama" and len(h.meta["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_qwen_header_matches_reader():
    from engine.loading.hub import EMBEDDED, cache_dir, model_path
    if not (os.environ.get("MCL_TEST_QWEN") or (cache_dir() / EMBEDDED["qwen2.5-coder-0.5b"].filename).is_file()):
        pytest.skip("Qwen2.5-Coder-0.5B GGUF not cached; set MCL_TEST_QWEN=1 to fetch it (491 MB)")
    h = assert_same_as_reader(model_path("qwen2.5-coder-0.5b"))
    assert len(h.meta["tokenizer.ggml.tokens"]) == 151936
    assert {t.tensor_type.name for t in h.tensors} >= {"Q4_K", "Q5_0", "Q6_K"}


SCALARS = {"u8": (V.UINT8, 200), "i8": (V.INT8, -100), "u16": (V.UINT16, 60000), "i16": (V.INT16, -30000),
           "u32": (V.UINT32, 4_000_000_000), "i32": (V.INT32, -2_000_000_000), "f32": (V.FLOAT32, 0.1),
           "b": (V.BOOL, True), "s": (V.STRING, "héllo ✓"), "u64": (V.UINT64, 2**63 + 5), "i64": (V.INT64, -2**62),
           "f64": (V.FLOAT64, 0.1)}


def write_synthetic(path, alignment=64):
    """Every scalar type, an array of each, strings, bools, nested arrays, and tensors of three types."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(alignment)
    for k, (t, v) in SCALARS.items():
        w.add_key_value(f"x.{k}", v, t)
        if t != V.STRING:
            w.add_key_value(f"x.arr_{k}", [v, v, v], V.ARRAY, sub_type=t)
    w.add_array("x.strings", ["a", "", "ü", "<|im_end|>"])
    w.add_array("x.bools", [True, False, True])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_array("x.nested_str", [["a", "b"], ["c"]])
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.ones(5, dtype=np.float16))
    w.add_tensor("c", np.zeros((4, 34), dtype=np.uint8), raw_dtype=Q.Q8_0)   # byte shape -> (4, 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type(tmp_path):
    h = assert_same_as_reader(write_synthetic(tmp_path / "s.gguf"))
    m = h.meta
    for k, (t, v) in SCALARS.items():
        want = float(np.float32(v)) if t == V.FLOAT32 else v
        assert m[f"x.{k}"] == want and type(m[f"x.{k}"]) is type(v), k
        if t != V.STRING:
            assert m[f"x.arr_{k}"] == [want] * 3, k
    assert m["x.strings"] == ["a", "", "ü", "<|im_end|>"] and m["x.bools"] == [True, False, True]
    assert m["x.nested"] == [1, 2, 3] and m["x.nested_str"] == ["a", "b", "c"]      # flattened, as the reader
    assert h.alignment == 64 and h.data_start % 64 == 0
    a, b, c = h.tensors
    assert (a.tensor_type, a.shape, a.n_bytes, a.data_offset) == (Q.F32, (3, 2), 24, h.data_start)
    assert (b.tensor_type, b.shape, b.n_bytes) == (Q.F16, (5,), 10)
    assert (c.tensor_type, c.shape, c.n_bytes, c.have_bytes) == (Q.Q8_0, (32, 4), 136, 136)


def test_version_2(tmp_path):
    p = write_synthetic(tmp_path / "v2.gguf")
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)                     # v2 and v3 share the little-endian layout
    p.write_bytes(data)
    assert_same_as_reader(p)


def test_truncated_tensor_data_is_counted_not_raised(tmp_path):
    p = write_synthetic(tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[:-100])
    c = read_header(p).tensors[-1]
    assert c.n_bytes == 136 and 0 < c.have_bytes == p.stat().st_size - c.data_offset < 136


def bad(path, *words):
    with pytest.raises(ValueError) as e:
        read_header(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and all(w in msg for w in words), msg


def test_not_gguf_and_unsupported_version(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    bad(tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "e.gguf").write_bytes(b"")
    bad(tmp_path / "e.gguf", "not a GGUF file")
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    bad(tmp_path / "v.gguf", "unsupported GGUF version 1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_header(tmp_path / "nope.gguf")
    bad(tmp_path, "is a directory")


def test_truncated_header(tmp_path):
    from engine.loading.hub import model_path
    src = model_path("smollm2-135m")
    data_start = read_header(src).data_start
    with open(src, "rb") as f:
        head = f.read(data_start)
    for cut in (6, 20, 1000, 1_000_000, data_start - 40):     # in the counts, a key, the vocabulary, tensor infos
        (tmp_path / "m.gguf").write_bytes(head[:cut])
        bad(tmp_path / "m.gguf", "truncated header at byte")


def test_unknown_value_and_tensor_type(tmp_path):
    p = write_synthetic(tmp_path / "s.gguf")
    data = p.read_bytes()
    at = data.index(b"x.u16") + len(b"x.u16")                 # the key's value type follows its name
    p.write_bytes(data[:at] + struct.pack("<I", 77) + data[at + 4:])
    bad(p, "unknown value type 77", "'x.u16'")
    at = data.rindex(b"\x01\x00\x00\x00\x00\x00\x00\x00b") + 9 + 4 + 8   # tensor "b": name, n_dims 1, dims
    p.write_bytes(data[:at] + struct.pack("<I", 999) + data[at + 4:])
    bad(p, "unknown tensor type 999", "'b'")
