"""Batch-1 decode speed and peak RSS of `weights="q4"`, this tree against another checkout (the code before a change).

    python -m bench.decode_speed --before /path/to/old/checkout --out bench/results/     # the three embedded models
    python -m bench.decode_speed --models smollm2-135m --rounds 1                          # this tree only
    python -m bench.decode_speed --profile --models qwen2.5-coder-0.5b                     # where a step's time goes
    python -m bench.decode_speed --kernels --out bench/results/                            # the matmul paths alone
    python -m bench.decode_speed --kernels --isa avx2,avx512vnni --out bench/results/      # ISA variants side by side
    python -m bench.decode_speed --stream --out bench/results/                             # one-row kernel from DRAM
    MCL_CPU_ISA=avx2 python -m bench.decode_speed --models smollm2-135m                     # one variant, whole model

Each measurement is a fresh subprocess per (model, tree) (peak RSS = resource.getrusage's ru_maxrss of that process:
load + prefill + decode), the trees alternating round by round so that a machine shared with other work loads both
sides alike; inside a worker the thread counts alternate too. A worker loads the model, prefills a 64-token prompt,
then times decode steps (engine.serving.steps.decode_one, greedy), median ms per step over its rounds.
Workers' OpenMP threads wait at a barrier by spinning 10,000 rounds, then sleeping (GOMP_SPINCOUNT=10000, --wait
bounded): on a quiet machine as fast as spinning (1.5B, 2 threads: 21.6-24.2 tok/s vs 22.0-22.4), on a shared one no
starvation of the thread they wait for (unbounded spinning there: 0.19 vs 5.5 tok/s). --wait passive
(OMP_WAIT_POLICY=PASSIVE, the setting of earlier tables) sleeps at once and pays a wake-up per parallel region,
~250 per step: 13-16 tok/s on the same 1.5B; --wait spin keeps OpenMP's default. --profile adds a cProfile breakdown
of decode steps: the packed matmul kernel, attention (incl. the KV cache), the rest.
--kernels --isa times the ISA variants of the integer kernel (engine/cpu/library.py) in turn on the same inputs, with
each one's ratio to the first (`int8_<isa>_vs_<first>_m<rows>` > 1: faster); --shapes, --rows and --reps shrink a
run. --stream times the one-row kernel over 24 different weights of each shape, hundreds of MB that no cache holds
(--kernels' single weight of <= 16 MB may sit in a large L3), against a plain 1 GiB read (torch's fp32 sum) on the
same threads: a decode step of a model is this streaming. Every JSON records the CPU model and its ISA flags
(kernels.cpu_info.isa()).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args) -> dict:
    import torch

    import engine
    from engine.kv_cache import KVCache
    from engine.loading.hub import load_model
    from engine.serving.steps import decode_one, prefill
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device="cpu", weights=args.weights)
    load_s = time.perf_counter() - t0
    cache = KVCache(model.cfg, 1, 64 + args.steps * (args.rounds * len(args.threads) + 1) + 8)
    ids = (tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n") * 8)[:64]
    res = {}
    with torch.inference_mode():
        logits = prefill(model, cache, [ids], torch.arange(1))
        pos = len(ids)
        last = logits.argmax(-1)
        times = {n: [] for n in args.threads}

        def steps(n):
            nonlocal pos, last
            for _ in range(n):
                logits = decode_one(model, cache, last, torch.tensor([pos]), None, kv_len=pos + 1)
                last, pos = logits.argmax(-1), pos + 1

        torch.set_num_threads(args.threads[0])
        steps(2)                                                            # warm-up (kernel build, caches)
        for _ in range(args.rounds):
            for n in args.threads:
                torch.set_num_threads(n)
                t = time.perf_counter()
                steps(args.steps)
                times[n].append((time.perf_counter() - t) / args.steps)
        if args.profile:
            res["profile"] = profile(lambda: steps(args.steps), args.steps)
    res.update({"model": args.model, "engine": str(Path(engine.__file__).parent.parent), "load_s": round(load_s, 1),
                "tok_s": {str(n): round(1 / statistics.median(v), 2) for n, v in times.items()},
                "ms_per_step_all": {str(n): [round(x * 1e3, 1) for x in v] for n, v in times.items()},
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                "step_bytes": getattr(model, "pack_stats", {}).get("step_bytes")})
    return res


def profile(fn, n_steps: int) -> dict:
    """cProfile of n_steps decode steps; self time grouped: packed matmul kernel, attention + KV cache, the rest."""
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    st = pstats.Stats(pr).stats                                             # (file, line, fn) -> (cc, nc, tt, ct, callers)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    total = 0.0
    for (file, _, fname), (_, _, tt, _, _) in st.items():
        total += tt
        if fname in ("qmatmul", "quantize_x", "linear", "_weight_int4pack_mm_for_cpu", "_dequant_mm", "dequant"):
            groups["matmul"] += tt
        elif fname in ("decode_attention", "_small_q_attention", "update", "read", "softmax",
                       "scaled_dot_product_attention") or "kv_cache" in file:
            groups["attention"] += tt
        else:
            groups["other"] += tt
    top = sorted(((tt, f"{Path(f).name}:{fn_}") for (f, _, fn_), (_, _, tt, _, _) in st.items()), reverse=True)[:8]
    return {"ms_per_step": round(total / n_steps * 1e3, 2),
            "share": {k: round(v / total, 3) for k, v in groups.items()},
            "top_self_ms_per_step": {name: round(tt / n_steps * 1e3, 2) for tt, name in top}}


KERNEL_SHAPES = {"smollm2 gate|up Q4_1": ("Q4_1", 3072, 576), "qwen 0.5b down Q6_K": ("Q6_K", 896, 4864),
                 "qwen 0.5b gate|up Q5_0": ("Q5_0", 9728, 896), "qwen 0.5b head Q8_0": ("Q8_0", 151936, 896),
                 "qwen 1.5b gate|up Q4_K": ("Q4_K", 17920, 1536)}


def kernels(threads: list[int], isas: list[str], rows=(1, 2, 4, 8, 16, 64), shapes=(), reps: int = 5) -> list[dict]:
    """Per real projection shape (random GGUF blocks; `shapes`: names containing one of these, all when empty): fp32
    F.linear, the integer kernel in each ISA variant of `isas` (engine/cpu/library.py; the first is the baseline of
    the ratios) and dequant + SGEMM at several batch rows, median ms of `reps` after a warm-up, the variants taking
    turns on each input; GB/s = packed bytes read per integer-kernel call / time."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import engine.cpu.kernels as ck
    from bench.common import env_var
    from engine.cpu.library import select_isa

    def med(fn):
        return statistics.median(_times(fn, reps)) * 1e3

    out = []
    rng = np.random.default_rng(0)
    for name, (typ, N, K) in KERNEL_SHAPES.items():
        if shapes and not any(s in name for s in shapes):
            continue
        pk = _random_packed(typ, N, K, rng)
        dense = pk.dequantize() if N * K <= 40_000_000 else None
        for nt in threads:
            torch.set_num_threads(nt)
            row = {"shape": name, "N": N, "K": K, "threads": nt, "packed_mb": round(pk.nbytes() / 1e6, 1)}
            for m in rows:
                x = torch.randn(m, K)
                a = pk.args()
                with env_var("MCL_DEQUANT_MIN_M", str(1 << 30)):
                    for isa in isas:
                        if select_isa(isa) != isa:
                            raise SystemExit(f"decode_speed: the {isa} kernels disagree with AVX2 here (stderr)")
                        row[f"int8_{isa}_ms_m{m}"] = round(med(lambda: ck.qmatmul(x, [a])), 3)
                    select_isa()
                for isa in isas[1:]:
                    row[f"int8_{isa}_vs_{isas[0]}_m{m}"] = round(row[f"int8_{isas[0]}_ms_m{m}"] /
                                                                 row[f"int8_{isa}_ms_m{m}"], 3)
                with env_var("MCL_DEQUANT_MIN_M", "0"):
                    row[f"dequant_sgemm_ms_m{m}"] = round(med(lambda: ck.qmatmul(x, [a])), 3)
                if dense is not None:
                    row[f"fp32_linear_ms_m{m}"] = round(med(lambda: F.linear(x, dense)), 3)
            if 1 in rows:
                for isa in isas:
                    row[f"int8_{isa}_gb_s_m1"] = round(pk.nbytes() / row[f"int8_{isa}_ms_m1"] / 1e6, 1)
            print(row, flush=True)
            out.append(row)
    return out


