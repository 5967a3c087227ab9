"""The CPU block-quantised matmul (engine/cpu/qmatmul.c): built once with gcc, called through ctypes; its torch reference.

    from engine.cpu.kernels import qmatmul, weight_args, qmatmul_ref, available, check_available
    reason = check_available()                             # None, or why the library cannot run here (one line)
    args = weight_args(w, scale, wmin, kind=8, group=32)   # one packed weight (layouts: engine/cpu/qblocks.h's header)
    y = qmatmul(x, [args])                                 # x (M, K) fp32 -> y (M, N) fp32; several weights: [y1|y2]
    out = decode_attention(q, k, v, cos, sin, kc, vc, slots, pos)  # RoPE + KV write + attention, one decode token
    python -m engine.cpu.library                           # build (or find) the library and print its path

Why a C file and not a torch op: on this project's CPUs (AVX2, no AVX-512) torch's int4 / int8 weight-only kernels
(aten._weight_int4pack_mm_for_cpu, aten._weight_int8pack_mm) and its bf16 GEMV run 5x slower than a plain fp32
GEMV (bench/decode_speed.py --kernels), so a packed weight would be slower than the dense one. llama.cpp's answer,
used here: quantise the activations to int8 per 32 inputs and take integer dot products with the weight blocks.
That wins while a call reads each weight for a few rows of x; from dequant_min_m() rows on (prefill, a batch of
concurrent requests) the weights are instead dequantised tile by tile into fp32 and multiplied by torch's SGEMM,
whose arithmetic rate is several times the integer kernel's.

engine/cpu/library.py compiles the library into $MCL_CACHE/kernels/qmatmul-<sha>.so on first use (a few seconds;
needs gcc and an AVX2 + FMA + F16C CPU: check_available() says up front, without compiling, whether this machine has
them, so that a caller asking for packed weights fails, or falls back, before any work), checks it against engine/cpu/cpu_kernels.h and picks the ISA variant of the
integer kernels this CPU runs best (AVX2, AVX-VNNI or AVX512-VNNI; MCL_CPU_ISA forces one). OpenMP comes from the
libgomp torch has already loaded, so both share one thread pool; the thread count follows torch.get_num_threads().
"""
from __future__ import annotations

import os
import threading

import torch

from engine.cpu.library import check_available, library    # noqa: F401 -- check_available: hub, main job
from kernels.cpu_info import native_bf16

BLOCK_BYTES = {8: 32, 4: 16, 5: 20, 6: 24}      # kind -> bytes per 32 weights in a row (engine/cpu/qblocks.h)
TILE_WEIGHTS = 1 << 19                          # weights dequantised per SGEMM call (2 MB of fp32 scratch)
BF16_TILE_WEIGHTS = 1 << 23                     # per bf16 GEMM call (16 MB of bf16 scratch: 1.5B's gate|up in 4)


def dequant_min_m() -> int:
    """Rows of x from which dequantise + SGEMM wins over the integer kernel (bench/decode_speed.py --kernels): 64, or
    MCL_DEQUANT_MIN_M (read at each call)."""
    v = os.environ.get("MCL_DEQUANT_MIN_M", "")
    try:
        return int(v) if v else 64
    except ValueError:
        raise ValueError(f"MCL_DEQUANT_MIN_M={v!r}: expected an integer") from None


def available() -> bool:
    try:
        library()
        return True
    except RuntimeError:
        return False


def _enc(s: torch.Tensor | None) -> int:
    """Scale encoding for the C code: 1 = fp16 per group, 2 = int8 per group times fp32 per 256 weights."""
    return 0 if s is None else 1 if s.dtype == torch.float16 else 2


def weight_args(w, scale, wmin, kind: int, group: int, sd=None, md=None) -> tuple:
    """The C arguments of one packed weight: (w, scale, sd, senc, wmin, md, menc, kind, group, N, K). Pointers only:
    the caller keeps the tensors alive (engine/cpu/packed.py's PackedLinear holds both)."""
    ptr = lambda t: None if t is None else t.data_ptr()
    K = w.shape[1] // BLOCK_BYTES[kind] * 32 if kind != 8 else w.shape[1]
    return (ptr(w), ptr(scale), ptr(sd), _enc(scale), ptr(wmin), ptr(md), _enc(wmin), kind, group, w.shape[0], K)


