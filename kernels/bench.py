"""`mcl bench lora`: the fused multi-adapter LoRA linear against the base GEMM and the PyTorch alternatives.

    mcl bench lora --json --out bench/results/      # GPU: Qwen2.5-7B projections, T in {64, 512, 8192}, bf16
    mcl bench lora --quick --json                   # fewer repeats (GPU: T in {64, 8192}); on CPU a smoke run

For every projection shape, token count T, adapter mix (even, or skewed 70/20/7/3 %; tokens in shuffled order, as a
serving batch arrives) and pass (fwd; fwd+bwd = forward + grads to x, A, B with W frozen), one process times:
  base        x W^T (+ b) alone through F.linear (cuBLAS); its fwd+bwd is the base forward + dX
  peft_loop   PEFT's mixed-batch forward: base, then per adapter gather rows, two matmuls, index_add_ (the index
              tensors are built once per batch, outside the timing, as Segments are)
  gather_bmm  base + per-token gather of A[a], B[a] and two bmms (skipped when the gathered B exceeds 2 GiB)
  unfused     cuBLAS base, then two more launches: our shrink kernel and our expand-only kernel adding into y
              (backward: cuBLAS dY W, shrink, expand-into, and the same dA/dB kernels as ours)
  ours        multi_lora(backend="triton"): expand in the GEMM epilogue, shrink fused or separate (heuristic)
  ours_alt    ours with the other shrink placement (to tune multi_lora._pick_fuse; not with --quick)
GPU: CUDA-event timings by triton.testing.do_bench (L2 flushed between reps), medians after warm-up; random inputs,
never zero. CPU: tiny fp32 shapes and the torch paths only ("ours" = multi_lora_torch; the Triton interpreter is far
too slow to time). Each row records the relative error of ours against the PEFT loop. With --json the last stdout line
is one JSON object {"device", "torch", "triton", "rows": [...], "goals": [...], ...}; --out also writes it (a
directory -> <dir>/lora_<device>.json, rewritten after every shape so a timeout keeps the rows done).
"""
from __future__ import annotations

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

N_ADAPTERS = 4
SKEW = (0.70, 0.20, 0.07, 0.03)
GOALS = [  # (description, pass, T or None for all, ratio field, bound, "le" | "ge")
    ("fwd, T=8192: ours within 1.05x of base cuBLAS", "fwd", 8192, "ours_vs_base", 1.05, "le"),
    ("fwd+bwd, T=8192: ours within 1.10x of base fwd + dX", "fwd+bwd", 8192, "ours_vs_base", 1.10, "le"),
    ("decode fwd, T=64: ours within 1.25x of base", "fwd", 64, "ours_vs_base", 1.25, "le"),
    ("fwd+bwd: ours >= 2x faster than the PEFT loop", "fwd+bwd", None, "peft_loop_vs_ours", 2.0, "ge"),
]


def _shapes(model: str):
    """[(op, same-shaped ops, in, out, has_bias)] of one decoder layer's projections."""
    from engine.config import PRESETS
    if model not in PRESETS:
        raise ValueError(f"mcl bench lora: --model {model!r} is not a preset ({', '.join(PRESETS)})")
    c = PRESETS[model]
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return [("q_proj", ["o_proj"], c.dim, q, c.qkv_bias), ("k_proj", ["v_proj"], c.dim, kv, c.qkv_bias),
            ("gate_proj", ["up_proj"], c.dim, c.intermediate_size, False),
            ("down_proj", [], c.intermediate_size, c.dim, False)]


def _adapter_ids(T: int, mix: str, g: torch.Generator) -> torch.Tensor:
    if mix == "even":
        ids = torch.arange(T) % N_ADAPTERS
    else:
        counts = [max(1, int(T * w)) for w in SKEW[1:]]
        ids = torch.repeat_interleave(torch.arange(N_ADAPTERS), torch.tensor([T - sum(counts)] + counts))
    return ids[torch.randperm(T, generator=g)]