def _times(fn, reps: int) -> list[float]:
    """Seconds of `reps` calls of fn after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def _random_packed(typ: str, N: int, K: int, rng):
    """A PackedLinear of random blocks of GGUF type `typ` with small finite fp16 scales."""
    import numpy as np

    from engine.cpu.packed import BLOCK_BYTES, PackedLinear
    per, nb = BLOCK_BYTES[typ]
    raw = rng.integers(0, 256, size=(N * K // per, nb), dtype=np.uint8)
    for off in {"Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}[typ]:
        raw[:, off:off + 2] = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return PackedLinear.from_gguf(raw, typ, N, K)


def stream(threads: list[int], shapes=(), copies: int = 24, reps: int = 5) -> list[dict]:
    """GB/s of a plain read and of the one-row integer kernel over `copies` different weights per shape (best of
    `reps` passes after a warm-up pass)."""
    import numpy as np
    import torch

    def best(fn):
        return min(_times(fn, reps))

    out = []
    rng = np.random.default_rng(0)
    for nt in threads:
        torch.set_num_threads(nt)
        x = torch.ones(1 << 28)
        row = {"threads": nt, "plain_read_gb_s": round(4 * x.numel() / best(lambda: x.sum()) / 1e9, 1)}
        del x
        for name, (typ, N, K) in KERNEL_SHAPES.items():
            if (shapes and not any(s in name for s in shapes)) or N * K > 40_000_000:
                continue
            pks = [_random_packed(typ, N, K, rng) for _ in range(copies)]
            xin = torch.randn(1, K)
            total = sum(p.nbytes() for p in pks)
            row[f"{name}: MB"] = round(total / 1e6)
            row[f"{name}: GB/s"] = round(total / best(lambda: [p(xin) for p in pks]) / 1e9, 1)
            del pks
        print(row, flush=True)
        out.append(row)
    return out


def _commit(tree: Path) -> str:
    """The tree's git commit (+ "-dirty" with uncommitted changes), or "" outside git."""
    r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


