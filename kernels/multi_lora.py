"""Multi-adapter LoRA linear: one launch serves a batch whose tokens use different adapters.

    y[t] = x[t] W^T + bias + s[a] * (x[t] A[a]^T) B[a]^T        a = adapter id of token t (-1: base only)

    x [T, in] ---------------------- x W^T (the base GEMM, W frozen) -------------------+--> y [T, out]
        |                                                                               |
        +-- perm: rows sorted by adapter --> mid = s[a] x A[a]^T  [T, R] --> mid B[a]^T -+  (epilogue of the same GEMM)

Shapes: W [out, in]; bias [out] or None; A stacked [N, R, in]; B stacked [N, out, R]; scales [N] fp32. Adapters of
different ranks are stored zero-padded to R = max rank (<= MAX_RANK); padded entries get exactly zero gradient.

Contents, top to bottom:
  Segments / make_segments   per batch, once: token order grouped by adapter + row-tile tables (no host sync per layer)
  multi_lora_ref             the oracle: per-token gather of A/B + bmm (tests run it in float64)
  multi_lora_torch           the fast plain-torch path: base matmul + per adapter segment a matmul pair (one bmm pair
                             when the tokens come grouped in equal segments; slices, no gather/scatter, when grouped)
  _shrink_kernel             mid[pos] = s[a] * x[perm[pos]] A[a]^T over row tiles of one adapter each
  _gemm_expand_kernel        out[perm[pos]] = inp[perm[pos]] w + bias + mid[pos] q[a]  (shrink optionally fused in)
  _segment_outer_kernel      G[a] = U_a^T V_a summed over the tokens of adapter a  (dA, dB)
  _MultiLoRA                 autograd.Function; the backward derivation is its docstring
  multi_lora                 validation + dispatch (backend "auto" | "triton" | "torch")

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set it before this module is imported).
    TRITON_INTERPRET=1 python -m pytest tests/kernels -q        # tests against multi_lora_ref in float64
    mcl bench lora --json --out bench/results/                  # timings (kernels/bench.py)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

DENSE_MAX_T = 64                  # torch path: at most this many tokens -> one dense pass over all adapters
MAX_RANK = 128                    # BLOCK_R <= 128 keeps the fused shrink accumulator in registers
BLOCK_MS = (16, 32, 64, 128)      # row-tile heights with a tile table in every Segments
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # read when triton.jit is (at import), so they agree


# ----------------------------------------------------------------------------------------------------------------------
# Segments: computed once per batch, shared by every LoRA layer of the forward and backward.

@dataclass(frozen=True)
class Segments:
    """Token order grouped by adapter. Positions `pos` index the sorted order; tokens `perm[pos]` index x.

    perm      [T] int64   token indices sorted stably by adapter id; base-only (-1) tokens first
    offsets   [N+1] int64 adapter a's tokens are perm[offsets[a]:offsets[a+1]]; offsets[0] = n_base
    tiles     {BLOCK_M: [n_tiles, 3] int64}  row tiles (start, end, adapter) over positions: every position in exactly
              one tile, no tile straddles two adapters; base tiles (adapter -1) first, so the LoRA tiles are
              tiles[bm][n_base_tiles[bm]:]
    counts    tokens per adapter (host ints: the torch path and the launchers size things without a device sync)
    """
    perm: torch.Tensor
    offsets: torch.Tensor
    tiles: dict
    n_base_tiles: dict
    counts: tuple
    n_base: int
    onehot: torch.Tensor | None = None   # [T, N] fp32, token t's adapter column = 1 (few-token torch path only)
    in_order: bool = False               # perm is the identity: the tokens already come grouped by adapter (the
                                         # trainer's batches, rows sorted by role), so segments are slices of x

    @property
    def n_tokens(self) -> int:
        return self.perm.numel()

    @property
    def n_adapters(self) -> int:
        return len(self.counts)

    @property
    def n_lora(self) -> int:
        return self.n_tokens - self.n_base


def _tile_table(bounds: list[int], bm: int) -> tuple[torch.Tensor, int]:
    """Bounds [0, n_base, end_0, end_1, ...] -> ([n_tiles, 3] rows (start, end, adapter), number of base tiles)."""
    rows = []
    for adapter, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=-1):
        starts = torch.arange(lo, hi, bm, dtype=torch.int64)
        rows.append(torch.stack([starts, (starts + bm).clamp(max=hi), torch.full_like(starts, adapter)], dim=1))
    return torch.cat(rows), -(-bounds[1] // bm)


def make_segments(adapter_ids: torch.Tensor, n_adapters: int) -> Segments:
    """Per-token adapter ids [T] (-1 = base only) -> Segments on the ids' device. One host sync, here, per batch."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.is_complex() \
            or adapter_ids.dtype == torch.bool:
        raise ValueError(f"make_segments: adapter_ids must be an integer tensor, got "
                         f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")
    if n_adapters < 0:
        raise ValueError(f"make_segments: n_adapters must be >= 0, got {n_adapters}")
    ids = adapter_ids.reshape(-1).to("cpu", torch.int64)
    bad = (ids < -1) | (ids >= n_adapters)
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"make_segments: adapter_ids[{t}] = {int(ids[t])} is outside [-1, {n_adapters}) "
                         f"(shape {tuple(adapter_ids.shape)}, -1 = base only, n_adapters = {n_adapters})")
    perm = torch.sort(ids, stable=True).indices                    # base (-1) first, then adapter 0, 1, ...
    counts = torch.bincount(ids + 1, minlength=n_adapters + 1).tolist()
    bounds = [0] + torch.tensor(counts).cumsum(0).tolist()          # [0, n_base, end_0, ..., end_{N-1}]
    tables = {bm: _tile_table(bounds, bm) for bm in BLOCK_MS}
    # One host->device copy for everything: perm | offsets | tile tables.
    parts = [perm, torch.tensor(bounds[1:], dtype=torch.int64)] + [tables[bm][0].reshape(-1) for bm in BLOCK_MS]
    packed = torch.cat(parts).to(adapter_ids.device)
    views = packed.split([p.numel() for p in parts])
    return Segments(perm=views[0], offsets=views[1],
                    tiles={bm: v.view(-1, 3) for bm, v in zip(BLOCK_MS, views[2:])},
                    n_base_tiles={bm: tables[bm][1] for bm in BLOCK_MS},
                    counts=tuple(counts[1:]), n_base=counts[0],
                    onehot=F.one_hot(ids + 1, n_adapters + 1)[:, 1:].float().to(adapter_ids.device)
                    if ids.numel() <= DENSE_MAX_T else None,
                    in_order=bool((ids[1:] >= ids[:-1]).all()))


