"""`mcl bench lora`: the fused multi-adapter LoRA linear against the base GEMM and the PyTorch alternatives.

    python -m kernels.bench --json --out bench/results/   # GPU: Qwen2.5-7B projections, T in {64, 512, 8192}, bf16
    python -m kernels.bench --quick --json                # fewer repeats (GPU: T in {64, 8192}); on CPU a smoke run
    python -m kernels.bench --ceilings --json             # measured device-to-device copy GB/s, dense GEMM TFLOP/s
    python -m kernels.bench --profile --out DIR           # torch.profiler per-kernel table, q_proj at T=8192 and 64
    mcl bench lora ...                                    # the same as the first two (engine/cli.py)

Imports nothing of the project but kernels.multi_lora (and kernels.cpu_info for the JSON's cpu_model / cpu_flags):
the projection shapes are the table MODELS below.
For every projection shape, token count T, adapter mix (even; skewed 70/20/7/3 %; tokens in shuffled order, as a
serving batch arrives; base_only: every id -1, which isolates our GEMM's gap to cuBLAS) and pass (fwd; fwd+bwd =
forward + grads to x, A, B with W frozen), one process times:
  base        x W^T (+ b) alone through F.linear (cuBLAS); its fwd+bwd is the base forward + dX
  peft_loop   PEFT's mixed-batch forward: base, then per adapter gather rows, two matmuls, index_add_ (the index
              tensors are built once per batch, outside the timing, as Segments are)
  gather_bmm  base + per-token gather of A[a], B[a] and two bmms (skipped when the gathered B exceeds 2 GiB)
  unfused     cuBLAS base, then two more launches: our shrink kernel and the expand-only kernel below adding into y
              (backward: cuBLAS dY W, shrink, expand-into, and the same dA/dB kernels as ours)
  ours        multi_lora(backend="triton"): the decode kernel for a forward of <= 64 tokens, else the expand in the
              GEMM epilogue with the shrink fused or separate (heuristic)
  ours_alt    the sorted-tile path with the other shrink placement (to tune multi_lora._pick_fuse; not with --quick)
Roofline columns per row: flops and bytes of the pass (formulas in _work), achieved TFLOP/s and GB/s of base and ours,
and roof_ms = max(flops / peak, bytes / bandwidth) against the measured ceilings (--ceilings); "block" rows sum one
Qwen2.5-7B decoder block's 7 projections (q, k, v, o, gate, up, down), so their ratios are FLOP-weighted totals.
GPU: CUDA-event timings by triton.testing.do_bench (L2 flushed between reps), medians after warm-up; random inputs,
never zero. CPU: tiny fp32 shapes and the torch paths only ("ours" = multi_lora_torch; the Triton interpreter is far
too slow to time). With --json the last stdout line is one JSON object {"device", "cpu_model", "cpu_flags", "torch",
"triton", "ceilings", "rows", "block", "goals", "autotune", ...}; --out also writes it (a directory ->
<dir>/lora_<device>.json, rewritten after every shape so a timeout keeps the rows done).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import multi_lora as ml
from kernels.cpu_info import isa

N_ADAPTERS = 4
SKEW = (0.70, 0.20, 0.07, 0.03)
MIXES = ("even", "skewed", "base_only")
# Projection shapes of one decoder layer: dim, heads, kv heads, head dim, MLP width, q/k/v bias (from the models'
# config.json files; kept here so the kernels package imports nothing of the engine).
MODELS = {
    "qwen2.5-7b-instruct": dict(dim=3584, n_heads=28, n_kv_heads=4, head_dim=128, intermediate=18944, qkv_bias=True),
    "smollm2-135m": dict(dim=576, n_heads=9, n_kv_heads=3, head_dim=64, intermediate=1536, qkv_bias=False),
    "tiny": dict(dim=64, n_heads=4, n_kv_heads=2, head_dim=16, intermediate=128, qkv_bias=False),
}
GOALS = [  # (description, table, pass, T predicate, ratio field, bound, "le" | "ge"); block = FLOP-weighted 7 projs
    ("block fwd, T=8192: ours <= 1.05x base cuBLAS", "block", "fwd", lambda T: T == 8192, "ours_vs_base", 1.05, "le"),
    ("block fwd+bwd, T=8192: ours <= 1.10x base fwd + dX", "block", "fwd+bwd", lambda T: T == 8192, "ours_vs_base",
     1.10, "le"),
    ("block decode fwd, T=64, 4 adapters: ours <= 1.25x base", "block", "fwd", lambda T: T == 64, "ours_vs_base", 1.25,
     "le"),
    ("block fwd+bwd, T<=512: ours >= 2x faster than the PEFT loop", "block", "fwd+bwd", lambda T: T <= 512,
     "peft_loop_vs_ours", 2.0, "ge"),
    ("block fwd+bwd, T=8192: ours >= 1.25x faster than the PEFT loop", "block", "fwd+bwd", lambda T: T == 8192,
     "peft_loop_vs_ours", 1.25, "ge"),
    ("per projection fwd, T=8192: ours <= 1.05x base", "rows", "fwd", lambda T: T == 8192, "ours_vs_base", 1.05, "le"),
    ("per projection decode fwd, T=64: ours <= 1.25x base", "rows", "fwd", lambda T: T == 64, "ours_vs_base", 1.25,
     "le"),
]


def _shapes(model: str):
    """[(op, same-shaped ops, in, out, has_bias)] of one decoder layer's projections."""
    if model not in MODELS:
        raise ValueError(f"kernels/bench.py: --model {model!r} is not in MODELS ({', '.join(MODELS)})")
    c = MODELS[model]
    q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
    return [("q_proj", ["o_proj"], c["dim"], q, c["qkv_bias"]), ("k_proj", ["v_proj"], c["dim"], kv, c["qkv_bias"]),
            ("gate_proj", ["up_proj"], c["dim"], c["intermediate"], False),
            ("down_proj", [], c["intermediate"], c["dim"], False)]