_SCRATCH = threading.local()     # per thread: (M, K) -> the activation buffers, reused by every call of that shape


def _scratch(M: int, K: int):
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    if (M, K) not in bufs:
        if len(bufs) > 64:                                              # prefill chunks of many lengths: stay bounded
            bufs.clear()
        bufs[M, K] = (torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // 32), torch.empty(M, K // 32))
    return bufs[M, K]


def qmatmul(x: torch.Tensor, parts: list[tuple], out: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, N1 + N2 + ...) fp32 = x (M, K) @ [W1; W2; ...]^T for packed weights given by weight_args tuples.

    Fewer than dequant_min_m() rows: one quantisation of x into per-thread scratch (no allocation after the first call
    of a shape), then one integer-kernel call per weight, each writing its columns of y. More rows: dequant + SGEMM."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    M, K = x.shape
    N = sum(p[9] for p in parts)
    y = torch.empty(M, N) if out is None else out
    lib, nt = library(), torch.get_num_threads()
    if M >= dequant_min_m():
        return _dequant_mm(x, parts, y)
    qx, dx, sx = _scratch(M, K)
    lib.quantize_x(x.data_ptr(), M, K, qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), nt)
    col = 0
    for p in parts:
        if p[10] != K:
            raise ValueError(f"qmatmul: x has {K} columns, the weight {p[10]}")
        if lib.qmatmul(qx.data_ptr(), dx.data_ptr(), sx.data_ptr(), M, K, *p[:10], y.data_ptr() + 4 * col, N, nt):
            raise ValueError(f"qmatmul: no kernel for kind {p[7]} group {p[8]} with K {K}")
        col += p[9]
    return y