# ----------------------------------------------------------------------------------------------------------------------
# Torch paths.

def multi_lora_ref(x, weight, bias, lora_a, lora_b, scales, adapter_ids):
    """The oracle: gather each token's A and B, then two bmms. O(T * out * R) memory: tests only."""
    ids = adapter_ids.reshape(-1)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= lora_a.shape[0]):
        raise ValueError(f"multi_lora_ref: adapter_ids outside [-1, {lora_a.shape[0]})")
    x2 = x.reshape(-1, x.shape[-1])                                     # [T, in]
    y = F.linear(x2, weight, bias)                                      # [T, out]
    a = ids.clamp(min=0)
    xa = torch.bmm(lora_a[a], x2[:, :, None])[:, :, 0]                 # [T, R]    x A[a]^T
    lora = torch.bmm(lora_b[a], xa[:, :, None])[:, :, 0]               # [T, out]  (x A[a]^T) B[a]^T
    lora = lora * scales[a].to(lora.dtype)[:, None] * (ids >= 0).to(lora.dtype)[:, None]
    return (y + lora).reshape(*x.shape[:-1], weight.shape[0])


def multi_lora_torch(x, weight, bias, lora_a, lora_b, scales, seg: Segments, *, base_out=None):
    """Plain torch over the sorted segments (what the engine runs on CPU); autograd flows natively.
    base_out: x W^T + bias computed by the caller (engine/quant.py's packed weights); `weight` is then only checked."""
    _check(x, weight, bias, lora_a, lora_b, scales, seg, triton_path=False)
    x2 = x.reshape(-1, x.shape[-1])                                     # [T, in]
    y = F.linear(x2, weight, bias) if base_out is None else base_out.reshape(x2.shape[0], -1)   # [T, out]
    if seg.n_lora and seg.n_lora == seg.n_tokens and max(seg.counts) == seg.n_tokens:
        # Every token on one adapter (batch-1 decode, single-role batches): that adapter's two matmuls, nothing else.
        a = seg.counts.index(seg.n_tokens)
        y = y + (x2 @ lora_a[a].t()) * scales[a].to(x2.dtype) @ lora_b[a].t()
    elif seg.n_lora and seg.onehot is not None:
        # Few tokens (decode): x against every adapter's A at once, keep each token's own block, then B per
        # adapter as one bmm. Same bytes read as the per-segment loop, ~7 ops instead of ~4 per adapter.
        N, R = lora_a.shape[0], lora_a.shape[1]
        xa = (x2 @ lora_a.reshape(N * R, -1).t()).view(-1, N, R)       # [T, N, R]   x A[n]^T for every n
        w = (seg.onehot * scales).to(xa.dtype)                          # [T, N]      s[a] on the token's adapter
        xa = (xa * w[:, :, None]).transpose(0, 1)                       # [N, T, R]   other adapters zeroed
        y = y + torch.bmm(xa, lora_b.transpose(1, 2)).sum(0)            # [T, out]    sum_n xa[n] B[n]^T
    elif seg.n_lora and seg.in_order and len(set(seg.counts)) == 1:
        # Tokens grouped by adapter, every adapter the same count c (the trainer's balanced batches): the LoRA rows
        # are one [N, c, in] view, so each half of the delta is one bmm, added into the base output's LoRA rows.
        N, c = seg.n_adapters, seg.counts[0]
        xl = x2[seg.n_base:].view(N, c, -1)                             # [N, c, in]
        mid = torch.bmm(xl, lora_a.transpose(1, 2)) * scales.to(x2.dtype)[:, None, None]   # [N, c, R]  s[a] x A[a]^T
        yl = torch.baddbmm(y[seg.n_base:].view(N, c, -1), mid, lora_b.transpose(1, 2))     # [N, c, out]
        y = yl.view(-1, yl.shape[-1]) if not seg.n_base else torch.cat((y[:seg.n_base], yl.flatten(0, 1)))
    elif seg.n_lora:
        # One matmul pair per non-empty adapter on its tokens. In order: slices of x, no gather or scatter.
        # unbind (not A[a]) so the backward stacks the per-adapter grads once instead of a zero-filled copy each.
        ts = seg.perm[seg.n_base:]                                      # LoRA tokens, grouped by adapter
        chunks = (x2[seg.n_base:] if seg.in_order else x2[ts]).split(seg.counts)   # host ints: no sync
        As, Bs, s = lora_a.unbind(0), lora_b.unbind(0), scales.to(x2.dtype)
        delta = torch.cat([(xs @ As[a].t()) * s[a] @ Bs[a].t() for a, xs in enumerate(chunks) if xs.shape[0]])
        if not seg.in_order:
            y = y.index_add(0, ts, delta)
        elif seg.n_base:
            y = torch.cat((y[:seg.n_base], y[seg.n_base:] + delta))
        else:
            y = y + delta
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels. Shared notation: `pos` = position in the sorted order, `tok = perm[pos]` = row of the input.