class _Unfused(torch.autograd.Function):
    """cuBLAS base GEMM, then a separate shrink and a separate expand-into launch; the same dA/dB kernels as ours."""

    @staticmethod
    def forward(ctx, x, A, B, W, b, s, seg):
        from kernels import multi_lora as ml
        bm = ml._pick_block_m(seg)
        y = F.linear(x, W, b)
        mid = ml._shrink(x, A.transpose(1, 2), s, seg, torch.empty(x.shape[0], A.shape[1], device=x.device), bm)
        ml._expand_into(y, mid, B.transpose(1, 2), seg, bm)
        ctx.save_for_backward(x, A, B, W, s, mid)
        ctx.seg = seg
        return y

    @staticmethod
    def backward(ctx, dy):
        from kernels import multi_lora as ml
        x, A, B, W, s, mid = ctx.saved_tensors
        seg, bm = ctx.seg, ml._pick_block_m(ctx.seg)
        dx = dy @ W
        dyb = ml._shrink(dy, B, s, seg, torch.empty(x.shape[0], A.shape[1], device=x.device), bm)
        ml._expand_into(dx, dyb, A, seg, bm)
        dA = ml._segment_outer(dyb, x, seg, u_gather=False, v_gather=True, dtype=A.dtype)
        dB = ml._segment_outer(dy, mid, seg, u_gather=True, v_gather=False, dtype=B.dtype)
        return dx, dA, dB, None, None, None, None


def _methods(x, W, b, A, B, s, ids, seg, gpu: bool):
    """name -> f(x, A, B) -> y, every one computing the same y; None where a method does not run here."""
    from kernels import multi_lora as ml
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
        xa = torch.bmm(A[ids], x[:, :, None])                          # [T, R, 1]   per-token A[a]
        return y + torch.bmm(B[ids], xa)[:, :, 0] * s[ids].to(x.dtype)[:, None]   # [T, out]

    def ours(x, A, B):
        return ml.multi_lora(x, W, b, A, B, s, seg, backend="triton")

    fuse = ml._pick_fuse(W.shape[0], ml._pick_block_m(seg))

    def ours_alt(x, A, B):
        return ml.multi_lora(x, W, b, A, B, s, seg, backend="triton", fuse_shrink=not fuse)

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
        for i in range(2 + (3 if quick else 15)):
            for t in grads:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            if i >= 2:                                                 # two warm-up calls
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return timed


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def _rel_err(got, ref):
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _case(op, n_in, n_out, has_bias, T, mix, dtype, device, rank, timed, quick, gpu):
    """Both passes of one (shape, T, mix): two rows."""
    from kernels import multi_lora as ml
    g = torch.Generator().manual_seed(zlib.crc32(f"{op} {T} {mix}".encode()))
    rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(device, dtype)
    x, dy = rnd(T, n_in), rnd(T, n_out)
    W, b = rnd(n_out, n_in, std=n_in ** -0.5), (rnd(n_out) if has_bias else None)
    A, B = rnd(N_ADAPTERS, rank, n_in, std=n_in ** -0.5), rnd(N_ADAPTERS, n_out, rank, std=rank ** -0.5)
    s = torch.full((N_ADAPTERS,), 2.0, device=device)                 # alpha / r = 64 / 32
    ids = _adapter_ids(T, mix, g).to(device)
    seg = ml.make_segments(ids, N_ADAPTERS)
    methods, fuse = _methods(x, W, b, A, B, s, ids, seg, gpu)
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        row = {"op": op, "in": n_in, "out": n_out, "T": T, "mix": mix, "pass": pass_,
               "block_m": ml._pick_block_m(seg), "fuse_shrink": fuse}
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
                        outs[name] = [y.detach()] + [t.grad.clone() for t in grads]
                    row[f"{name}_ms"] = _sig(timed(fn, grads))
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_ms"] = None
                torch.cuda.empty_cache()
        base, ours, peft = row["base_ms"], row["ours_ms"], row["peft_loop_ms"]
        row["ours_vs_base"] = _sig(ours / base) if ours and base else None
        row["peft_loop_vs_ours"] = _sig(peft / ours) if ours and peft else None
        if "ours" in outs and "peft_loop" in outs:
            row["rel_err"] = _sig(max(_rel_err(o, p) for o, p in zip(outs["ours"], outs["peft_loop"])), 3)
        rows.append(row)
    return rows