def dequant(args: tuple, rows: torch.Tensor | None = None, row0: int = 0, nrows: int | None = None,
            out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights (nrows, K) the kernel multiplies by, rows `rows` (int64) or row0 .. row0 + nrows - 1: fp32, or
    bf16 (the fp32 values rounded to nearest even, as .to(torch.bfloat16) rounds them)."""
    N, K = args[9], args[10]
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequant: dtype float32 or bfloat16, not {dtype}")
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= N):
            raise IndexError(f"dequant: row index out of range for {N} rows")
        nrows = len(rows)
    elif nrows is None:
        nrows = N - row0
    out = torch.empty(nrows, K, dtype=dtype) if out is None else out
    if out.dtype != dtype or not out.is_contiguous() or out.numel() != nrows * K:
        raise ValueError(f"dequant: out must be a contiguous {dtype} tensor of {nrows} x {K}")
    fn = library().dequant if dtype == torch.float32 else library().dequant_bf16
    rc = fn(*args[:9], K, None if rows is None else rows.data_ptr(), row0, nrows, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"dequant: no layout kind {args[7]} group {args[8]} with K {K}")
    return out


_TILES = threading.local()


def gemm_dtype() -> torch.dtype:
    """The dtype of the dequantise + GEMM path: bf16 where the CPU multiplies it natively (kernels.cpu_info.native_bf16:
    oneDNN's AVX512-BF16 / AMX GEMM, 2.3-6.6x fp32's rate), fp32 elsewhere. MCL_GEMM_DTYPE=fp32 | bf16 overrides
    (read at each call)."""
    want = os.environ.get("MCL_GEMM_DTYPE", "")
    if want not in ("", "fp32", "bf16"):
        raise ValueError(f"MCL_GEMM_DTYPE={want!r}: expected fp32 or bf16")
    if want:
        return torch.bfloat16 if want == "bf16" else torch.float32
    return torch.bfloat16 if native_bf16() else torch.float32


def _dequant_mm(x: torch.Tensor, parts: list[tuple], y: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T a tile of weight rows at a time: dequantise (C) into a reused buffer, then torch's GEMM. fp32:
    TILE_WEIGHTS-weight tiles and SGEMM. bf16 (where the CPU multiplies it natively): the C code rounds the tile
    straight to bf16 (no fp32 tile), tiles of up to BF16_TILE_WEIGHTS weights (a whole projection of the models
    here: one large GEMM instead of many narrow ones), oneDNN's bf16 GEMM with fp32 accumulation, its bf16 output
    widened into y (y's fp32 residual stream is unchanged)."""
    K = x.shape[1]
    dt = gemm_dtype()
    cap = max(1, (BF16_TILE_WEIGHTS if dt == torch.bfloat16 else TILE_WEIGHTS) // K)
    tile = {p: -(-p[9] // -(-p[9] // cap)) for p in parts}            # rows per tile: the part in equal tiles <= cap
    name = "low" if dt == torch.bfloat16 else "buf"
    buf = getattr(_TILES, name, None)
    need = max(tile.values()) * K
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=dt)
        setattr(_TILES, name, buf)
    if dt == torch.bfloat16:
        x = x.to(torch.bfloat16)
    col = 0
    for p in parts:
        for r0 in range(0, p[9], tile[p]):
            n = min(tile[p], p[9] - r0)
            w = dequant(p, row0=r0, nrows=n, out=buf[:n * K].view(n, K), dtype=dt)
            if dt == torch.float32 and n == y.shape[1]:
                torch.mm(x, w.t(), out=y)                                   # one tile is the whole output
            elif n == y.shape[1]:
                y.copy_(x @ w.t())
            else:
                y[:, col + r0:col + r0 + n] = x @ w.t()
        col += p[9]
    return y


def decode_attention(q, k, v, cos, sin, kc, vc, slots, pos) -> torch.Tensor:
    """engine/cpu/cpu_ops.c: RoPE, KV-cache write and attention of one new token per row, one call.

    q (B, nh*hd), k / v (B, nkv*hd) fp32 with unit last stride; cos / sin (B, hd); kc / vc one layer's cache
    (n_slots, nkv, L, hd) fp32 contiguous, written at [slots[b], :, pos[b]]; slots / pos (B,) int64.
    Returns (B, nh*hd): query head h over KV head h // (nh / nkv), keys 0 .. pos[b]."""
    B, hd = cos.shape
    nh, nkv, L = q.shape[1] // hd, kc.shape[1], kc.shape[2]
    out = torch.empty(B, nh * hd)
    slots, pos = slots.to(torch.int64).contiguous(), pos.to(torch.int64).contiguous()
    rc = library().decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                    cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), L, slots.data_ptr(),
                                    pos.data_ptr(), B, nh, nkv, hd, out.data_ptr(), torch.get_num_threads())
    if rc:
        if rc == -3:
            raise MemoryError("decode_attention: out of memory for the scores")
        raise ValueError(f"decode_attention: {'head_dim > 512 or heads not a multiple of KV heads' if rc == -1 else 'position outside the cache'}")
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """engine/cpu/cpu_ops.c's RMSNorm of fp32 x (..., D) with weight (D,): one call (inference)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().rmsnorm(x.data_ptr(), weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps, out.data_ptr())
    return out


def swiglu(gu: torch.Tensor, nt: int | None = None) -> torch.Tensor:
    """engine/cpu/cpu_ops.c's silu(g) * u for fp32 gu (B, 2 I) = [g | u] per row, as decode_layer computes it; (B, I)."""
    gu = gu.contiguous()
    B, I = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(B, I)
    library().swiglu(gu.data_ptr(), B, I, out.data_ptr(), nt or torch.get_num_threads())
    return out


LORA_MAX_RANK, LORA_MAX_ROWS = 256, 64      # engine/cpu/cpu_ops.c lora_apply's stack buffer (rows x rank)


def lora_apply_fits(rank: int, n_in: int, rows: int) -> bool:
    """Whether lora_apply takes these shapes (its buffer; 8-wide dot products). The one check: engine/lora.py's
    engine/cpu/modules.py's add_lora_delta and engine/cpu/decode_step.py fall back to torch where it says no."""
    return rank <= LORA_MAX_RANK and rank % 8 == 0 and n_in % 8 == 0 and rows <= LORA_MAX_ROWS


def lora_apply(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """engine/cpu/cpu_ops.c: y (T, out) += s[a] B[a] A[a] x[t] for rows with adapter ids[t] = a >= 0, in place; x (T, in)
    fp32 with unit last stride, A (N, R, in), B (N, out, R), scales (N,) fp32. One call per projection (inference)."""
    T, n_in = x.shape
    if y.stride(-1) != 1 or x.stride(-1) != 1 or y.dtype != torch.float32:
        raise ValueError("lora_apply: x and y need fp32 rows with unit stride")
    A, B, scales = A.contiguous(), B.contiguous(), scales.float().contiguous()
    ids = ids.to(torch.int64).contiguous()
    if not lora_apply_fits(A.shape[1], n_in, T):
        raise ValueError(f"lora_apply: rank {A.shape[1]} (<= {LORA_MAX_RANK}, a multiple of 8), in {n_in} (a multiple "
                         f"of 8), {T} rows (<= {LORA_MAX_ROWS})")
    library().lora_apply(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), T, n_in, y.shape[1], A.data_ptr(),
                         B.data_ptr(), scales.data_ptr(), A.shape[1], ids.data_ptr(), torch.get_num_threads())
    return y


# --- torch references (tests) ------------------------------------------------------------------------------------

def quantize_x_ref(x: torch.Tensor):
    """The torch reference of qmatmul.c's quantize_x (round half to even, as nearbyintf in the default rounding mode)."""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    d = xb.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, xb / torch.where(d > 0, d, 1)[..., None], 0).round()
    return q.to(torch.int8).view(M, K), d, q.sum(-1) * d