@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation. PRECISION "ieee" for fp32 inputs (exact like torch's default), "tf32" (ignored
    for bf16/fp16), or "upcast" for 16-bit inputs under the interpreter, which does not support bf16 arithmetic
    (triton-lang/triton#11584: tl.dot multiplies the uint16 bit patterns), so we compute in fp32 there."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _round(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype) (round to nearest even on the GPU). Under "upcast" x stays fp32: the interpreter's fp32->bf16 cast
    truncates, so the launchers give it fp32 output buffers and round with torch afterwards."""
    if PRECISION == "upcast":
        return x
    else:
        return x.to(dtype)


@triton.jit
def _shrink_kernel(
    inp_ptr, p_ptr, scale_ptr, perm_ptr, tile_ptr, mid_ptr,
    K, R,
    stride_im, stride_ik, stride_pa, stride_pk, stride_pr, stride_mm,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per LoRA row tile: mid[pos, :R] = s[a] * inp[perm[pos]] @ p[a]   (p[a] is a [K, R] view)."""
    tile = tl.program_id(0)
    start = tl.load(tile_ptr + tile * 3)
    end = tl.load(tile_ptr + tile * 3 + 1)
    adapter = tl.load(tile_ptr + tile * 3 + 2)
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    tok = tl.load(perm_ptr + pos, mask=row_ok, other=0)               # tok = perm[pos]
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = inp_ptr + tok[:, None] * stride_im + offs_k[None, :] * stride_ik   # inp[tok, k]: gathered rows
    p_ptrs = p_ptr + adapter * stride_pa + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = tl.load(p_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        acc = _mma(xt, pt, acc, PRECISION)                             # acc += x[tok, k:k+BK] @ p[a][k:k+BK, :]
        x_ptrs += BLOCK_K * stride_ik
        p_ptrs += BLOCK_K * stride_pk
    acc = acc * tl.load(scale_ptr + adapter)                          # * s[a]
    tl.store(mid_ptr + pos[:, None] * stride_mm + offs_r[None, :], acc,
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def _gemm_expand_kernel(
    inp_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, scale_ptr, perm_ptr, tile_ptr, mid_ptr, out_ptr,
    n_tiles, N, K, R,
    stride_im, stride_ik, stride_wk, stride_wn, stride_pa, stride_pk, stride_pr,
    stride_qa, stride_qr, stride_qn, stride_mm, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, ADD_OUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[tok] = inp[tok] @ w + bias + mid[pos] @ q[a] for the rows of one tile (one adapter a) and BLOCK_N columns.

    w is a [K, N] view, p[a] [K, R], q[a] [R, N]. With FUSE_SHRINK, mid = s[a] * inp[tok] @ p[a] is accumulated in the
    same K loop from the already-loaded inp tiles (no second read of inp; costs BLOCK_R / BLOCK_N extra MMA work) and
    the pid_n == 0 program writes it out for the backward; otherwise mid was written by _shrink_kernel and is read here.
    ADD_OUT (expand only, no K loop) accumulates into out instead: the unfused baseline of kernels/bench.py.
    """
    # Grouped launch order: GROUP_M row tiles walk the same column blocks of w together, so w stays in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_m = min(n_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_m

    start = tl.load(tile_ptr + pid_m * 3)
    end = tl.load(tile_ptr + pid_m * 3 + 1)
    adapter = tl.load(tile_ptr + pid_m * 3 + 2)                       # -1: a base-only tile
    has_lora = adapter >= 0
    a_idx = tl.maximum(adapter, 0)                                     # keeps masked-off addresses in range
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    tok = tl.load(perm_ptr + pos, mask=row_ok, other=0)               # tok = perm[pos]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R

    out_ptrs = out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_on  # out[tok, n]: scattered rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mid = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if ADD_OUT:                                                        # expand only: start from out[tok, n]
        acc += tl.load(out_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    else:
        x_ptrs = inp_ptr + tok[:, None] * stride_im + offs_k[None, :] * stride_ik   # inp[tok, k]: gathered rows
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # w[k, n]
        if FUSE_SHRINK:
            p_ptrs = p_ptr + a_idx * stride_pa + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
            # A base-only tile (adapter -1) loads no p: its rank bound is 0. Folding the scalar has_lora into a
            # block mask keeps every mask a block of i1 (triton >= 3.9's interpreter rejects block & scalar).
            p_r_ok = offs_r < tl.where(has_lora, R, 0)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(xt, wt, acc, PRECISION)                         # acc += inp[tok, k:k+BK] @ w[k:k+BK, n]
            if FUSE_SHRINK:
                pt = tl.load(p_ptrs, mask=k_ok[:, None] & p_r_ok[None, :], other=0.0)
                mid = _mma(xt, pt, mid, PRECISION)                     # mid += inp[tok, k:k+BK] @ p[a][k:k+BK, :]
                p_ptrs += BLOCK_K * stride_pk
            x_ptrs += BLOCK_K * stride_ik
            w_ptrs += BLOCK_K * stride_wk

    if has_lora:                                                       # LoRA epilogue: acc += mid @ q[a]
        mid_ptrs = mid_ptr + pos[:, None] * stride_mm + offs_r[None, :]
        if FUSE_SHRINK:
            mid = mid * tl.load(scale_ptr + adapter)                   # mid = s[a] * inp[tok] @ p[a]
            if pid_n == 0:
                tl.store(mid_ptrs, mid, mask=row_ok[:, None] & r_ok[None, :])
        else:
            mid = tl.load(mid_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        q_ptrs = q_ptr + adapter * stride_qa + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn
        qt = tl.load(q_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(_round(mid, qt.dtype, PRECISION), qt, acc, PRECISION)   # acc += mid[pos] @ q[a][:, n]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _segment_outer_kernel(
    u_ptr, v_ptr, perm_ptr, offsets_ptr, out_ptr,
    P, Q,
    stride_um, stride_up, stride_vm, stride_vq, stride_oa, stride_op, stride_oq,
    U_GATHER: tl.constexpr, V_GATHER: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[a, p, q] = sum over positions pos of adapter a of U[row_u, p] * V[row_v, q]   (G[a] = U_a^T V_a).

    row = perm[pos] for a gathered operand (x, dY: token order), pos for a sorted one (mid, dyb). Grid (adapter, P
    blocks, Q blocks); each program walks its adapter's whole segment (deterministic: no atomics). Empty segments
    write zeros."""
    adapter = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    lo = tl.load(offsets_ptr + adapter)
    hi = tl.load(offsets_ptr + adapter + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        pos = t0 + tl.arange(0, BLOCK_T)
        t_ok = pos < hi
        tok = tl.load(perm_ptr + pos, mask=t_ok, other=0)
        u_row = tok if U_GATHER else pos
        v_row = tok if V_GATHER else pos
        ut = tl.load(u_ptr + u_row[:, None] * stride_um + offs_p[None, :] * stride_up,
                     mask=t_ok[:, None] & p_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + v_row[:, None] * stride_vm + offs_q[None, :] * stride_vq,
                     mask=t_ok[:, None] & q_ok[None, :], other=0.0)
        ut = _round(ut, DTYPE, PRECISION)                              # mid/dyb are fp32: round like torch would
        vt = _round(vt, DTYPE, PRECISION)
        acc = _mma(tl.trans(ut), vt, acc, PRECISION)                   # acc += U[rows, p]^T @ V[rows, q]
    tl.store(out_ptr + adapter * stride_oa + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning (CUDA) / one small config (interpreter).

def _gemm_configs(shapes):
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes]


if _INTERPRET:
    _GEMM_WIDE = _GEMM_DECODE = _gemm_configs([(32, 32, 4, 1)])
else:
    _GEMM_WIDE = _gemm_configs([(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)])
    _GEMM_DECODE = _gemm_configs([(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4), (128, 64, 4, 5)])


def _prune_gemm(configs, named_args, **kwargs):
    """Decode-sized row tiles (BLOCK_M <= 32) try the long-K, narrow-N configs; prefill/training tiles the wide ones."""
    return _GEMM_DECODE if kwargs["BLOCK_M"] <= 32 else _GEMM_WIDE


def _shrink_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=s)
            for k, w, s in [(64, 4, 4), (128, 4, 3), (128, 8, 4), (256, 4, 3)]]


def _outer_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_T": t}, num_warps=w, num_stages=s)
            for t, w, s in [(32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 3)]]


_shrink_tuned = triton.autotune(configs=_shrink_configs(), key=["K", "R", "BLOCK_M", "BLOCK_R"])(_shrink_kernel)
_outer_tuned = triton.autotune(configs=_outer_configs(), key=["P", "Q", "BLOCK_P", "BLOCK_Q"])(_segment_outer_kernel)
_gemm_tuned = triton.autotune(configs=_GEMM_WIDE if _INTERPRET else _GEMM_WIDE + _GEMM_DECODE,
                              key=["N", "K", "R", "BLOCK_M", "FUSE_SHRINK", "ADD_OUT", "HAS_BIAS"],
                              prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_expand_kernel)
# The expand-only use adds into out, so autotuning's repeated launches must restore it between configs.
_expand_tuned = triton.autotune(configs=_GEMM_WIDE if _INTERPRET else _GEMM_WIDE + _GEMM_DECODE,
                                key=["N", "R", "BLOCK_M"], restore_value=["out_ptr"],
                                prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_expand_kernel)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers: pick block sizes from the batch shape, allocate, launch.

def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests poison it with NaN to prove each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _precision(dtype) -> str:
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _INTERPRET else "tf32"


def _store_dtype(dtype):
    """What the kernels write: the input dtype, except fp32 for 16-bit inputs under the interpreter (see _round)."""
    return torch.float32 if _precision(dtype) == "upcast" else dtype


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _pick_block_m(seg: Segments) -> int:
    """Tile height from the mean non-empty segment length: decode batches (a few tokens per adapter) get 16-row tiles,
    prefill/training batches 128. A heuristic for the bench to tune."""
    lengths = [c for c in (seg.n_base,) + seg.counts if c]
    mean = sum(lengths) / max(len(lengths), 1)
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 256 else 128


def _pick_fuse(n: int, block_m: int) -> bool:
    """Fuse the shrink into the GEMM's K loop when a separate pass over inp would cost more than the fused extra MMA
    work (BLOCK_R / BLOCK_N): narrow outputs (k/v_proj) and decode. Crossover ~ flops / (bandwidth * R) ~ 2k columns."""
    return n <= 2048 or block_m <= 32


def _lora_linear(inp, w, p, q, scales, seg: Segments, bias=None, block_m=None, fuse_shrink=None):
    """out = inp @ w + bias + LoRA, and mid = s[a] * inp[perm] @ p[a] (sorted rows, fp32; base rows left unset).

    inp [T, K]; w [K, N]; p [NA, K, R]; q [NA, R, N]: any strides, so the forward passes (x, W^T, A^T, B^T) and the
    backward (dY, W, B, A) as views without copies."""
    T, K = inp.shape
    N, R = w.shape[1], p.shape[2]
    out = _empty((T, N), _store_dtype(inp.dtype), inp.device)
    mid = _empty((T, R), torch.float32, inp.device)
    if T == 0:
        return out.to(inp.dtype), mid
    bm = block_m or _pick_block_m(seg)
    fuse = _pick_fuse(N, bm) if fuse_shrink is None else fuse_shrink
    prec, br = _precision(inp.dtype), _block_r(R)
    if seg.n_lora and not fuse:
        _shrink(inp, p, scales, seg, mid, bm)
    tiles = seg.tiles[bm]
    grid = lambda meta: (tiles.shape[0] * triton.cdiv(N, meta["BLOCK_N"]),)
    _gemm_tuned[grid](
        inp, w, bias if bias is not None else inp, p, q, scales, seg.perm, tiles, mid, out,
        tiles.shape[0], N, K, R,
        inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1), p.stride(2),
        q.stride(0), q.stride(1), q.stride(2), mid.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, FUSE_SHRINK=fuse and seg.n_lora > 0, ADD_OUT=False, PRECISION=prec, BLOCK_M=bm,
        BLOCK_R=br)
    return out.to(inp.dtype), mid


def _expand_into(out, mid, q, seg: Segments, block_m=64):
    """out[perm[pos]] += mid[pos] @ q[a] in place, LoRA rows only (q [NA, R, N], any strides): the expand half of
    the unfused baseline that kernels/bench.py times against the fused path (same kernel, ADD_OUT)."""
    tiles = seg.tiles[block_m][seg.n_base_tiles[block_m]:]
    if tiles.shape[0] == 0:
        return out
    if out.dtype != _store_dtype(out.dtype):
        raise ValueError(f"_expand_into: out is {out.dtype}; the interpreter path needs float32")
    N, R = out.shape[1], q.shape[1]
    grid = lambda meta: (tiles.shape[0] * triton.cdiv(N, meta["BLOCK_N"]),)
    _expand_tuned[grid](
        q, q, q, q, q, mid, seg.perm, tiles, mid, out,             # inp, w, bias, p: unused with ADD_OUT
        tiles.shape[0], N, 0, R,
        0, 0, 0, 0, 0, 0, 0, q.stride(0), q.stride(1), q.stride(2), mid.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=False, FUSE_SHRINK=False, ADD_OUT=True, PRECISION=_precision(out.dtype), BLOCK_M=block_m,
        BLOCK_R=_block_r(R))
    return out


def _shrink(inp, p, scales, seg: Segments, mid, block_m=64):
    """mid[pos] = s[a] * inp[perm[pos]] @ p[a] for the LoRA positions (p [NA, K, R], any strides)."""
    tiles = seg.tiles[block_m][seg.n_base_tiles[block_m]:]             # LoRA tiles only
    if tiles.shape[0] == 0:
        return mid
    K, R = inp.shape[1], p.shape[2]
    _shrink_tuned[(tiles.shape[0],)](
        inp, p, scales, seg.perm, tiles, mid, K, R,
        inp.stride(0), inp.stride(1), p.stride(0), p.stride(1), p.stride(2), mid.stride(0),
        PRECISION=_precision(inp.dtype), BLOCK_M=block_m, BLOCK_R=_block_r(R))
    return mid


def _segment_outer(u, v, seg: Segments, u_gather: bool, v_gather: bool, dtype):
    """G[a] = U_a^T V_a -> [NA, P, Q] in `dtype`; U [T, P] and V [T, Q] indexed by token (gather) or position."""
    P, Q, NA = u.shape[1], v.shape[1], seg.n_adapters
    out = _empty((NA, P, Q), _store_dtype(dtype), u.device)
    if NA == 0:
        return out.to(dtype)
    wide = 32 if _INTERPRET else 64                                   # the rank side (mid, dyb) is one block,
    bp = wide if u_gather else _block_r(P)                            # the x / dY side is tiled
    bq = wide if v_gather else _block_r(Q)
    _outer_tuned[(NA, triton.cdiv(P, bp), triton.cdiv(Q, bq))](
        u, v, seg.perm, seg.offsets, out, P, Q,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), out.stride(2),
        U_GATHER=u_gather, V_GATHER=v_gather, DTYPE=_TL_DTYPE[dtype], PRECISION=_precision(dtype),
        BLOCK_P=bp, BLOCK_Q=bq)
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Autograd.

