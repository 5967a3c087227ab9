"""`mcl bench serve`: continuous batching with mixed roles vs per-role batches vs one request at a time; n samples
of one prompt in one request (one shared prefill) vs n separate requests.

    mcl bench serve --json                                  # SmolLM2-135M on the CPU, 64 requests
    mcl bench serve --json --device cuda --model qwen2.5-7b-instruct --out bench/results/   # GPU: 7B shapes, random weights
    mcl bench serve --json --quick --model tiny             # smoke test: the tiny preset, random weights

The same 64 requests (mixed roles, prompt lengths 16-192, budgets 8-96 new tokens, greedy, EOS ignored so
every mode produces exactly the same number of tokens) run three ways in one process:
  continuous_mixed   one scheduler, all requests submitted at once, decode batches mix adapters
  per_role_batches   one role at a time: that role's requests through the scheduler, then the next role
  sequential         one request at a time (n_slots=1)
Four rank-32 adapters with random non-zero weights are attached (speed does not depend on their values).
Then n = 4 samples (temperature 1, top-p 0.95, seeded, EOS ignored: the same number of tokens every way) of each
of 8 prompts (4 with --quick), 32 new tokens each (8 with --quick), three ways in one process:
  n4_one_request          submit_n(prompt, 4): one prefill per prompt, the 4 rows decode in the same batches
  four_requests           4 separate requests per prompt (the prefix cache shares what it can)
  four_requests_no_cache  4 separate requests per prompt, prefix cache off (every row prefills its prompt)
On CUDA with 7B shapes it also measures batch-1 decode against the HBM roofline (weight bytes over measured
copy bandwidth) and batch-64 decode with four adapters against batch-64 with none.
Last line: {"device", "model", "rows": [{"mode", "tok_s", "wall_s"}], "continuous_vs_sequential", "continuous_vs_per_role",
"n_sampling": {"rows": [{"mode", "tok_s", "wall_s", "new_tokens", "prefill_tokens"}], "n4_vs_four_requests"}, ...}.
"""
from __future__ import annotations

import json
import random
import time

import torch

from bench.common import device_name, isa, write_result
from engine.lora import add_adapters
from engine.roles import ROLES
from engine.serving.scheduler import Scheduler, row_seed


def make_requests(n: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab - 100) for _ in range(rng.randint(16, 192))], ROLES[i % 4], rng.randint(8, 96))
            for i in range(n)]


def run(model, tok, requests, n_slots: int) -> tuple[float, int]:
    sched = Scheduler(model, tok, n_slots=n_slots, max_len=512, ignore_eos=True)
    t0 = time.perf_counter()
    futs = [sched.submit(p, adapter=a, max_new_tokens=n) for p, a, n in requests]
    sched.run_until_done()
    wall = time.perf_counter() - t0
    return wall, sum(f.result().new_tokens for f in futs)


def run_n_samples(model, tok, requests, n: int, budget: int, n_slots: int, one_request: bool,
                  prefix_cache: bool = True) -> dict:
    """n seeded samples of each (prompt, role): one submit_n per prompt, or n separate submits per prompt."""
    sched = Scheduler(model, tok, n_slots=n_slots, max_len=512, ignore_eos=True, prefix_cache=prefix_cache)
    kw = dict(max_new_tokens=budget, temperature=1.0, top_p=0.95)
    t0 = time.perf_counter()
    if one_request:
        futs = [f for i, (p, a, _) in enumerate(requests) for f in sched.submit_n(p, n, adapter=a, seed=i, **kw)]
    else:
        futs = [sched.submit(p, adapter=a, seed=row_seed(i, j), **kw) for i, (p, a, _) in enumerate(requests)
                for j in range(n)]
    sched.run_until_done()
    wall = time.perf_counter() - t0
    k = sum(f.result().new_tokens for f in futs)
    return {"tok_s": round(k / wall, 2), "wall_s": round(wall, 3), "new_tokens": k,
            "prefill_tokens": sched.stats["prefill_tokens"]}


def n_sampling(model, tok, requests, n_slots: int, quick: bool) -> dict:
    """n = 4 samples per prompt: one request vs four (with and without the prefix cache), side by side."""
    prompts, budget = requests[: 4 if quick else 8], 8 if quick else 32
    run_n_samples(model, tok, prompts[:1], 4, 4, n_slots, True)                      # warm-up
    rows = [{"mode": mode, **run_n_samples(model, tok, prompts, 4, budget, n_slots, one, cache)} for mode, one, cache in
            [("n4_one_request", True, True), ("four_requests", False, True), ("four_requests_no_cache", False, False)]]
    for r in rows:
        print(f"{r['mode']:>22}: {r['tok_s']:8.1f} tok/s  ({r['wall_s']:.2f} s, {r['new_tokens']} tokens, "
              f"{r['prefill_tokens']} prompt tokens prefilled)", flush=True)
    tps = {r["mode"]: r["tok_s"] for r in rows}
    return {"prompts": len(prompts), "n": 4, "new_tokens_per_row": budget, "rows": rows,
            "n4_vs_four_requests": round(tps["n4_one_request"] / tps["four_requests"], 3),
            "n4_vs_four_requests_no_cache": round(tps["n4_one_request"] / tps["four_requests_no_cache"], 3)}


