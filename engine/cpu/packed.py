"""Packed weights for fast CPU inference: a GGUF's quantised blocks kept at (nearly) their own size, no fp32 copy.

A batch-1 decode step streams every weight once, so its speed is bytes per step and the work done per byte.
`PackedLinear` holds one projection in a layout of engine/cpu/qblocks.h (integer values in 32-weight blocks +
per-group scales and optional mins) and multiplies through that kernel: activations quantised to int8 per 32 inputs,
exact integer block dot products, as llama.cpp does on the CPU. Many rows at once (prefill, a batch of requests) go
through dequantised fp32 tiles and torch's SGEMM instead (engine/cpu/kernels.py). A PackedLinear is a plain object,
not a module: engine/cpu/modules.py's modules hold them, and engine/loading/packed_model.py builds them from a file.

    pk = PackedLinear.from_gguf(raw_bytes, "Q6_K", n_rows, n_cols)          # one tensor
    y = pk(x)                                                                # x (..., in) -> (..., out), fp32

Layouts (w = scale * q + min per group of G inputs along a row; all exact: the integers and scales the file
encodes, tests/test_quant.py checks each against the gguf package's dequantisation):
  type  bits/w in file  stored as (engine/cpu/qblocks.h's kinds)                              bits/w here
  Q4_0  4.5             kind 4 nibbles, fp16 scale d, fp16 min -8d, G 32                       5
  Q4_1  5               kind 4 nibbles, fp16 scale d, fp16 min m, G 32                         5
  Q4_K  4.5             kind 4 nibbles, int8 sc x fp32 d, int8 m x fp32 -dmin, G 32            4.625
  Q5_0  5.5             kind 5 nibbles + high-bit plane (q - 16), fp16 scale d, G 32           5.5
  Q8_0  8.5             kind 8 int8, fp16 scale d, G 32                                        8.5
  Q6_K  6.56            kind 6 nibbles + 2-bit plane (q - 32), int8 sc x fp32 d, G 16          6.625
The K-quants keep their sub-block scales as small integers beside one fp32 per 256 weights: d * sc (fp16 times
6 or 8 bits) is exact in fp32 but not in fp16. Types we do not pack (Q5_1, Q2_K, Q3_K, Q5_K, IQ*, and dense F32/F16
projections) raise an error naming the tensor (the loader may instead dequantise them to a dense fp32 weight).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q5_0": (32, 22), "Q8_0": (32, 34),
               "Q6_K": (256, 210)}                       # type -> (weights per block, bytes per block)
PACKED_TYPES = tuple(BLOCK_BYTES)
KIND_BYTES = {8: 32, 4: 16, 5: 20, 6: 24}                # kind -> bytes per 32 weights (engine/cpu/qblocks.h)
_FIELDS = ("w", "scale", "wmin", "sd", "md")


class PackedLinear:
    """y = x W^T with W (out, in) in a layout of engine/cpu/qblocks.h (kind 8, 4, 5 or 6) or, for kind 0, dense.

    w: int8 (out, in) for kind 8, uint8 (out, in/32 * bytes per block) for kinds 4/5/6, the dense weight for kind 0;
    scale / wmin: fp16 (out, in/group), or int8 with fp32 sd / md (out, in/256); wmin None when there are no mins."""

    def __init__(self, kind: int, group: int, w: torch.Tensor, scale: torch.Tensor | None = None,
                 wmin: torch.Tensor | None = None, source: str = "", sd: torch.Tensor | None = None,
                 md: torch.Tensor | None = None):
        if kind not in (0, 4, 5, 6, 8) or (kind and group not in (16, 32)) or (kind in (4, 5) and group != 32):
            raise ValueError(f"PackedLinear: kind {kind} with group {group} is not a layout of engine/cpu/qblocks.h")
        if wmin is not None and group != 32:
            raise ValueError("PackedLinear: mins need groups of 32")
        for s, d in ((scale, sd), (wmin, md)):
            if s is not None and s.dtype != torch.float16 and (s.dtype != torch.int8 or d is None):
                raise ValueError("PackedLinear: scales and mins are fp16, or int8 with an fp32 scale per 256 weights")
        self.kind, self.group, self.w, self.scale, self.wmin, self.source = kind, group, w, scale, wmin, source
        self.sd, self.md = sd, md
        self.out_features = w.shape[0]
        self.in_features = w.shape[1] if kind in (0, 8) else w.shape[1] // KIND_BYTES[kind] * 32
        self._args = None

    def args(self) -> tuple:
        """engine.cpu.kernels.weight_args of this weight (computed once: the tensors do not move)."""
        if self._args is None:
            from engine.cpu.kernels import weight_args
            self._args = weight_args(self.w, self.scale, self.wmin, self.kind, self.group, self.sd, self.md)
        return self._args

    # --- use --------------------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) of any float dtype -> (..., out) fp32."""
        _check_width(x, self.in_features, self.source)
        x2 = x.reshape(-1, self.in_features)
        if self.kind == 0:
            y = F.linear(x2.to(self.w.dtype), self.w).float()
        else:
            from engine.cpu.kernels import qmatmul
            y = qmatmul(x2, [self.args()], out=out)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights the kernel multiplies by, fp32 (out, in), or just `rows` (an embedding lookup)."""
        if self.kind == 0:
            return (self.w if rows is None else self.w[rows]).float()
        from engine.cpu.kernels import dequant
        return dequant(self.args(), rows=rows)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> rows (B, T, in) fp32: the embedding table kept in its packed form."""
        return self.dequantize(tokens.reshape(-1)).view(*tokens.shape, self.in_features)

    def nbytes(self) -> int:
        """Bytes one call reads."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict:
        return {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not None}

    def _with(self, fn) -> "PackedLinear":
        """The same layout with fn applied to every tensor (row selection)."""
        t = {f: (None if getattr(self, f) is None else fn(getattr(self, f))) for f in _FIELDS}
        return PackedLinear(self.kind, self.group, t["w"], t["scale"], t["wmin"], self.source, t["sd"], t["md"])

    def permute_rows(self, perm: torch.Tensor) -> "PackedLinear":
        return self._with(lambda t: t[perm].contiguous())

    def row_slice(self, start: int, stop: int) -> "PackedLinear":
        """Output rows start..stop-1 as views (no copy)."""
        return self._with(lambda t: t[start:stop])

    def layout(self) -> tuple:
        return (self.kind, self.group) + tuple((f, getattr(self, f).dtype) for f in _FIELDS if getattr(self, f) is not None)

    @staticmethod
    def cat(parts: list["PackedLinear"]) -> "PackedLinear | PackedParts | None":
        """Projections stacked along the output (fused QKV, gate/up): one call instead of several. Equal layouts
        give one PackedLinear; different ones a PackedParts (x quantised once, one kernel call per part); None
        when a part is dense."""
        if any(p.kind == 0 for p in parts):
            return None
        if len({p.layout() for p in parts}) > 1:
            return PackedParts(parts)
        t = {f: (None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])) for f in _FIELDS}
        return PackedLinear(parts[0].kind, parts[0].group, t["w"], t["scale"], t["wmin"],
                            "+".join(p.source for p in parts), t["sd"], t["md"])

    @staticmethod
    def fuse(modules) -> "PackedLinear | PackedParts | None":
        """cat() of the modules' `packed` copies. One PackedLinear: each module's `packed` becomes a view of its rows
        of the fused copy, so the weights are held once (a PackedParts holds the modules' own copies)."""
        fused = PackedLinear.cat([m.packed for m in modules])
        if isinstance(fused, PackedLinear):
            start = 0
            for m in modules:
                stop = start + m.packed.out_features
                m.packed = fused.row_slice(start, stop)
                start = stop
        return fused

    # --- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, data: np.ndarray, type_name: str, n_rows: int, n_cols: int, name: str = "tensor") -> "PackedLinear":
        """Raw GGUF bytes of one (n_rows, n_cols) tensor -> its packed layout (see the table above)."""
        if type_name not in BLOCK_BYTES:
            raise ValueError(f"{name}: GGUF block type {type_name} is not packed (packed: {', '.join(PACKED_TYPES)}); "
                             f"load with dense_fallback=True to dequantise it to fp32")
        per, nbytes = BLOCK_BYTES[type_name]
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if n_cols % per or raw.size != n_rows * n_cols // per * nbytes:
            raise ValueError(f"{name}: {type_name} data of {raw.size} bytes does not hold {n_rows}x{n_cols} weights")
        raw = raw.reshape(-1, nbytes)                                              # (blocks, bytes)
        kind, group, fields = _DECODERS[type_name](raw)
        t = {f: torch.from_numpy(np.ascontiguousarray(a)).reshape(n_rows, -1) for f, a in fields.items()}
        return cls(kind, group, t["w"], t.get("scale"), t.get("wmin"), type_name, t.get("sd"), t.get("md"))

    @classmethod
    def from_gguf_file(cls, f, offset: int, type_name: str, n_rows: int, n_cols: int, name: str = "tensor",
                       chunk_weights: int = 1 << 20) -> "PackedLinear":
        """As from_gguf, reading the tensor's bytes at `offset` of the open file `f` in row chunks of about
        `chunk_weights` weights: the decoding scratch stays a few MB and no page of the file stays mapped (a memmap
        of the GGUF would count the whole file in the process's resident memory)."""
        if type_name not in BLOCK_BYTES:
            return cls.from_gguf(np.zeros(0, np.uint8), type_name, n_rows, n_cols, name)       # raises, naming it
        per, nbytes = BLOCK_BYTES[type_name]
        row_bytes = n_cols // per * nbytes
        step = max(1, chunk_weights // n_cols)
        full = None
        for r0 in range(0, n_rows, step):
            n = min(step, n_rows - r0)
            raw = np.frombuffer(os.pread(f.fileno(), n * row_bytes, offset + r0 * row_bytes), dtype=np.uint8)
            if raw.size != n * row_bytes:
                raise ValueError(f"{name}: truncated GGUF file ({raw.size} of {n * row_bytes} bytes at row {r0})")
            part = cls.from_gguf(raw, type_name, n, n_cols, name)
            if full is None:                                                 # the whole tensor, filled chunk by chunk
                full = part._with(lambda t: torch.empty((n_rows, t.shape[1]), dtype=t.dtype))
            for fld, t in part._tensors().items():
                getattr(full, fld)[r0:r0 + n] = t
        return full

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "PackedLinear":
        """A dense (out, in) weight re-quantised to Q8_0's layout (int8 per 32 inputs, fp16 scale amax / 127): for HF
        directories and tests. in % 32 != 0 keeps the weight dense (kind 0)."""
        n, k = w.shape
        if k % 32:
            return cls(0, 32, w.detach().float().contiguous(), source="dense")
        wb = w.detach().float().reshape(n, k // 32, 32)
        d = (wb.abs().amax(-1) / 127).half()
        q = (wb / torch.where(d > 0, d, 1).float()[..., None]).round().clamp(-127, 127).to(torch.int8)
        return cls(8, 32, q.reshape(n, k).contiguous(), d.contiguous(), None, "requant_q8_0")


class PackedParts:
    """Several packed weights of one input side by side (a fused call whose parts have different layouts): x is
    quantised once, each part writes its columns of y."""

    def __init__(self, parts: list[PackedLinear]):
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.source = "+".join(p.source for p in parts)
        self._args = [p.args() for p in parts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from engine.cpu.kernels import qmatmul
        _check_width(x, self.in_features, self.source)
        return qmatmul(x.reshape(-1, self.in_features), self._args).view(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


def _check_width(x: torch.Tensor, n: int, source: str) -> None:
    if x.shape[-1] != n:
        raise ValueError(f"packed weight ({source}): x has {x.shape[-1]} columns, the weight {n}")


def _f16(raw: np.ndarray, off: int) -> np.ndarray:
    """(blocks,) fp16 field at byte `off` of each block, as stored (fp16)."""
    return raw[:, off:off + 2].copy().view(np.float16)[:, 0]


def _nibbles_to_blocks(q: np.ndarray) -> np.ndarray:
    """q (blocks32, 32) in 0..15 -> (blocks32, 16) bytes, element j low nibble, element j + 16 high nibble."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _bit_planes(hi: np.ndarray, bits: int) -> np.ndarray:
    """hi (blocks32, 32) high parts of `bits` bits -> (blocks32, 32 * bits / 8) bytes: element e's bits at bit
    bits * (e // P) of byte e % P, P = 32 * bits / 8 (the order engine/cpu/qblocks.h unpacks with one variable shift)."""
    P = 32 * bits // 8
    out = np.zeros((hi.shape[0], P), np.uint8)
    for e in range(32):
        out[:, e % P] |= (hi[:, e].astype(np.uint8) << (bits * (e // P))).astype(np.uint8)
    return out


def _q4_0(raw):
    d = _f16(raw, 0)
    return 4, 32, {"w": raw[:, 2:18], "scale": d, "wmin": (-8 * d.astype(np.float32)).astype(np.float16)}


def _q4_1(raw):
    return 4, 32, {"w": raw[:, 4:20], "scale": _f16(raw, 0), "wmin": _f16(raw, 2)}


def _q8_0(raw):
    return 8, 32, {"w": raw[:, 2:34].view(np.int8), "scale": _f16(raw, 0)}


def _q5_0(raw):
    qh = raw[:, 2:6].copy().view("<u4")[:, 0]                                      # bit j = high bit of element j
    hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (blocks, 32)
    return 5, 32, {"w": np.concatenate([raw[:, 6:22], _bit_planes(hi, 1)], axis=1), "scale": _f16(raw, 0)}


def _q4_k(raw):
    """ggml's block_q4_K: d, dmin (fp16), 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes of nibbles; in each
    64-input chunk j the 32 bytes hold sub-block 2j in their low and 2j+1 in their high nibbles."""
    d, dmin = _f16(raw, 0).astype(np.float32), _f16(raw, 2).astype(np.float32)
    s = raw[:, 4:16].astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)    # (blocks, 8)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    qs = raw[:, 16:144].reshape(-1, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 32)                       # (blocks * 8, 32) sub-blocks
    return 4, 32, {"w": _nibbles_to_blocks(q), "scale": sc.astype(np.int8), "sd": d, "wmin": mn.astype(np.int8),
                   "md": -dmin}


def _q6_k(raw):
    """ggml's block_q6_K: 128 bytes low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d (fp16)."""
    ql, qh = raw[:, 0:128].reshape(-1, 2, 64), raw[:, 128:192].reshape(-1, 2, 32)
    a, b = ql[:, :, :32], ql[:, :, 32:]
    q = np.stack([(a & 15) | ((qh & 3) << 4), (b & 15) | (((qh >> 2) & 3) << 4),
                  (a >> 4) | (((qh >> 4) & 3) << 4), (b >> 4) | (((qh >> 6) & 3) << 4)], axis=2)  # (blocks, 2, 4, 32)
    q = q.reshape(-1, 32)                                                          # (blocks * 8, 32) in 0..63
    w = np.concatenate([_nibbles_to_blocks(q & 15), _bit_planes(q >> 4, 2)], axis=1)
    return 6, 16, {"w": w, "scale": raw[:, 192:208].view(np.int8), "sd": _f16(raw, 208).astype(np.float32)}


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_0": _q5_0, "Q8_0": _q8_0, "Q6_K": _q6_k}