WAIT_ENV = {"bounded": {"GOMP_SPINCOUNT": "10000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {}}


def run_worker(tree: Path, model: str, a) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--model", model, "--steps", str(a.steps), "--rounds", str(a.rounds),
           "--weights", a.weights, "--threads", *map(str, a.threads)] + (["--profile"] if a.profile else [])
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=str(tree), **WAIT_ENV[a.wait])     # both sides alike (the module docstring: why bounded)
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"model": model, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--before", default="", help="another checkout to compare with (e.g. a git worktree of HEAD~)")
    ap.add_argument("--rounds", type=int, default=2, help="subprocess rounds per tree (and timing rounds inside)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="time the matmul paths alone on real projection shapes")
    ap.add_argument("--isa", default="", help="--kernels: ISA variants side by side, e.g. avx2,avx512vnni (default: "
                                              "every variant this CPU runs; the first is the ratios' baseline)")
    ap.add_argument("--shapes", nargs="*", default=[], help="--kernels: only shapes whose name contains one of these")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64], help="--kernels: rows of x")
    ap.add_argument("--reps", type=int, default=5, help="--kernels: timed calls per measurement (median)")
    ap.add_argument("--stream", action="store_true", help="the one-row kernel over weights no cache holds vs a read")
    ap.add_argument("--wait", choices=sorted(WAIT_ENV), default="bounded", help="OpenMP barrier wait in the workers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return
    if a.stream:
        from bench.common import device_name, isa, write_result
        write_result({"bench": "decode_speed --stream", "device": device_name("cpu"), **isa(), "copies": 24,
                      "command": "python -m bench.decode_speed --stream " + " ".join(sys.argv[2:]),
                      "rows": stream(a.threads, a.shapes)}, a.out, "stream_cpu.json")
        return
    if a.kernels:
        from bench.common import device_name, isa, write_result
        from engine.cpu.kernels import dequant_min_m
        from engine.cpu.library import VARIANTS, missing_flags
        isas = a.isa.split(",") if a.isa else [n for n in VARIANTS if not missing_flags(n)]
        for n in isas:
            if n not in VARIANTS or missing_flags(n):
                ap.error(f"--isa {n}: " + (f"this CPU lacks {', '.join(missing_flags(n))}" if n in VARIANTS else
                                           f"expected some of {', '.join(VARIANTS)}"))
        write_result({"bench": "decode_speed --kernels", "device": device_name("cpu"), **isa(),
                      "isas": isas, "dequant_min_m": dequant_min_m(),
                      "rows": kernels(a.threads, isas, a.rows, a.shapes, a.reps)}, a.out, "kernels_cpu.json")
        return
    trees = {"after": HERE.parent.parent} | ({"before": Path(a.before).resolve()} if a.before else {})
    rows = []
    for model in a.models:
        runs = {k: [] for k in trees}
        for _ in range(a.rounds):
            for side, tree in trees.items():
                runs[side].append(run_worker(tree, model, a))
                print(side, runs[side][-1], flush=True)
        row = {"model": model}
        for side, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                row[side] = {"error": rs[-1].get("error")}
                continue
            row[side] = {"tok_s": {n: round(statistics.median(r["tok_s"][n] for r in ok), 2) for n in ok[0]["tok_s"]},
                         # contention only adds time: the fastest round is the least disturbed estimate
                         "best_tok_s": {n: round(1e3 / min(x for r in ok for x in r["ms_per_step_all"][n]), 2)
                                        for n in ok[0]["tok_s"]},
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in ok), "step_bytes": ok[0].get("step_bytes"),
                         "load_s": ok[0]["load_s"], "runs": ok}
        if "before" in row and "error" not in row["before"] and "error" not in row["after"]:
            row["speedup"] = {n: round(row["after"]["tok_s"][n] / row["before"]["tok_s"][n], 2)
                              for n in row["after"]["tok_s"]}
            row["speedup_best"] = {n: round(row["after"]["best_tok_s"][n] / row["before"]["best_tok_s"][n], 2)
                                   for n in row["after"]["tok_s"]}
        rows.append(row)
    from bench.common import device_name, isa, write_result
    write_result({"bench": "decode_speed", "device": device_name("cpu"), **isa(), "weights": a.weights,
                  "isa": os.environ.get("MCL_CPU_ISA", "automatic"), "rows": rows,
                  "omp_wait": {"wait": a.wait, **WAIT_ENV[a.wait]}, "command": " ".join(sys.argv),
                  "commits": {side: _commit(tree) for side, tree in trees.items()},
                  "note": "machine shared with other work: compare within a row (sides alternate), not across runs"},
                 a.out, "decode_speed_cpu.json")


if __name__ == "__main__":
    main()
