"""A streaming GGUF header parser: metadata key/values and tensor infos, read with buffered `open` + `struct`.

Why: gguf.GGUFReader maps the whole file and builds numpy arrays for every part of every field; for
Qwen2.5-Coder-0.5B's 151,936-token vocabulary that is ~500 MB of transient resident memory (a process at 220 MB
peaked at 716 MB on the reader alone) and seconds of parsing, and it set the peak RSS of the q4 loader
(engine/loading/packed_model.py's load_gguf_packed), which needs only the metadata and where each tensor is. Here each value is read
once into plain Python objects; tensor bytes are never touched. The gguf package's reader stays the oracle for
tests and the loaders that need tensor data (engine/loading/weights.py).

    h = read_header("model.gguf")       # GGUFHeader(meta, tensors, alignment, data_start)
    h.meta["general.architecture"]      # == engine.loading.weights.gguf_metadata(open_gguf(path)), key for key
    python -m engine.loading.gguf_header model.gguf     # prints a summary

GGUF v2 and v3, little-endian. Nested arrays come back flattened, as GGUFReader's field.contents() gives them.
Bad input raises a one-line ValueError naming the file (FileNotFoundError for a missing one).
"""
from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUFValueType code -> struct format of one scalar (8 = string, 9 = array are handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_BIG_READ = 1 << 20          # reads larger than this are first checked against the bytes left in the file


@dataclass
class TensorInfo:
    """Where one tensor lies and what it is, without its data."""
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple                 # GGUF order: innermost first (GGUFReader's t.shape)
    data_offset: int             # absolute, in the file
    n_bytes: int                 # what the header says
    have_bytes: int              # what the file holds (less when truncated)


@dataclass
class GGUFHeader:
    meta: dict                   # key -> str, int, float, bool or a list of them ("GGUF.*" keys skipped)
    tensors: list                # [TensorInfo] in file order
    alignment: int               # general.alignment or 32
    data_start: int              # absolute offset of the tensor data section


class _Bad(Exception):
    """A reason the header is unreadable; read_header turns it into ValueError naming the file."""


def _read(f, n: int, size: int) -> bytes:
    if n > _BIG_READ and f.tell() + n > size:     # a corrupt length: do not allocate it
        raise _Bad(f"truncated header at byte {f.tell()} (needs {n} bytes, file has {size})")
    b = f.read(n)
    if len(b) != n:
        raise _Bad(f"truncated header at byte {f.tell() - len(b)} (needs {n} bytes, file has {size})")
    return b


def _str(f, size: int) -> str:
    b = _read(f, struct.unpack("<Q", _read(f, 8, size))[0], size)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"string at byte {f.tell() - len(b)} is not UTF-8") from None


def _value(f, vtype: int, key: str, size: int):
    """One value of GGUFValueType `vtype`: a Python scalar, str, or a (flattened) list."""
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack("<" + fmt, _read(f, struct.calcsize(fmt), size))[0]
    if vtype == 8:
        return _str(f, size)
    if vtype != 9:
        raise _Bad(f"unknown value type {vtype} in key {key!r}")
    itype, n = struct.unpack("<IQ", _read(f, 12, size))
    if itype in _SCALARS:                                  # one read and one unpack for the whole array
        fmt = _SCALARS[itype]
        return list(struct.unpack(f"<{n}{fmt}", _read(f, n * struct.calcsize(fmt), size)))
    if itype == 8:
        return [_str(f, size) for _ in range(n)]
    out = []
    for _ in range(n):                                     # arrays of arrays, flattened like field.contents()
        out.extend(_value(f, itype, key, size))
    return out


def _parse(f, size: int) -> GGUFHeader:
    magic = f.read(4)
    if magic != b"GGUF":
        raise _Bad(f"not a GGUF file (expected magic b'GGUF' in the first 4 bytes, got {magic!r})")
    version = struct.unpack("<I", _read(f, 4, size))[0]
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version} (read: 2 and 3, little-endian)")
    n_tensors, n_kv = struct.unpack("<QQ", _read(f, 16, size))
    meta = {}
    for _ in range(n_kv):
        key = _str(f, size)
        if key in meta:
            raise _Bad(f"duplicate key {key!r}")
        v = _value(f, struct.unpack("<I", _read(f, 4, size))[0], key, size)
        if not key.startswith("GGUF."):                    # as engine.loading.weights.gguf_metadata
            meta[key] = v
    raw = []
    for _ in range(n_tensors):
        name = _str(f, size)
        n_dims = struct.unpack("<I", _read(f, 4, size))[0]
        dims = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims, size))
        raw.append((name, dims) + struct.unpack("<IQ", _read(f, 12, size)))
    align = meta.get("general.alignment", 32)
    if type(align) is not int or align <= 0 or align & (align - 1):
        raise _Bad(f"general.alignment {align!r} is not a power of two")
    data_start = -(-f.tell() // align) * align
    tensors, seen = [], set()
    for name, dims, ttype, rel in raw:
        if name in seen:
            raise _Bad(f"duplicate tensor {name!r}")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"unknown tensor type {ttype} of tensor {name!r}") from None
        n_el = 1
        for d in dims:
            n_el *= d
        n_bytes, off = n_el * type_size // block, data_start + rel
        tensors.append(TensorInfo(name, qtype, dims, off, n_bytes, max(0, min(n_bytes, size - off))))
    return GGUFHeader(meta, tensors, align, data_start)


def read_header(path) -> GGUFHeader:
    """The metadata and tensor infos of the GGUF file at `path` (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a GGUF file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb", buffering=1 << 16) as f:
        try:
            return _parse(f, os.fstat(f.fileno()).st_size)
        except _Bad as e:
            raise ValueError(f"{path}: {e}") from None
        except RecursionError:                             # arrays of arrays of ... nested 100k deep
            raise ValueError(f"{path}: metadata arrays nested deeper than the reader allows") from None


if __name__ == "__main__":
    h = read_header(sys.argv[1])
    print(f"{len(h.meta)} keys, {len(h.tensors)} tensors, alignment {h.alignment}, data at byte {h.data_start}")
    for k, v in h.meta.items():
        print(f"  {k} = {v[:5] + ['...'] if isinstance(v, list) and len(v) > 5 else v!r}")