class _MultiLoRA(torch.autograd.Function):
    """y = x W^T + b + s[a] (x A[a]^T) B[a]^T per token (W, b frozen; scales s constant).

    Forward keeps mid = s[a] x A[a]^T ([T, R], sorted order). Backward, for token t with adapter a and g_t = dL/dy_t:
        dL/dx_t = g_t W + s (g_t B[a]) A[a]            the same fused GEMM with (dY, W, B, A) for (x, W^T, A^T, B^T);
                                                       its shrink dyb = s dY B[a] ([T, R]) is kept
        dL/dA[a] = sum_{t in a} s (g_t B[a])^T x_t    = dyb_a^T x_a        (_segment_outer)
        dL/dB[a] = sum_{t in a} g_t^T (s x_t A[a]^T)  = dY_a^T mid_a       (_segment_outer)
    Zero-padded ranks stay zero: for a padded r, A[a][r] = 0 and B[a][:, r] = 0, so mid[:, r] = 0 and dyb[:, r] = 0,
    hence dA[a][r] = 0 and dB[a][:, r] = 0 exactly. Base-only tokens (a = -1) contribute only g_t W.
    """

    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scales, seg, block_m, fuse_shrink):
        y, mid = _lora_linear(x2, weight.t(), lora_a.transpose(1, 2), lora_b.transpose(1, 2), scales, seg,
                              bias, block_m, fuse_shrink)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, scales, mid)
        ctx.seg, ctx.block_m, ctx.fuse_shrink = seg, block_m, fuse_shrink
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, scales, mid = ctx.saved_tensors
        seg = ctx.seg
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dx = da = db = dyb = None
        if need_x:
            dx, dyb = _lora_linear(dy, weight, lora_b, lora_a, scales, seg, None, ctx.block_m, ctx.fuse_shrink)
        elif need_a:
            dyb = _shrink(dy, lora_b, scales, seg, _empty((dy.shape[0], lora_a.shape[1]), torch.float32, dy.device))
        if need_a:
            da = _segment_outer(dyb, x2, seg, u_gather=False, v_gather=True, dtype=lora_a.dtype)    # [NA, R, in]
        if need_b:
            db = _segment_outer(dy, mid, seg, u_gather=True, v_gather=False, dtype=lora_b.dtype)    # [NA, out, R]
        return dx, None, None, da, db, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Public entry point.

