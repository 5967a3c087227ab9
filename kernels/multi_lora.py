"""Multi-adapter LoRA linear: one launch serves a batch whose tokens use different adapters.

    y[t] = x[t] W^T + bias + s[a] * (x[t] A[a]^T) B[a]^T        a = adapter id of token t (-1: base only)

    x [T, in] ---------------------- x W^T (the base GEMM, W frozen) -------------------+--> y [T, out]
        |                                                                               |
        +-- perm: rows sorted by adapter --> mid = s[a] x A[a]^T  [T, R] --> mid B[a]^T -+  (epilogue of the same GEMM)

Shapes: W [out, in]; bias [out] or None; A stacked [N, R, in]; B stacked [N, out, R]; scales [N] fp32. Adapters of
different ranks are stored zero-padded to R = max rank (<= MAX_RANK); padded entries get exactly zero gradient.
Any strides are accepted (bias and scales are made contiguous at the op boundary).

Contents, top to bottom:
  Segments / make_segments   per batch, once: token order grouped by adapter + row-tile tables of fixed size, computed
                             on the ids' device with no host sync (CUDA-graph capturable); host counts only on request
  multi_lora_ref             the oracle: per-token gather of A/B + bmm (tests run it in float64)
  multi_lora_torch           the fast plain-torch path: base matmul + per adapter segment a matmul pair
  _shrink_kernel             mid[pos] = s[a] * x[perm[pos]] A[a]^T over row tiles of one adapter each
  _gemm_expand_kernel        out[perm[pos]] = inp[perm[pos]] w + bias + mid[pos] q[a]  (shrink optionally fused in)
  _decode_kernel             few tokens, no grad: one row tile over all tokens in their own order, W read once per
                             column tile for every adapter; shrink against all adapters' A, per-token block kept
  _segment_outer_kernel      G[a] = U_a^T V_a summed over the tokens of adapter a  (dA, dB)
  torch.ops.mcl.*            the launchers registered as custom ops (fake impls, autograd): torch.compile traces them
  multi_lora                 validation + dispatch (backend "auto" | "triton" | "torch")

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set it before this module is imported).
    TRITON_INTERPRET=1 python -m pytest tests/kernels -q        # tests against multi_lora_ref in float64
    python -m kernels.bench --json --out bench/results/         # timings (kernels/bench.py); design notes: NOTES.md
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

DENSE_MAX_T = 64                  # torch path: at most this many tokens -> one dense pass over all adapters
DECODE_MAX_T = 64                 # Triton path without grad: at most this many tokens -> _decode_kernel
DECODE_MAX_COLS = 256             # ... when next_pow2(n_adapters) * BLOCK_R fits one accumulator of this width
MAX_RANK = 128                    # BLOCK_R <= 128 keeps the fused shrink accumulator in registers
BLOCK_MS = (16, 32, 64, 128)      # row-tile heights with a tile table in every Segments
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # read when triton.jit is (at import), so they agree


# ----------------------------------------------------------------------------------------------------------------------
# Segments: computed once per batch, shared by every LoRA layer of the forward and backward.

@dataclass(frozen=True)
class Segments:
    """Token order grouped by adapter. Positions `pos` index the sorted order; tokens `perm[pos]` index x.

    Device tensors (fixed shapes given T and N, no host sync to build; what the Triton path reads):
    ids       [T] int64   adapter id per token (-1 = base only), token order (the decode kernel reads these)
    perm      [T] int64   token indices sorted stably by adapter id; base-only (-1) tokens first
    offsets   [N+1] int64 adapter a's tokens are perm[offsets[a]:offsets[a+1]]; offsets[0] = n_base
    tiles     {BLOCK_M: [T // BLOCK_M + N + 1, 3] int64}  row tiles (start, end, adapter) over positions: every
              position in exactly one tile, no tile straddles two adapters, base tiles (adapter -1) first; the rows
              after the last real tile are padding (0, 0, -1), so the table's size never depends on the ids' values
    Host values (the torch path and tests; None unless make_segments(host_counts=True), the default on CPU):
    counts    tokens per adapter; n_base; in_order (perm is the identity: tokens come grouped, the trainer's
              batches); onehot [T, N] fp32 (few-token torch path only)
    """
    ids: torch.Tensor
    perm: torch.Tensor
    offsets: torch.Tensor
    tiles: dict
    n_adapters: int
    counts: tuple | None = None
    n_base: int | None = None
    onehot: torch.Tensor | None = None
    in_order: bool = False

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    @property
    def n_lora(self) -> int | None:
        return None if self.counts is None else self.n_tokens - self.n_base

    def with_counts(self) -> "Segments":
        """The same Segments with the host values filled in (one device->host copy: a sync on CUDA)."""
        if self.counts is not None:
            return self
        ids = self.ids.to("cpu")
        counts = torch.bincount(ids + 1, minlength=self.n_adapters + 1).tolist()
        return replace(self, counts=tuple(counts[1:]), n_base=counts[0],
                       onehot=F.one_hot(ids + 1, self.n_adapters + 1)[:, 1:].float().to(self.ids.device)
                       if ids.numel() <= DENSE_MAX_T else None,
                       in_order=bool((ids[1:] >= ids[:-1]).all()))


def _tile_table(bounds: torch.Tensor, bm: int, n_rows: int) -> torch.Tensor:
    """Segment bounds [S+1] (device) -> [n_rows, 3] rows (start, end, adapter), tiles of <= bm positions per segment,
    padding rows (0, 0, -1) after the last. n_rows >= sum ceil(len_s / bm), fixed by the caller from T and S."""
    lo, hi = bounds[:-1], bounds[1:]                                    # [S] segment s = adapter s - 1
    n_t = (hi - lo + bm - 1) // bm                                     # tiles per segment
    last = torch.cumsum(n_t, 0)                                        # tile index one past segment s's tiles
    i = torch.arange(n_rows, device=bounds.device)
    s = torch.searchsorted(last, i, right=True)                        # segment of tile i (S: padding)
    real = s < lo.numel()
    sc = s.clamp(max=lo.numel() - 1)
    start = lo[sc] + (i - (last[sc] - n_t[sc])) * bm
    end = torch.minimum(start + bm, hi[sc])
    zero = torch.zeros_like(start)
    return torch.stack([torch.where(real, start, zero), torch.where(real, end, zero),
                        torch.where(real, sc - 1, zero - 1)], dim=1)


def make_segments(adapter_ids: torch.Tensor, n_adapters: int, *, host_counts: bool | None = None) -> Segments:
    """Per-token adapter ids [T] (-1 = base only) -> Segments on the ids' device.

    The device tables come from tensor ops whose output shapes depend only on T and n_adapters (no .item(), no
    .tolist(), no nonzero): a decode step including this call can be captured in a CUDA graph; tests run it on the
    meta device to prove it. host_counts (default: True on CPU, False on CUDA) adds the host counts the torch path
    uses, with one sync; ids are range-checked with a ValueError then, else by a device-side assert."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype.is_floating_point or adapter_ids.is_complex() \
            or adapter_ids.dtype == torch.bool:
        raise ValueError(f"make_segments: adapter_ids must be an integer tensor, got "
                         f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)}")
    if n_adapters < 0:
        raise ValueError(f"make_segments: n_adapters must be >= 0, got {n_adapters}")
    if host_counts is None:
        host_counts = adapter_ids.device.type == "cpu"
    ids = adapter_ids.reshape(-1).to(torch.int64)
    if host_counts:
        host = ids.to("cpu")
        bad = (host < -1) | (host >= n_adapters)
        if bad.any():
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"make_segments: adapter_ids[{t}] = {int(host[t])} is outside [-1, {n_adapters}) "
                             f"(shape {tuple(adapter_ids.shape)}, -1 = base only, n_adapters = {n_adapters})")
    elif ids.device.type != "meta":
        torch._assert_async(((ids >= -1) & (ids < n_adapters)).all(),
                            f"make_segments: adapter_ids outside [-1, {n_adapters})")
    T, S = ids.numel(), n_adapters + 1
    perm = torch.sort(ids, stable=True).indices                        # base (-1) first, then adapter 0, 1, ...
    counts = torch.zeros(S, dtype=torch.int64, device=ids.device).scatter_add_(0, ids + 1, torch.ones_like(ids))
    bounds = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # [0, n_base, end_0, ..., end_{N-1}]
    seg = Segments(ids=ids, perm=perm, offsets=bounds[1:],
                   tiles={bm: _tile_table(bounds, bm, T // bm + S) for bm in BLOCK_MS}, n_adapters=n_adapters)
    return seg.with_counts() if host_counts else seg


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
    base_out: x W^T + bias computed by the caller (engine/cpu/packed.py's packed weights); `weight` is then only checked."""
    _check(x, weight, bias, lora_a, lora_b, scales, seg, triton_path=False)
    seg = seg.with_counts()                                             # host counts (a sync if made without them)
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
    K, R, n_split,
    stride_im, stride_ik, stride_pa, stride_pk, stride_pr, stride_ms, stride_mm,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program per row tile: mid[pos, :R] = s[a] * inp[perm[pos]] @ p[a]   (p[a] is a [K, R] view).

    Launched over the whole tile table (its size is fixed, so no host count is needed): base tiles (adapter -1) and
    padding rows get an empty row range and no K iterations, so they load and store nothing.
    Split-K: grid axis 1 cuts the K loop into n_split parts; part s writes its partial sum to mid[s] (stride_ms), and
    the GEMM's epilogue adds the parts (deterministic, no atomics). Few LoRA tiles (T <= ~1k) then fill the GPU."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(tile_ptr + tile * 3)
    adapter = tl.load(tile_ptr + tile * 3 + 2)
    end = tl.where(adapter >= 0, tl.load(tile_ptr + tile * 3 + 1), start)   # base tile: no rows
    a_idx = tl.maximum(adapter, 0)                                     # keeps the addresses in range
    k_tiles = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(k_tiles, n_split)
    k_lo = split * per                                                 # this part's K tiles: [k_lo, k_hi)
    k_hi = tl.where(adapter >= 0, tl.minimum(k_lo + per, k_tiles), k_lo)
    pos = start + tl.arange(0, BLOCK_M)
    row_ok = pos < end
    tok = tl.load(perm_ptr + pos, mask=row_ok, other=0)               # tok = perm[pos]
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    x_ptrs = inp_ptr + tok[:, None] * stride_im + (k_lo * BLOCK_K + offs_k[None, :]) * stride_ik   # inp[tok, k]
    p_ptrs = p_ptr + a_idx * stride_pa + (k_lo * BLOCK_K + offs_k[:, None]) * stride_pk + offs_r[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi):
        k_ok = offs_k < K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        pt = tl.load(p_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        acc = _mma(xt, pt, acc, PRECISION)                             # acc += x[tok, k:k+BK] @ p[a][k:k+BK, :]
        x_ptrs += BLOCK_K * stride_ik
        p_ptrs += BLOCK_K * stride_pk
    acc = acc * tl.load(scale_ptr + a_idx)                            # * s[a]
    tl.store(mid_ptr + split * stride_ms + pos[:, None] * stride_mm + offs_r[None, :], acc,
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def _gemm_expand_kernel(
    inp_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, scale_ptr, perm_ptr, tile_ptr, mid_ptr, mid_out_ptr, out_ptr,
    n_tiles, N, K, R,
    stride_im, stride_ik, stride_wk, stride_wn, stride_pa, stride_pk, stride_pr,
    stride_qa, stride_qr, stride_qn, stride_ms, stride_mm, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[tok] = inp[tok] @ w + bias + mid[pos] @ q[a] for the rows of one tile (one adapter a) and BLOCK_N columns.

    w is a [K, N] view, p[a] [K, R], q[a] [R, N]. With FUSE_SHRINK, mid = s[a] * inp[tok] @ p[a] is accumulated in the
    same K loop from the already-loaded inp tiles (no second read of inp; costs BLOCK_R / BLOCK_N extra MMA work) and
    the pid_n == 0 program writes it out for the backward; otherwise mid was written by _shrink_kernel and is read here.
    Padding rows of the tile table (start = end) run no K iterations and store nothing. SPLIT_K > 1 (separate shrink
    only): mid holds SPLIT_K partial sums [SPLIT_K, T, R]; they are added here and the pid_n == 0 program writes the
    sum to mid_out for the backward.
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
    x_ptrs = inp_ptr + tok[:, None] * stride_im + offs_k[None, :] * stride_ik   # inp[tok, k]: gathered rows
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # w[k, n]
    if FUSE_SHRINK:
        p_ptrs = p_ptr + a_idx * stride_pa + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr
        # A base-only tile (adapter -1) loads no p: its rank bound is 0. Folding the scalar has_lora into a
        # block mask keeps every mask a block of i1 (triton >= 3.9's interpreter rejects block & scalar).
        p_r_ok = offs_r < tl.where(has_lora, R, 0)
    n_k = tl.where(end > start, tl.cdiv(K, BLOCK_K), 0)               # padding row of the table: nothing to do
    for k in range(0, n_k):
        k_ok = offs_k < K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(xt, wt, acc, PRECISION)                             # acc += inp[tok, k:k+BK] @ w[k:k+BK, n]
        if FUSE_SHRINK:
            pt = tl.load(p_ptrs, mask=k_ok[:, None] & p_r_ok[None, :], other=0.0)
            mid = _mma(xt, pt, mid, PRECISION)                         # mid += inp[tok, k:k+BK] @ p[a][k:k+BK, :]
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
            for s in tl.static_range(1, SPLIT_K):                      # split-K shrink: add the other parts
                mid += tl.load(mid_ptrs + s * stride_ms, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            if SPLIT_K > 1:
                if pid_n == 0:
                    tl.store(mid_out_ptr + pos[:, None] * stride_mm + offs_r[None, :], mid,
                             mask=row_ok[:, None] & r_ok[None, :])
        q_ptrs = q_ptr + adapter * stride_qa + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn
        qt = tl.load(q_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mma(_round(mid, qt.dtype, PRECISION), qt, acc, PRECISION)   # acc += mid[pos] @ q[a][:, n]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _decode_kernel(
    inp_ptr, w_ptr, bias_ptr, p_ptr, q_ptr, scale_ptr, ids_ptr, out_ptr,
    T, N, K, R, NA,
    stride_im, stride_ik, stride_wk, stride_wn, stride_pa, stride_pk, stride_pr,
    stride_qa, stride_qr, stride_qn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Few tokens, forward only: out[t] = inp[t] @ w + bias + s[a_t] * (inp[t] @ p[a_t]) @ q[a_t], tokens in their
    own order (no perm, no tile table: only ids), one row tile of BLOCK_M >= T tokens per column block of w.

    Every adapter's tokens share the row tile, so each w[:, n-block] is read once for all adapters (the sorted path
    reads it once per adapter tile). The shrink runs against all adapters at once: p viewed as [K, C], column
    c = a * BLOCK_R + r, so mid[t, c] = inp[t] @ p[a][:, r] for every a (NA x the shrink FLOPs, which at decode are
    ~NA*R/N of the GEMM's); the epilogue keeps token t's own block (c // BLOCK_R == a_t), scales it by s[a_t] and
    multiplies by q viewed as [C, n-block]: one MMA expands every adapter."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    row_ok = offs_m < T
    n_ok = offs_n < N
    c_a = offs_c // BLOCK_R                                            # adapter of column c
    c_r = offs_c % BLOCK_R                                             # rank index of column c
    c_ok = (c_a < NA) & (c_r < R)
    adapter = tl.load(ids_ptr + offs_m, mask=row_ok, other=-1)        # a_t (-1: base only)
    x_ptrs = inp_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_ik
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    p_ptrs = p_ptr + c_a[None, :] * stride_pa + offs_k[:, None] * stride_pk + c_r[None, :] * stride_pr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mid = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        pt = tl.load(p_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(xt, wt, acc, PRECISION)                             # acc += inp[t, k-block] @ w[k-block, n]
        mid = _mma(xt, pt, mid, PRECISION)                             # mid += inp[t, k-block] @ p[:, k-block, :]
        x_ptrs += BLOCK_K * stride_ik
        w_ptrs += BLOCK_K * stride_wk
        p_ptrs += BLOCK_K * stride_pk
    scale = tl.load(scale_ptr + c_a, mask=c_ok, other=0.0)            # s[a] per column
    own = c_a[None, :] == adapter[:, None]                             # token t keeps block a_t only (-1: none)
    mid = tl.where(own, mid * scale[None, :], 0.0)
    q_ptrs = q_ptr + c_a[:, None] * stride_qa + c_r[:, None] * stride_qr + offs_n[None, :] * stride_qn
    qt = tl.load(q_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
    acc = _mma(_round(mid, qt.dtype, PRECISION), qt, acc, PRECISION)   # acc += mid[t, own block] @ q[a_t][:, n]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _segment_outer_kernel(
    u_ptr, v_ptr, perm_ptr, offsets_ptr, out_ptr,
    P, Q, n_chunks,
    stride_um, stride_up, stride_vm, stride_vq, stride_oc, stride_oa, stride_op, stride_oq,
    U_GATHER: tl.constexpr, V_GATHER: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[a, p, q] = sum over positions pos of adapter a of U[row_u, p] * V[row_v, q]   (G[a] = U_a^T V_a).

    row = perm[pos] for a gathered operand (x, dY: token order), pos for a sorted one (mid, dyb). Grid (adapter x
    chunk, P blocks, Q blocks): each adapter's segment is cut into n_chunks equal token ranges, chunk c writing its
    partial sum to out[c] (stride_oc; summed by the launcher), so a big segment of a skewed mix is spread over
    n_chunks x the programs instead of leaving a tail (deterministic: no atomics). Empty segments write zeros."""
    adapter = tl.program_id(0) // n_chunks
    chunk = tl.program_id(0) % n_chunks
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    seg_lo = tl.load(offsets_ptr + adapter)
    seg_hi = tl.load(offsets_ptr + adapter + 1)
    per = tl.cdiv(seg_hi - seg_lo, n_chunks)
    lo = seg_lo + chunk * per                                          # this chunk's positions: [lo, hi)
    hi = tl.minimum(lo + per, seg_hi)
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
    out_ptr += chunk * stride_oc + adapter * stride_oa
    tl.store(out_ptr + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq,
             acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------------
# Autotuning (CUDA) / one small config (interpreter). tests/kernels/test_compile_sm90.py compiles every config below
# for sm_90 and reports registers and spills.

def _gemm_configs(shapes):
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes]


if _INTERPRET:
    _GEMM_WIDE = _GEMM_DECODE = _gemm_configs([(32, 32, 4, 1)])
    _DECODE = [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
else:
    _GEMM_WIDE = _gemm_configs([(256, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 64, 4, 4)])
    _GEMM_DECODE = _gemm_configs([(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (32, 256, 4, 4), (128, 64, 4, 5)])
    _DECODE = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
               for n, k, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3), (32, 256, 4, 4), (128, 128, 8, 3)]]


def autotuning() -> bool:
    """False with MCL_AUTOTUNE=0: each kernel tries only the first config of its list (tests on a GPU: compile time,
    not speed). Read at each launch that autotunes (a key already tuned keeps its config)."""
    return os.environ.get("MCL_AUTOTUNE", "1") != "0"


def _prune_first(configs, named_args, **kwargs):
    return configs if autotuning() else configs[:1]


def _prune_gemm(configs, named_args, **kwargs):
    """Decode-sized row tiles (BLOCK_M <= 32) try the long-K, narrow-N configs; prefill/training tiles the wide ones."""
    return _prune_first(_GEMM_DECODE if kwargs["BLOCK_M"] <= 32 else _GEMM_WIDE, named_args)


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


_FIRST = {"early_config_prune": _prune_first}
_shrink_tuned = triton.autotune(configs=_shrink_configs(), key=["K", "R", "n_split", "BLOCK_M", "BLOCK_R"],
                                prune_configs_by=_FIRST)(_shrink_kernel)
_outer_tuned = triton.autotune(configs=_outer_configs(), key=["P", "Q", "n_chunks", "BLOCK_P", "BLOCK_Q"],
                               prune_configs_by=_FIRST)(_segment_outer_kernel)
_gemm_tuned = triton.autotune(configs=_GEMM_WIDE if _INTERPRET else _GEMM_WIDE + _GEMM_DECODE,
                              key=["N", "K", "R", "BLOCK_M", "FUSE_SHRINK", "SPLIT_K", "HAS_BIAS"],
                              prune_configs_by={"early_config_prune": _prune_gemm})(_gemm_expand_kernel)
_decode_tuned = triton.autotune(configs=_DECODE, key=["N", "K", "BLOCK_M", "BLOCK_C", "HAS_BIAS"],
                                prune_configs_by=_FIRST)(_decode_kernel)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers: pick block sizes from the batch shape, allocate, launch. They take the Segments' device tensors only.

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


def _decode_cols(n_adapters: int, r: int) -> int:
    """Width of the decode kernel's all-adapters shrink accumulator: next_pow2(N) * BLOCK_R."""
    return max(1, triton.next_power_of_2(max(n_adapters, 1))) * _block_r(r)


def _pick_block_m(n_tokens: int, n_adapters: int) -> int:
    """Tile height from the mean tokens per adapter, known on the host without looking at the ids (no sync): decode
    batches (a few tokens per adapter) get 16-row tiles, prefill/training batches 128. A heuristic for the bench."""
    mean = n_tokens / max(n_adapters, 1)
    return 16 if mean <= 16 else 32 if mean <= 32 else 64 if mean <= 256 else 128


def _pick_fuse(n: int, block_m: int) -> bool:
    """Fuse the shrink into the GEMM's K loop when a separate pass over inp would cost more than the fused extra MMA
    work (BLOCK_R / BLOCK_N): narrow outputs (k/v_proj) and decode. Crossover ~ flops / (bandwidth * R) ~ 2k columns."""
    return n <= 2048 or block_m <= 32


def _n_sm(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _pick_split(n_tiles: int, k: int, device) -> int:
    """Parts of the separate shrink's K loop: enough that tiles x parts fills the SMs, a power of two <= 8, and
    parts of >= 256 columns. 1 once the tile table alone has half an SM count of rows (T >~ 4k at BLOCK_M=64)."""
    split = 1
    while split < 8 and n_tiles * split * 2 <= _n_sm(device) and k >= 512 * split:
        split *= 2
    return split


def _lora_linear(inp, w, p, q, scales, perm, tiles, bias, block_m: int, fuse: bool):
    """out = inp @ w + bias + LoRA, and mid = s[a] * inp[perm] @ p[a] (sorted rows, fp32; base rows left unset).

    inp [T, K]; w [K, N]; p [NA, K, R]; q [NA, R, N]: any strides, so the forward passes (x, W^T, A^T, B^T) and the
    backward (dY, W, B, A) as views without copies. tiles: the Segments' table for block_m."""
    T, K = inp.shape
    N, R = w.shape[1], p.shape[2]
    out = _empty((T, N), _store_dtype(inp.dtype), inp.device)
    mid = _empty((T, R), torch.float32, inp.device)
    if T == 0:
        return out.to(inp.dtype), mid
    prec, br = _precision(inp.dtype), _block_r(R)
    fuse = fuse and p.shape[0] > 0
    split = 1 if fuse or p.shape[0] == 0 else _pick_split(tiles.shape[0], K, inp.device)
    parts = mid if split == 1 else _empty((split, T, R), torch.float32, inp.device)   # split-K partial sums
    if not fuse and p.shape[0]:
        _shrink(inp, p, scales, perm, tiles, parts, block_m, split)
    grid = lambda meta: (tiles.shape[0] * triton.cdiv(N, meta["BLOCK_N"]),)
    _gemm_tuned[grid](
        inp, w, bias if bias is not None else inp, p, q, scales, perm, tiles, parts, mid, out,
        tiles.shape[0], N, K, R,
        inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1), p.stride(2),
        q.stride(0), q.stride(1), q.stride(2), T * R if split > 1 else 0, mid.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, FUSE_SHRINK=fuse, SPLIT_K=split, PRECISION=prec, BLOCK_M=block_m, BLOCK_R=br)
    return out.to(inp.dtype), mid


def _shrink(inp, p, scales, perm, tiles, mid, block_m: int, split: int = 1):
    """mid[pos] = s[a] * inp[perm[pos]] @ p[a] for the LoRA positions (p [NA, K, R], any strides); base rows unset.
    split > 1: mid is [split, T, R] (contiguous) and part s holds the sum over the s-th share of K."""
    if tiles.shape[0] == 0 or inp.shape[0] == 0:
        return mid
    K, R = inp.shape[1], p.shape[2]
    _shrink_tuned[(tiles.shape[0], split)](
        inp, p, scales, perm, tiles, mid, K, R, split,
        inp.stride(0), inp.stride(1), p.stride(0), p.stride(1), p.stride(2), mid.stride(0) if split > 1 else 0,
        mid.stride(-2), PRECISION=_precision(inp.dtype), BLOCK_M=block_m, BLOCK_R=_block_r(R))
    return mid


def _pick_chunks(n_tokens: int, n_adapters: int, n_blocks: int, device) -> int:
    """Token chunks per adapter segment in _segment_outer: enough that the biggest segment alone (up to all tokens)
    has >= one program per SM (blocks x chunks >= SMs), a power of two <= 8, >= 256 tokens a chunk on average."""
    chunks = 1
    while chunks < 8 and n_blocks * chunks < _n_sm(device) and n_tokens >= 256 * n_adapters * chunks * 2:
        chunks *= 2
    return chunks


def _segment_outer(u, v, perm, offsets, u_gather: bool, v_gather: bool, dtype):
    """G[a] = U_a^T V_a -> [NA, P, Q] in `dtype`; U [T, P] and V [T, Q] indexed by token (gather) or position."""
    P, Q, NA = u.shape[1], v.shape[1], offsets.numel() - 1
    wide = 32 if _INTERPRET else 64                                   # the rank side (mid, dyb) is one block,
    bp = wide if u_gather else _block_r(P)                            # the x / dY side is tiled
    bq = wide if v_gather else _block_r(Q)
    grid_pq = (triton.cdiv(P, bp), triton.cdiv(Q, bq))
    chunks = _pick_chunks(u.shape[0], NA, grid_pq[0] * grid_pq[1], u.device) if NA else 1
    out = _empty((chunks, NA, P, Q), _store_dtype(dtype) if chunks == 1 else torch.float32, u.device)
    if NA == 0:
        return out[0].to(dtype)
    _outer_tuned[(NA * chunks,) + grid_pq](
        u, v, perm, offsets, out, P, Q, chunks,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        U_GATHER=u_gather, V_GATHER=v_gather, DTYPE=_TL_DTYPE[dtype], PRECISION=_precision(dtype),
        BLOCK_P=bp, BLOCK_Q=bq)
    return out[0].to(dtype) if chunks == 1 else out.sum(0).to(dtype)


def _decode(x, weight, bias, lora_a, lora_b, scales, ids):
    """y = multi_lora(...) for T <= DECODE_MAX_T tokens in their own order (forward only): _decode_kernel."""
    T, K = x.shape
    N, NA, R = weight.shape[0], lora_a.shape[0], lora_a.shape[1]
    out = _empty((T, N), _store_dtype(x.dtype), x.device)
    if T == 0:
        return out.to(x.dtype)
    w, p, q = weight.t(), lora_a.transpose(1, 2), lora_b.transpose(1, 2)   # [K, N], [NA, K, R], [NA, R, N]
    bm, br = max(16, triton.next_power_of_2(min(T, DECODE_MAX_T))), _block_r(R)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(T, bm))
    _decode_tuned[grid](
        x, w, bias if bias is not None else x, p, q, scales, ids, out,
        T, N, K, R, NA,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), p.stride(0), p.stride(1), p.stride(2),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), BLOCK_M=bm, BLOCK_R=br,
        BLOCK_C=_decode_cols(NA, R))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees (opaque nodes with fake impls for tracing; autograd registered on the forward).
#
# y = x W^T + b + s[a] (x A[a]^T) B[a]^T per token (W, b frozen; scales s constant). Forward keeps
# mid = s[a] x A[a]^T ([T, R], sorted order). Backward, for token t with adapter a and g_t = dL/dy_t:
#     dL/dx_t = g_t W + s (g_t B[a]) A[a]            the same fused GEMM with (dY, W, B, A) for (x, W^T, A^T, B^T);
#                                                    its shrink dyb = s dY B[a] ([T, R]) is kept
#     dL/dA[a] = sum_{t in a} s (g_t B[a])^T x_t    = dyb_a^T x_a        (_segment_outer)
#     dL/dB[a] = sum_{t in a} g_t^T (s x_t A[a]^T)  = dY_a^T mid_a       (_segment_outer)
# Zero-padded ranks stay zero: for a padded r, A[a][r] = 0 and B[a][:, r] = 0, so mid[:, r] = 0 and dyb[:, r] = 0,
# hence dA[a][r] = 0 and dB[a][:, r] = 0 exactly. Base-only tokens (a = -1) contribute only g_t W.

_FWD_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scales, Tensor perm, "
               "Tensor offsets, Tensor tiles, int block_m, bool fuse) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scales, Tensor mid, "
               "Tensor perm, Tensor offsets, Tensor tiles, int block_m, bool fuse, bool need_x, bool need_a, "
               "bool need_b) -> (Tensor, Tensor, Tensor)")
_DECODE_SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor scales, "
                  "Tensor ids) -> Tensor")


def _fwd_impl(x, weight, bias, lora_a, lora_b, scales, perm, offsets, tiles, block_m, fuse):
    return _lora_linear(x, weight.t(), lora_a.transpose(1, 2), lora_b.transpose(1, 2), scales, perm, tiles, bias,
                        block_m, fuse)


def _bwd_impl(dy, x, weight, lora_a, lora_b, scales, mid, perm, offsets, tiles, block_m, fuse, need_x, need_a, need_b):
    none = x.new_empty(0)
    dx = da = db = dyb = None
    if need_x:
        dx, dyb = _lora_linear(dy, weight, lora_b, lora_a, scales, perm, tiles, None, block_m, fuse)
    elif need_a:
        dyb = _shrink(dy, lora_b, scales, perm, tiles, _empty((dy.shape[0], lora_a.shape[1]), torch.float32,
                                                              dy.device), block_m)
    if need_a:
        da = _segment_outer(dyb, x, perm, offsets, u_gather=False, v_gather=True, dtype=lora_a.dtype)   # [NA, R, in]
    if need_b:
        db = _segment_outer(dy, mid, perm, offsets, u_gather=True, v_gather=False, dtype=lora_b.dtype)  # [NA, out, R]
    return (dx if dx is not None else none, da if da is not None else none.clone(),
            db if db is not None else none.clone())


_lora_fwd_op = torch.library.custom_op("mcl::lora_fwd", _fwd_impl, mutates_args=(), schema=_FWD_SCHEMA)
_lora_bwd_op = torch.library.custom_op("mcl::lora_bwd", _bwd_impl, mutates_args=(), schema=_BWD_SCHEMA)
_lora_decode_op = torch.library.custom_op("mcl::lora_decode", _decode, mutates_args=(), schema=_DECODE_SCHEMA)


@_lora_fwd_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, perm, offsets, tiles, block_m, fuse):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[1], dtype=torch.float32)


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, scales, mid, perm, offsets, tiles, block_m, fuse, need_x, need_a, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(lora_a) if need_a else x.new_empty(0),
            torch.empty_like(lora_b) if need_b else x.new_empty(0))


@_lora_decode_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scales, ids):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scales, perm, offsets, tiles, block_m, fuse = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, lora_a, lora_b, scales, output[1], perm, offsets, tiles)
    ctx.block_m, ctx.fuse = block_m, fuse


def _backward(ctx, dy, _dmid):
    x, weight, lora_a, lora_b, scales, mid, perm, offsets, tiles = ctx.saved_tensors
    need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    dx, da, db = _lora_bwd_op(dy, x, weight, lora_a, lora_b, scales, mid, perm, offsets, tiles, ctx.block_m,
                              ctx.fuse, need_x, need_a, need_b)
    return (dx if need_x else None, None, None, da if need_a else None, db if need_b else None,
            None, None, None, None, None, None)


_lora_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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
               block_m: int | None = None, fuse_shrink: bool | None = None, decode: bool | None = None):
    """y = x W^T + bias + s[a] (x A[a]^T) B[a]^T per token. x [..., in] -> y [..., out]; grads to x, lora_a, lora_b.

    backend: "auto" (Triton on CUDA, torch on CPU), "triton" (CPU needs TRITON_INTERPRET=1), "torch".
    block_m / fuse_shrink / decode override the tile-height, shrink-fusion and decode-kernel heuristics (tests and the
    bench). decode (default: no grad needed, T <= DECODE_MAX_T, adapters x rank fit DECODE_MAX_COLS) is forward only.
    The Triton path reads only the Segments' device tensors: no host sync, traceable by torch.compile (custom ops)."""
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
    # The kernels read bias and scales with unit stride: a strided view would be read wrongly, so copy it here.
    bias = bias.contiguous() if bias is not None else None
    scales = scales.contiguous()
    x2 = x.reshape(-1, x.shape[-1])                                     # [T, in]
    T, NA, R = x2.shape[0], lora_a.shape[0], lora_a.shape[1]
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    if decode is None:
        decode = not grad and 0 < T <= DECODE_MAX_T and _decode_cols(NA, R) <= DECODE_MAX_COLS
    elif decode and (grad or T > DECODE_MAX_T):
        raise ValueError(f"multi_lora: decode=True is forward only for T <= {DECODE_MAX_T} tokens "
                         f"(got T={T}, grad needed: {grad})")
    if decode:
        y = _lora_decode_op(x2, weight, bias, lora_a, lora_b, scales, seg.ids)
    else:
        bm = block_m or _pick_block_m(T, NA)
        fuse = _pick_fuse(weight.shape[0], bm) if fuse_shrink is None else fuse_shrink
        y, _ = _lora_fwd_op(x2, weight, bias, lora_a, lora_b, scales, seg.perm, seg.offsets, seg.tiles[bm], bm, fuse)
    return y.reshape(*x.shape[:-1], weight.shape[0])