def _goals(rows):
    out = []
    for desc, pass_, T, field, bound, how in GOALS:
        vals = [r[field] for r in rows if r["pass"] == pass_ and (T is None or r["T"] == T) and r[field] is not None]
        met = [v for v in vals if (v <= bound if how == "le" else v >= bound)]
        worst = (max(vals) if how == "le" else min(vals)) if vals else None
        out.append({"goal": desc, "rows": len(vals), "met": len(met), "worst": worst})
    return out


def _out_path(out: str, device_name: str) -> Path:
    p = Path(out)
    if p.is_dir() or out.endswith("/") or not p.suffix:
        slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
        return p / f"lora_{slug}.json"
    return p


def main(args):
    import triton

    gpu_ok = torch.cuda.is_available()
    device = args.device or ("cuda" if gpu_ok else "cpu")
    gpu = device.startswith("cuda")
    if gpu and not gpu_ok:
        raise ValueError(f"mcl bench lora: --device {device} but CUDA is not available")
    device_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.machine()})"
    if gpu:
        model = args.model or "qwen2.5-7b-instruct"
        dtype, rank, Ts = torch.bfloat16, 32, ((64, 8192) if args.quick else (64, 512, 8192))
    else:
        model = args.model or "tiny"
        dtype, rank, Ts = torch.float32, 8, ((16,) if args.quick else (8, 64))
    timed = _timer(gpu, args.quick)
    result = {
        "bench": "lora", "device": device_name, "torch": torch.__version__, "triton": triton.__version__,
        "command": " ".join(["mcl"] + sys.argv[1:]) if Path(sys.argv[0]).name == "mcl" else " ".join(sys.argv),
        "model": model, "dtype": str(dtype).removeprefix("torch."), "adapters": N_ADAPTERS, "rank": rank,
        "mixes": {"even": "T/4 tokens per adapter", "skewed": "70/20/7/3 % of tokens"},
        "timer": "triton.testing.do_bench median, L2 flushed" if gpu else "time.perf_counter median",
        "notes": ([] if gpu else ["CPU run: torch paths only; 'ours' is multi_lora_torch (the engine's CPU path); "
                                  "Triton kernels are not timed on CPU (the interpreter is for tests only)"]),
        "same_shape_as": {}, "rows": [], "goals": [], "complete": False,
    }
    path = _out_path(args.out, device_name) if args.out else None
    t_start = time.perf_counter()
    for op, same, n_in, n_out, has_bias in _shapes(model):
        result["same_shape_as"].update({o: op for o in same})
        for T in Ts:
            for mix in ("even", "skewed"):
                for r in _case(op, n_in, n_out, has_bias, T, mix, dtype, device, rank, timed, args.quick, gpu):
                    result["rows"].append(r)
                    print(f"[{time.perf_counter() - t_start:6.1f}s] {op:9s} {n_in}->{n_out} T={T:<5d} {mix:6s} "
                          f"{r['pass']:7s} base {r['base_ms']} ms  ours {r['ours_ms']} ms ({r['ours_vs_base']}x base)"
                          f"  peft_loop {r['peft_loop_ms']}  gather_bmm {r['gather_bmm_ms']}  unfused "
                          f"{r['unfused_ms']}  ours_alt {r['ours_alt_ms']}  err {r.get('rel_err')}", flush=True)
        if path:
            _write(path, result)
    result["complete"] = True
    if gpu:
        result["goals"] = _goals(result["rows"])
        for gl in result["goals"]:
            print(f"goal: {gl['goal']}: {gl['met']}/{gl['rows']} rows, worst {gl['worst']}")
    else:
        result["notes"].append("the GPU goals are not evaluated on CPU")
    if path:
        _write(path, result)
        print(f"wrote {path}")
    if args.json:
        print(json.dumps(result))
    return 0


def _write(path: Path, result: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