def _check(x, weight, bias, lora_a, lora_b, scales, seg, triton_path: bool):
    """Shapes, dtypes and devices, before any launch; each error names the offending tensor."""
    def desc(t):
        return f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"multi_lora: {name} must be a tensor, got {type(t).__name__}")
    if not isinstance(seg, Segments):
        raise ValueError(f"multi_lora: seg must be a Segments from make_segments, got {type(seg).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"multi_lora: weight has {desc(weight)}; expected [out, in]")
    n_out, n_in = weight.shape
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"multi_lora: x has {desc(x)}; expected [..., in={n_in}] (weight is [{n_out}, {n_in}])")
    T = x.numel() // max(n_in, 1)
    if T != seg.n_tokens:
        raise ValueError(f"multi_lora: x has {T} tokens ({desc(x)}) but seg was made for {seg.n_tokens} adapter ids")
    NA = seg.n_adapters
    if lora_a.dim() != 3 or lora_a.shape[0] != NA or lora_a.shape[2] != n_in:
        raise ValueError(f"multi_lora: lora_a has {desc(lora_a)}; expected [n_adapters={NA}, R, in={n_in}]")
    R = lora_a.shape[1]
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"multi_lora: lora_a has rank R={R} ({desc(lora_a)}); supported 1 <= R <= {MAX_RANK}")
    if tuple(lora_b.shape) != (NA, n_out, R):
        raise ValueError(f"multi_lora: lora_b has {desc(lora_b)}; expected [n_adapters={NA}, out={n_out}, R={R}]")
    if tuple(scales.shape) != (NA,) or scales.dtype != torch.float32:
        raise ValueError(f"multi_lora: scales has {desc(scales)}; expected [{NA}] float32")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,)):
        raise ValueError(f"multi_lora: bias has {desc(bias) if isinstance(bias, torch.Tensor) else type(bias)}; "
                         f"expected [out={n_out}] or None")
    named = [("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)]
    named += [("bias", bias)] if bias is not None else []
    for name, t in named:
        if t.dtype != x.dtype:
            raise ValueError(f"multi_lora: {name} has {desc(t)}; expected dtype {x.dtype} like x")
    for name, t in named + [("scales", scales), ("seg.perm", seg.perm)]:
        if t.device != x.device:
            raise ValueError(f"multi_lora: {name} has {desc(t)}; expected device {x.device} like x")
    if triton_path:
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"multi_lora: x has {desc(x)}; the Triton path takes float32, bfloat16 or float16")
        if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
            raise ValueError("multi_lora: weight and bias must be frozen (requires_grad=False) on the Triton path")


def multi_lora(x, weight, bias, lora_a, lora_b, scales, seg: Segments, backend: str = "auto", *,
               block_m: int | None = None, fuse_shrink: bool | None = None):
    """y = x W^T + bias + s[a] (x A[a]^T) B[a]^T per token. x [..., in] -> y [..., out]; grads to x, lora_a, lora_b.

    backend: "auto" (Triton on CUDA, torch on CPU), "triton" (CPU needs TRITON_INTERPRET=1), "torch".
    block_m / fuse_shrink override the tile-height and shrink-fusion heuristics (tests and the bench)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"multi_lora: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return multi_lora_torch(x, weight, bias, lora_a, lora_b, scales, seg)
    _check(x, weight, bias, lora_a, lora_b, scales, seg, triton_path=True)
    if not x.is_cuda and not _INTERPRET:
        raise ValueError("multi_lora: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                         "kernels.multi_lora is imported")
    if block_m is not None and block_m not in BLOCK_MS:
        raise ValueError(f"multi_lora: block_m must be one of {BLOCK_MS}, got {block_m}")
    x2 = x.reshape(-1, x.shape[-1])                                     # [T, in]
    y = _MultiLoRA.apply(x2, weight, bias, lora_a, lora_b, scales, seg, block_m, fuse_shrink)
    return y.reshape(*x.shape[:-1], weight.shape[0])