def unpack_q(w: torch.Tensor, kind: int) -> torch.Tensor:
    """Stored weights -> integer values (N, K) int16 (kind 4 unsigned 0..15, the others signed)."""
    if kind == 8:
        return w.to(torch.int16)
    N = w.shape[0]
    blk = w.view(N, -1, BLOCK_BYTES[kind]).to(torch.int16)                  # (N, blocks, bytes)
    q = torch.cat([blk[..., :16] & 15, blk[..., :16] >> 4], dim=-1)          # nibbles in element order
    e = torch.arange(32)
    if kind == 5:                                                            # bit 8 * (e % 4) + e / 4 of the word
        q = q | (((blk[..., 16 + e % 4] >> (e // 4)) & 1) << 4)
        q = q - 16
    elif kind == 6:                                                          # bits 8 * (e % 8) + 2 * (e / 8)
        q = q | (((blk[..., 16 + e % 8] >> (2 * (e // 8))) & 3) << 4)
        q = q - 32
    return q.reshape(N, -1)


def group_scales(s: torch.Tensor | None, sd: torch.Tensor | None, group: int) -> torch.Tensor | None:
    """Per-group scales (or mins) in fp32 (N, K/group): fp16 as stored, or int8 times the fp32 per 256 weights."""
    if s is None:
        return None
    if s.dtype == torch.float16:
        return s.float()
    return sd.repeat_interleave(256 // group, dim=1) * s.float()


def dequantize_ref(w, scale, wmin, kind: int, group: int, sd=None, md=None) -> torch.Tensor:
    """The weights the kernel multiplies by, fp32 (N, K): scale * q (+ min) per group."""
    q = unpack_q(w, kind).float()
    out = q * group_scales(scale, sd, group).repeat_interleave(group, dim=1)
    if wmin is not None:
        out = out + group_scales(wmin, md, group).repeat_interleave(group, dim=1)
    return out


def qmatmul_ref(x, w, scale, wmin, kind: int, group: int, sd=None, md=None) -> torch.Tensor:
    """What qmatmul computes for fewer than dequant_min_m() rows, in float64: sum over groups of
    scale * dx * (q . qx) + min * sx."""
    qx, dx, sx = quantize_x_ref(x)
    M, K = qx.shape
    N = w.shape[0]
    q = unpack_q(w, kind).double().view(N, K // group, group)
    xq = qx.double().view(M, K // group, group)
    dxg = dx.double().repeat_interleave(32 // group, dim=1) if group < 32 else dx.double()
    dots = torch.einsum("ngk,mgk->mng", q, xq)                                # (M, N, K/G)
    y = (dots * group_scales(scale, sd, group).double()[None] * dxg[:, None]).sum(-1)
    if wmin is not None:                                                       # mins: group 32 only
        y = y + (group_scales(wmin, md, group).double()[None] * sx.double()[:, None]).sum(-1)
    return y