def _randomise_adapters(model, seed=0):
    for n, p in model.named_parameters():
        if "lora_B" in n:
            g = torch.Generator(device=p.device).manual_seed(seed)
            seed += 1
            p.data.copy_(torch.randn(p.shape, generator=g, device=p.device) * 0.01)


def _load(name, device):
    from engine.config import PRESETS
    from engine.model import Transformer
    if name in ("qwen2.5-7b-instruct", "tiny"):               # shapes only: random weights (7B: bf16)
        with torch.device(device):
            model = Transformer(PRESETS[name])
            model = model.to(torch.bfloat16) if name != "tiny" else model
        model.init_weights(seed=0)
        return model.eval(), None
    from engine.loading.hub import load_model
    return load_model(name, device=device, dtype="bfloat16" if device.startswith("cuda") else "float32")


def main(args):
    name = args.model or "smollm2-135m"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = _load(name, device)
    add_adapters(model, list(ROLES), rank=32, alpha=64)
    model.to(device)
    _randomise_adapters(model)
    n_req = 16 if args.quick else 64
    requests = make_requests(n_req, model.cfg.vocab_size)
    n_slots = 16 if device == "cpu" else 64

    run(model, tok, requests[:4], n_slots)                     # warm-up
    rows = {}
    wall, n = run(model, tok, requests, n_slots)
    rows["continuous_mixed"] = (wall, n)
    wall, n = 0.0, 0
    for role in ROLES:
        w, k = run(model, tok, [r for r in requests if r[1] == role], n_slots)
        wall, n = wall + w, n + k
    rows["per_role_batches"] = (wall, n)
    rows["sequential"] = run(model, tok, requests, 1)
    out_rows = [{"mode": m, "tok_s": round(k / w, 2), "wall_s": round(w, 3), "new_tokens": k} for m, (w, k) in rows.items()]
    for r in out_rows:
        print(f"{r['mode']:>18}: {r['tok_s']:8.1f} tok/s  ({r['wall_s']:.1f} s, {r['new_tokens']} tokens)", flush=True)
    tps = {r["mode"]: r["tok_s"] for r in out_rows}
    result = {"device": device_name(device), **isa(), "model": name, "torch": torch.__version__, "requests": n_req,
              "n_slots": n_slots, "rows": out_rows,
              "continuous_vs_sequential": round(tps["continuous_mixed"] / tps["sequential"], 3),
              "continuous_vs_per_role": round(tps["continuous_mixed"] / tps["per_role_batches"], 3),
              "n_sampling": n_sampling(model, tok, requests, n_slots, args.quick),
              "command": "mcl bench serve" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else "") + f" --model {name} --device {device}"}
    if device.startswith("cuda"):
        result.update(_gpu_decode_checks(model))
    write_result(result, args.out, f"serve_{name}_{device}.json")
    print(json.dumps(result))


@torch.inference_mode()
def _gpu_decode_checks(model) -> dict:
    """Batch-1 decode vs the HBM roofline, and batch-64 decode with four adapters vs none (CUDA only)."""
    from engine.kv_cache import KVCache
    from engine.serving.steps import decode_one
    dev = model.device
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    torch.cuda.synchronize()
    copy_gbs = 2 * buf.numel() * 10 / (time.perf_counter() - t0) / 1e9          # read + write
    del buf, dst
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)

    def decode_time(batch, adapters, ctx=512, steps=32):
        cache = KVCache(model.cfg, batch, ctx + steps + 1, dtype=torch.bfloat16, device=dev)
        last = torch.randint(0, model.cfg.vocab_size, (batch,), device=dev)
        ids = torch.arange(batch, device=dev) % 4 if adapters else None
        pos = torch.full((batch,), ctx, device=dev)
        for _ in range(3):
            decode_one(model, cache, last, pos, None, ids, kv_len=ctx + 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(steps):
            decode_one(model, cache, last, pos + s, None, ids, kv_len=ctx + 1 + s)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    t1 = decode_time(1, False)
    roofline = weight_bytes / (copy_gbs * 1e9)
    t64a, t64 = decode_time(64, True), decode_time(64, False)
    return {"copy_GBps": round(copy_gbs, 1), "weight_bytes": weight_bytes,
            "decode_b1_ms": round(t1 * 1e3, 3), "roofline_b1_ms": round(roofline * 1e3, 3),
            "decode_b1_vs_roofline": round(roofline / t1, 3),
            "decode_b64_4adapters_ms": round(t64a * 1e3, 3), "decode_b64_base_ms": round(t64 * 1e3, 3),
            "b64_adapters_vs_base": round(t64a / t64, 3)}
