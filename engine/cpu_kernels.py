"""The CPU block-quantised matmul (engine/qmatmul.c): built once with gcc, called through ctypes; its torch reference.

    from engine.cpu_kernels import qmatmul, qmatmul_ref, available
    y = qmatmul(x, w, scale, wmin, kind=8, group=32)     # x (M, K) fp32 -> y (M, N) fp32
    python -m engine.cpu_kernels                           # build (or find) the library and print its path

Why a C file and not a torch op: on this project's CPUs (AVX2, no AVX-512) torch's int4 / int8 weight-only kernels
(aten._weight_int4pack_mm_for_cpu, aten._weight_int8pack_mm) and its bf16 GEMV run 5x slower than a plain fp32
GEMV (bench/decode_speed.py --kernels), so a packed weight would be slower than the dense one. llama.cpp's answer,
used here: quantise the activations to int8 per 32 inputs and take integer dot products with the weight blocks.

The library is compiled into $MCL_CACHE/kernels/qmatmul-<sha of the source>.so on first use (about 2 s; needs gcc
and an AVX2 + FMA CPU). OpenMP comes from the libgomp torch has already loaded, so both share one thread pool;
the thread count follows torch.get_num_threads().
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SRC = Path(__file__).with_name("qmatmul.c")
_LIB = None


def _cpu_has_avx2() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def library() -> ctypes.CDLL:
    """The compiled kernel library (built on first call); RuntimeError with the reason when it cannot be built."""
    global _LIB
    if _LIB is not None:
        return _LIB
    if not _cpu_has_avx2():
        raise RuntimeError("engine/qmatmul.c needs an x86 CPU with AVX2 and FMA; load with weights='fp32' or 'bf16'")
    src = SRC.read_bytes()
    cache = Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite") / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"qmatmul-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not so.is_file():
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        cmd = ["gcc", "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", str(SRC), "-o", tmp]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            os.unlink(tmp)
            raise RuntimeError("building engine/qmatmul.c needs gcc on PATH") from None
        if r.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building engine/qmatmul.c failed: {' '.join(cmd)}\n{r.stderr.strip()[-2000:]}")
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.quantize_x.argtypes = [P, I, I, P, P, P, ctypes.c_int]
    lib.qmatmul.argtypes = [P, P, P, I, I, P, P, P, ctypes.c_int, ctypes.c_int, I, P, ctypes.c_int]
    lib.qmatmul_x.argtypes = [P, P, P, P, I, I, P, P, P, ctypes.c_int, ctypes.c_int, I, P, ctypes.c_int]
    lib.qmatmul_x.restype = None
    _LIB = lib
    return lib


def available() -> bool:
    try:
        library()
        return True
    except RuntimeError:
        return False


def quantize_x(x: torch.Tensor):
    """x (M, K) fp32 contiguous, K % 32 == 0 -> (qx int8 (M, K), dx fp32 (M, K/32), sx fp32 (M, K/16))."""
    M, K = x.shape
    qx = torch.empty(M, K, dtype=torch.int8)
    dx = torch.empty(M, K // 32)
    sx = torch.empty(M, K // 16)
    library().quantize_x(x.data_ptr(), M, K, qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), torch.get_num_threads())
    return qx, dx, sx


_SCRATCH = threading.local()     # per thread: (M, K) -> the activation buffers, reused by every call of that shape


def _scratch(M: int, K: int):
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    if (M, K) not in bufs:
        if len(bufs) > 64:                                              # prefill chunks of many lengths: stay bounded
            bufs.clear()
        bufs[M, K] = (torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32), torch.empty(M, K // 16))
    return bufs[M, K]


def qmatmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, wmin: torch.Tensor | None, kind: int,
            group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N) fp32 = x (M, K) @ W^T with W in the layout of engine/qmatmul.c (kind 8 or 4, group 16 or 32).
    One C call: quantise x into per-thread scratch buffers (no allocation after the first call of a shape), then
    the block matmul."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    M, K = x.shape
    N = scale.shape[0]
    qx, dx, sx = _scratch(M, K)
    y = torch.empty(M, N) if out is None else out
    library().qmatmul_x(x.data_ptr(), qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), M, K, w.data_ptr(),
                        scale.data_ptr(), None if wmin is None else wmin.data_ptr(), kind, group, N, y.data_ptr(),
                        torch.get_num_threads())
    return y


def quantize_x_ref(x: torch.Tensor):
    """The torch reference of quantize_x (round half to even, as nearbyintf in the default rounding mode)."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    d = xb.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, xb / torch.where(d > 0, d, 1)[..., None], 0).round()
    sx = (q.view(M, K // 16, 16).sum(-1) * d.repeat_interleave(2, dim=1))
    return q.to(torch.int8).view(M, K), d, sx


def unpack_q(w: torch.Tensor, kind: int) -> torch.Tensor:
    """Stored weights -> integer values (N, K) int16: kind 8 as stored, kind 4 nibbles in block order."""
    if kind == 8:
        return w.to(torch.int16)
    N = w.shape[0]
    b = w.view(N, -1, 16).to(torch.int16)
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(N, -1)


def dequantize(w, scale, wmin, kind: int, group: int) -> torch.Tensor:
    """The weights the kernel multiplies by, fp32 (N, K)."""
    q = unpack_q(w, kind).float()
    out = q * scale.repeat_interleave(group, dim=1)
    if wmin is not None:
        out = out + wmin.repeat_interleave(group, dim=1)
    return out


def qmatmul_ref(x, w, scale, wmin, kind: int, group: int) -> torch.Tensor:
    """What qmatmul computes, in float64: sum over groups of scale * dx * (q . qx) + min * sx."""
    qx, dx, sx = quantize_x_ref(x)
    M, K = qx.shape
    N = scale.shape[0]
    q = unpack_q(w, kind).double().view(N, K // group, group)
    xq = qx.double().view(M, K // group, group)
    dxg = dx.double().repeat_interleave(32 // group, dim=1) if group < 32 else dx.double()
    dots = torch.einsum("ngk,mgk->mng", q, xq)                                # (M, N, K/G)
    y = (dots * scale.double()[None] * dxg[:, None]).sum(-1)
    if wmin is not None:
        sxg = sx.double() if group == 16 else sx.double().view(M, -1, 2).sum(-1)
        y = y + (wmin.double()[None] * sxg[:, None]).sum(-1)
    return y


if __name__ == "__main__":
    library()
    print(sorted((Path(os.environ.get("MCL_CACHE") or Path.home() / ".cache" / "mapcoder-lite") / "kernels").glob("*.so")))