def _adapter_ids(T: int, mix: str, g: torch.Generator) -> torch.Tensor:
    if mix == "base_only":
        return torch.full((T,), -1, dtype=torch.int64)
    if mix == "even":
        ids = torch.arange(T) % N_ADAPTERS
    else:
        counts = [max(1, int(T * w)) for w in SKEW[1:]]
        ids = torch.repeat_interleave(torch.arange(N_ADAPTERS), torch.tensor([T - sum(counts)] + counts))
    return ids[torch.randperm(T, generator=g)]


# ----------------------------------------------------------------------------------------------------------------------
# The unfused baseline: cuBLAS base, our shrink, and this expand-only kernel adding into y.

@triton.jit
def _expand_kernel(
    mid_ptr, q_ptr, perm_ptr, tile_ptr, out_ptr,
    N, R,
    stride_mm, stride_qa, stride_qr, stride_qn, stride_om, stride_on,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[perm[pos], n] += mid[pos] @ q[a][:, n] for one row tile (one adapter a) and BLOCK_N columns; base tiles
    (adapter -1) and padding rows of the table touch nothing."""
    start = tl.load(tile_ptr + tl.program_id(0) * 3)
    adapter = tl.load(tile_ptr + tl.program_id(0) * 3 + 2)
    end = tl.where(adapter >= 0, tl.load(tile_ptr + tl.program_id(0) * 3 + 1), start)
    a_idx = tl.maximum(adapter, 0)
    pos = start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok, n_ok, r_ok = pos < end, offs_n < N, offs_r < R
    tok = tl.load(perm_ptr + pos, mask=row_ok, other=0)
    mid = tl.load(mid_ptr + pos[:, None] * stride_mm + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
    qt = tl.load(q_ptr + a_idx * stride_qa + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    out_ptrs = out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on
    acc = tl.load(out_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    acc = ml._mma(ml._round(mid, qt.dtype, PRECISION), qt, acc, PRECISION)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _expand_into(out, mid, q, seg: ml.Segments, block_m: int):
    """out[perm[pos]] += mid[pos] @ q[a] in place, LoRA rows only (q [NA, R, N], any strides)."""
    tiles = seg.tiles[block_m]
    if out.shape[0] == 0:
        return out
    if out.dtype != ml._store_dtype(out.dtype):
        raise ValueError(f"kernels/bench.py _expand_into: out is {out.dtype}; the interpreter path needs float32")
    N, R, bn = out.shape[1], q.shape[1], 32 if ml._INTERPRET else 128
    _expand_kernel[(tiles.shape[0], triton.cdiv(N, bn))](
        mid, q, seg.perm, tiles, out, N, R,
        mid.stride(0), q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        PRECISION=ml._precision(out.dtype), BLOCK_M=block_m, BLOCK_N=bn, BLOCK_R=ml._block_r(R))
    return out


class _Unfused(torch.autograd.Function):
    """cuBLAS base GEMM, then a separate shrink and a separate expand-into launch; the same dA/dB kernels as ours."""

    @staticmethod
    def forward(ctx, x, A, B, W, b, s, seg):
        bm = ml._pick_block_m(x.shape[0], A.shape[0])
        y = F.linear(x, W, b)
        mid = ml._shrink(x, A.transpose(1, 2), s, seg.perm, seg.tiles[bm],
                         torch.empty(x.shape[0], A.shape[1], device=x.device), bm)
        _expand_into(y, mid, B.transpose(1, 2), seg, bm)
        ctx.save_for_backward(x, A, B, W, s, mid)
        ctx.seg, ctx.bm = seg, bm
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, W, s, mid = ctx.saved_tensors
        seg, bm = ctx.seg, ctx.bm
        dx = dy @ W
        dyb = ml._shrink(dy, B, s, seg.perm, seg.tiles[bm], torch.empty(x.shape[0], A.shape[1], device=x.device), bm)
        _expand_into(dx, dyb, A, seg, bm)
        dA = ml._segment_outer(dyb, x, seg.perm, seg.offsets, u_gather=False, v_gather=True, dtype=A.dtype)
        dB = ml._segment_outer(dy, mid, seg.perm, seg.offsets, u_gather=True, v_gather=False, dtype=B.dtype)
        return dx, dA, dB, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Methods, timers, work counts.

def _methods(x, W, b, A, B, s, ids, seg, gpu: bool):
    """name -> f(x, A, B) -> y, every one computing the same y; None where a method does not run here."""
    idx = [(a, (ids == a).nonzero()[:, 0]) for a in range(N_ADAPTERS)]
    idx = [(a, i) for a, i in idx if i.numel()]
    scale = s.tolist()                                                 # PEFT keeps scalings as Python floats

    def base(x, A, B):
        return F.linear(x, W, b)

    def peft_loop(x, A, B):
        y = F.linear(x, W, b)
        for a, i in idx:
            xs = x.index_select(0, i)                                  # gather the adapter's rows
            y.index_add_(0, i, (xs @ A[a].t()) @ B[a].t() * scale[a])  # two matmuls, scatter-add
        return y

    def gather_bmm(x, A, B):
        y = F.linear(x, W, b)
        a = ids.clamp(min=0)
        xa = torch.bmm(A[a], x[:, :, None])                            # [T, R, 1]   per-token A[a]
        keep = s[a] * (ids >= 0)
        return y + torch.bmm(B[a], xa)[:, :, 0] * keep.to(x.dtype)[:, None]   # [T, out]

    def ours(x, A, B):
        return ml.multi_lora(x, W, b, A, B, s, seg, backend="triton")

    fuse = ml._pick_fuse(W.shape[0], ml._pick_block_m(x.shape[0], A.shape[0]))

    def ours_alt(x, A, B):
        return ml.multi_lora(x, W, b, A, B, s, seg, backend="triton", fuse_shrink=not fuse, decode=False)

    def unfused(x, A, B):
        return _Unfused.apply(x, A, B, W, b, s, seg)

    def ours_torch(x, A, B):
        return ml.multi_lora_torch(x, W, b, A, B, s, seg)

    gathered_bytes = x.shape[0] * W.shape[0] * A.shape[1] * x.element_size()
    return {"base": base, "peft_loop": peft_loop, "gather_bmm": gather_bmm if gathered_bytes <= 2 ** 31 else None,
            "unfused": unfused if gpu else None, "ours": ours if gpu else ours_torch,
            "ours_alt": ours_alt if gpu else None}, fuse


def _timer(gpu: bool, quick: bool):
    if gpu:
        import triton.testing

        def timed(fn, grads):
            return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                           grad_to_none=grads, return_mode="median")
        return timed

    def timed(fn, grads):
        times = []
        warm = 1 if quick else 2
        for i in range(warm + (2 if quick else 15)):
            for t in grads:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if i >= warm:                                              # warm-up calls
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return timed


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def _rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _work(pass_, T, T_lora, n_in, n_out, rank, elem):
    """(flops, bytes) of one pass with LoRA on T_lora of T tokens; the bytes a perfect kernel moves through HBM once.
    fwd:      2 T in out + 2 T_l R (in + out);   x, W, y (+ A, B)
    fwd+bwd:  the forward, dX = dY W (2 T in out + 2 T_l R (in + out)), dA and dB (2 T_l R (in + out)); bytes: the
              forward's, dY and W again, dX written, x and dY read once more for dA/dB, dA and dB written."""
    gemm, lora = 2 * T * n_in * n_out, 2 * T_lora * rank * (n_in + n_out)
    io, params = elem * (T * n_in + n_in * n_out + T * n_out), elem * N_ADAPTERS * rank * (n_in + n_out)
    if pass_ == "fwd":
        return gemm + lora, io + (params if T_lora else 0)
    return 2 * gemm + 3 * lora, 2 * io + elem * (T * n_in + T * n_out) + (3 * params if T_lora else 0)


def _roofline(row, flops, nbytes, ceilings):
    row["flops"], row["bytes"] = flops, nbytes
    for name in ("base", "ours"):
        ms = row[f"{name}_ms"]
        row[f"{name}_tflops"] = _sig(flops / ms / 1e9) if ms else None
        row[f"{name}_gbs"] = _sig(nbytes / ms / 1e6) if ms else None
    if ceilings:
        roof = max(flops / (ceilings["gemm_tflops"] * 1e9), nbytes / (ceilings["copy_gbs"] * 1e6))
        row["roof_ms"] = _sig(roof)
        row["ours_of_roof"] = _sig(roof / row["ours_ms"]) if row["ours_ms"] else None
        row["base_of_roof"] = _sig(roof / row["base_ms"]) if row["base_ms"] else None


def _case(op, n_in, n_out, has_bias, T, mix, dtype, device, rank, timed, quick, gpu, ceilings):
    """Both passes of one (shape, T, mix): two rows."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{op} {T} {mix}".encode()))
    rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device, dtype)
    x, dy = rnd(T, n_in), rnd(T, n_out)
    W, b = rnd(n_out, n_in, std=n_in ** -0.5), (rnd(n_out) if has_bias else None)
    A, B = rnd(N_ADAPTERS, rank, n_in, std=n_in ** -0.5), rnd(N_ADAPTERS, n_out, rank, std=rank ** -0.5)
    s = torch.full((N_ADAPTERS,), 2.0, device=device)                 # alpha / r = 64 / 32
    ids = _adapter_ids(T, mix, g).to(device)
    seg = ml.make_segments(ids, N_ADAPTERS)
    methods, fuse = _methods(x, W, b, A, B, s, ids, seg, gpu)
    T_lora = int((ids >= 0).sum())
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        decode = pass_ == "fwd" and T <= ml.DECODE_MAX_T and ml._decode_cols(N_ADAPTERS, rank) <= ml.DECODE_MAX_COLS
        row = {"op": op, "in": n_in, "out": n_out, "T": T, "mix": mix, "pass": pass_,
               "block_m": ml._pick_block_m(T, N_ADAPTERS), "fuse_shrink": fuse, "decode_kernel": decode and gpu}
        outs = {}
        for name, f in methods.items():
            if f is None or (quick and name == "ours_alt"):
                row[f"{name}_ms"] = None
                continue
            xg, Ag, Bg = (t.detach().requires_grad_(pass_ == "fwd+bwd" and (name != "base" or t is x))
                          for t in (x, A, B))
            grads = [t for t in (xg, Ag, Bg) if t.requires_grad]
            if pass_ == "fwd":
                fn = lambda: f(xg, Ag, Bg)
            else:
                fn = lambda: f(xg, Ag, Bg).backward(dy)
            try:
                with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                    if name in ("peft_loop", "ours"):                 # keep the results for the error check
                        y = f(xg, Ag, Bg)
                        if pass_ == "fwd+bwd":
                            y.backward(dy)
                        outs[name] = [y.detach()] + [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                                                     for t in grads]   # unused A, B (base_only): no grad
                    row[f"{name}_ms"] = _sig(timed(fn, grads))
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_ms"] = None
                torch.cuda.empty_cache()
        base, ours, peft = row["base_ms"], row["ours_ms"], row["peft_loop_ms"]
        row["ours_vs_base"] = _sig(ours / base) if ours and base else None
        row["peft_loop_vs_ours"] = _sig(peft / ours) if ours and peft else None
        if "ours" in outs and "peft_loop" in outs:
            row["rel_err"] = _sig(max(_rel_err(o, p) for o, p in zip(outs["ours"], outs["peft_loop"])), 3)
        _roofline(row, *_work(pass_, T, T_lora, n_in, n_out, rank, x.element_size()), ceilings)
        rows.append(row)
    return rows


def _block(rows, same_shape_as):
    """One row per (T, mix, pass): the 7 projections of a decoder block summed (ops with a same-shaped twin count
    twice), so ours_vs_base is the FLOP-weighted total the goals are stated for."""
    mult = {}
    for twin, op in same_shape_as.items():
        mult[op] = mult.get(op, 1) + 1
    out = {}
    for r in rows:
        key = (r["T"], r["mix"], r["pass"])
        b = out.setdefault(key, {"T": r["T"], "mix": r["mix"], "pass": r["pass"], "projections": 0,
                                 "base_ms": 0.0, "ours_ms": 0.0, "peft_loop_ms": 0.0, "flops": 0, "bytes": 0})
        m = mult.get(r["op"], 1)
        b["projections"] += m
        for k in ("base_ms", "ours_ms", "peft_loop_ms", "flops", "bytes"):
            b[k] = None if b[k] is None or r.get(k) is None else b[k] + m * r[k]
    for b in out.values():
        b["ours_vs_base"] = _sig(b["ours_ms"] / b["base_ms"]) if b["ours_ms"] and b["base_ms"] else None
        b["peft_loop_vs_ours"] = _sig(b["peft_loop_ms"] / b["ours_ms"]) if b["ours_ms"] and b["peft_loop_ms"] else None
        for k in ("base_ms", "ours_ms", "peft_loop_ms"):
            b[k] = _sig(b[k]) if b[k] else b[k]
    return list(out.values())


def _goals(rows, block):
    out = []
    for desc, table, pass_, t_ok, field, bound, how in GOALS:
        src = block if table == "block" else rows
        vals = [r[field] for r in src if r["pass"] == pass_ and t_ok(r["T"]) and r.get("mix") != "base_only"
                and r.get(field) is not None]
        met = [v for v in vals if (v <= bound if how == "le" else v >= bound)]
        worst = (max(vals) if how == "le" else min(vals)) if vals else None
        out.append({"goal": desc, "rows": len(vals), "met": len(met), "worst": worst,
                    "status": "unmeasured" if not vals else "met" if len(met) == len(vals) else "missed"})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Ceilings and the profiler table.

def ceilings(device: str) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes) and dense GEMM throughput (bf16 8192^3 on CUDA;
    fp32 128^3 on CPU, a smoke value): the roofline the rows are compared with."""
    gpu = device.startswith("cuda")
    if gpu:
        import triton.testing
        bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        nbytes, n, dtype = 2 ** 30, 8192, torch.bfloat16
    else:
        def bench(fn):
            fn()
            t = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                t.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(t)
        nbytes, n, dtype = 2 ** 22, 128, torch.float32
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms = bench(lambda: a @ b)
    return {"device": _device_name(device), "copy_gbs": _sig(2 * nbytes / copy_ms / 1e6),
            "gemm_tflops": _sig(2 * n ** 3 / gemm_ms / 1e9), "gemm_shape": [n, n, n], "dtype": str(dtype)[6:],
            "copy_bytes": nbytes}


def profile(device: str, model: str, out_dir: str | None) -> dict:
    """torch.profiler per-kernel table for q_proj at T=8192 and T=64 (even mix): ours fwd, ours fwd+bwd, base fwd.
    On CPU: tiny shapes, T = 16, one step, the Triton path under the interpreter when TRITON_INTERPRET=1."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    gpu = device.startswith("cuda")
    backend = "triton" if gpu or ml._INTERPRET else "torch"
    dtype, rank, Ts = (torch.bfloat16, 32, (8192, 64)) if gpu else (torch.float32, 8, (16,))
    _, _, n_in, n_out, has_bias = _shapes(model)[0]
    result = {"op": "q_proj", "in": n_in, "out": n_out, "backend": backend, **isa(), "tables": {}}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    for T in Ts:
        g = torch.Generator().manual_seed(T)
        rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device, dtype)
        x, dy = rnd(T, n_in), rnd(T, n_out)
        W, b = rnd(n_out, n_in, std=n_in ** -0.5), (rnd(n_out) if has_bias else None)
        A = rnd(N_ADAPTERS, rank, n_in, std=n_in ** -0.5).requires_grad_()
        B = rnd(N_ADAPTERS, n_out, rank, std=rank ** -0.5).requires_grad_()
        s = torch.full((N_ADAPTERS,), 2.0, device=device)
        seg = ml.make_segments(_adapter_ids(T, "even", g).to(device), N_ADAPTERS)

        def step():
            with torch.no_grad():
                F.linear(x, W, b)
                ml.multi_lora(x, W, b, A, B, s, seg, backend=backend)
            ml.multi_lora(x.requires_grad_(), W, b, A, B, s, seg, backend=backend).backward(dy)
            x.requires_grad_(False)
        n = 3 if gpu else 1
        for _ in range(n - 1 or 1):                                    # compile / autotune outside the profile
            step()
        if gpu:
            torch.cuda.synchronize()
        with torch_profile(activities=acts) as prof:
            for _ in range(n):
                step()
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        sort = "self_device_time_total" if gpu else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=20)
        print(f"== torch.profiler q_proj {n_in}->{n_out} T={T} ({n} steps of: base fwd, ours fwd, ours fwd+bwd) ==")
        print(table, flush=True)
        top = []
        for e in events:
            dev_us = getattr(e, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(e, "self_cuda_time_total", 0)
            top.append({"name": e.key[:120], "count": e.count, "self_device_us": _sig(dev_us or 0.0),
                        "self_cpu_us": _sig(e.self_cpu_time_total)})
        top.sort(key=lambda r: r["self_device_us"] if gpu else r["self_cpu_us"], reverse=True)
        result["tables"][str(T)] = top[:20]
    if out_dir:
        _write(Path(out_dir) / "profile_q_proj.json", result)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Entry points.

def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({platform.machine()})"


def _out_path(out: str, device_name: str) -> Path:
    p = Path(out)
    if p.is_dir() or out.endswith("/") or not p.suffix:
        slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
        return p / f"lora_{slug}.json"
    return p


def main(args):
    gpu_ok = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu_ok else "cpu")
    gpu = device.startswith("cuda")
    if gpu and not gpu_ok:
        raise ValueError(f"mcl bench lora: --device {device} but CUDA is not available")
    device_name = _device_name(device)
    if gpu:
        model = args.model or "qwen2.5-7b-instruct"
        dtype, rank, Ts = torch.bfloat16, 32, (64, 512, 8192)          # --quick: fewer repeats, no ours_alt
    else:
        model = args.model or "tiny"
        dtype, rank, Ts = torch.float32, 8, ((16,) if args.quick else (8, 64))
    timed = _timer(gpu, args.quick)
    ceil = ceilings(device)
    result = {
        "bench": "lora", "device": device_name, **isa(), "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(["mcl"] + sys.argv[1:]) if Path(sys.argv[0]).name == "mcl" else " ".join(sys.argv),
        "model": model, "dtype": str(dtype).removeprefix("torch."), "adapters": N_ADAPTERS, "rank": rank,
        "mixes": {"even": "T/4 tokens per adapter", "skewed": "70/20/7/3 % of tokens",
                  "base_only": "every adapter id -1: our GEMM against cuBLAS, no LoRA work"},
        "timer": "triton.testing.do_bench median, L2 flushed" if gpu else "time.perf_counter median",
        "ceilings": ceil,
        "notes": ([] if gpu else ["CPU run: torch paths only; 'ours' is multi_lora_torch (the engine's CPU path); "
                                  "Triton kernels are not timed on CPU (the interpreter is for tests only)"]),
        "same_shape_as": {}, "rows": [], "block": [], "goals": [], "complete": False,
    }
    path = _out_path(args.out, device_name) if args.out else None
    t_start = time.perf_counter()
    # Largest FLOP share first (gate/up/down are ~85% of a 7B block's): a run cut short by a timeout keeps the rows
    # that weigh most, and the JSON is rewritten after every shape.
    for op, same, n_in, n_out, has_bias in sorted(_shapes(model), key=lambda s: -(1 + len(s[1])) * s[2] * s[3]):
        result["same_shape_as"].update({o: op for o in same})
        for T in Ts:
            for mix in MIXES:
                for r in _case(op, n_in, n_out, has_bias, T, mix, dtype, device, rank, timed, args.quick, gpu, ceil):
                    result["rows"].append(r)
                    print(f"[{time.perf_counter() - t_start:6.1f}s] {op:9s} {n_in}->{n_out} T={T:<5d} {mix:9s} "
                          f"{r['pass']:7s} base {r['base_ms']} ms  ours {r['ours_ms']} ms ({r['ours_vs_base']}x base, "
                          f"{r['ours_tflops']} TFLOP/s, {r['ours_gbs']} GB/s, {r.get('ours_of_roof')} of roof)"
                          f"  peft_loop {r['peft_loop_ms']}  gather_bmm {r['gather_bmm_ms']}  unfused "
                          f"{r['unfused_ms']}  ours_alt {r['ours_alt_ms']}  err {r.get('rel_err')}", flush=True)
        if path:
            _write(path, result)
    result["block"] = _block(result["rows"], result["same_shape_as"])
    # The configs autotuning chose on this GPU, per kernel and key (a later run or a pinned table can reuse them).
    result["autotune"] = {name: {str(k): str(c) for k, c in getattr(fn, "cache", {}).items()}
                          for name, fn in (("gemm", ml._gemm_tuned), ("decode", ml._decode_tuned),
                                           ("shrink", ml._shrink_tuned), ("outer", ml._outer_tuned))}
    for b in result["block"]:
        print(f"block (7 projections) T={b['T']:<5d} {b['mix']:9s} {b['pass']:7s} base {b['base_ms']} ms  ours "
              f"{b['ours_ms']} ms  ours/base {b['ours_vs_base']}  peft_loop/ours {b['peft_loop_vs_ours']}")
    result["complete"] = True
    if gpu:
        result["goals"] = _goals(result["rows"], result["block"])
        for gl in result["goals"]:
            print(f"goal: {gl['goal']}: {gl['status']} ({gl['met']}/{gl['rows']} rows, worst {gl['worst']})")
    else:
        result["notes"].append("the GPU goals are not evaluated on CPU")
    if path:
        _write(path, result)
        print(f"wrote {path}")
    if args.json:
        print(json.dumps(result))
    return 0


def _write(path: Path, result: dict):
    """The JSON file; every result records the CPU (kernels/cpu_info.py's isa()), so a file without is refused."""
    missing = [k for k in isa() if k not in result]
    if missing:
        raise ValueError(f"kernels/bench.py _write({path.name}): no {', '.join(missing)} in the result (add **isa())")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def _cli(argv=None):
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--out", default=None, help="also write the JSON here (a file, or a directory)")
    p.add_argument("--model", default=None, choices=sorted(MODELS))
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--ceilings", action="store_true", help="only the measured copy / GEMM ceilings and versions")
    p.add_argument("--profile", action="store_true", help="only the torch.profiler table for q_proj")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.ceilings:
        result = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                  "cuda": torch.version.cuda, **isa(), **ceilings(device)}
        print(f"versions: torch {result['torch']}  triton {result['triton']}  cuda {result['cuda']}  "
              f"device {result['device']}")
        print(f"ceilings: copy {result['copy_gbs']} GB/s  gemm {result['gemm_tflops']} TFLOP/s ({result['dtype']})")
    elif args.profile:
        model = args.model or ("qwen2.5-7b-instruct" if device.startswith("cuda") else "tiny")
        result = profile(device, model, args.out)
    else:
        return main(args)
    if args.out and args.ceilings:
        _write(Path(args.out), result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
