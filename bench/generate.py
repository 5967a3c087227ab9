"""`mcl bench generate`: our KV-cached generation vs transformers' `generate`, side by side in one run.

    mcl bench generate --json                      # SmolLM2-135M, batch 1 and 8, greedy, 64 new tokens
    mcl bench generate --json --out bench/results/ # also write the JSON file

Same model file for both (transformers loads the same GGUF with gguf_file=), same prompts (chat-templated),
greedy, exactly N new tokens each (ours ignores EOS, transformers gets min_new_tokens=N), same thread count,
one warm-up each, then the best of `repeats` timed runs, taken round robin over the four runs. transformers pads a batch on the left with an
attention mask; we prefill right-padded and decode every row at its own position.

Four runs per batch size: ours with packed weights (`--weights`, default q4 on the CPU: the GGUF's 4-bit blocks
through torch's int4 kernel, see engine/cpu/packed.py), ours fp32, transformers fp32 (what it makes of a GGUF: it
dequantises to fp32) and transformers bf16. `ratio` is ours-packed / transformers-fp32 (the headline figure);
`ratio_vs_best_hf` divides by the faster of transformers' two. The JSON also reports, per prompt, how many
leading greedy tokens before the first EOS agree (ours fp32 vs transformers fp32 alone; ours packed vs ours fp32): bf16 rounding can
flip a near-tie, after which two continuations legitimately differ.
Prints one JSON object as the last line: {"model", "device", "rows": [{batch, new_tokens, ours_tok_s, hf_tok_s, ratio, ...}]}.

`--peer`: llama.cpp (llama-cpp-python, built for this CPU by `python -m bench.llama_build`; absent -> a one-line
note, no rows; a worker that crashes -> one line in the output and the JSON's "errors") instead of transformers:

    mcl bench generate --peer --json --out bench/results/   # -> generate_peer_cpu.json; also python -m bench.generate --peer

  batch-1 rows for the three embedded models at 2 and 1 threads (`--model`/`--threads` pick one): the same GGUF file,
  the same chat-templated prompt ids, greedy, 64 new tokens (EOS ignored), median of 3 interleaved rounds. Each side
  runs in its own fresh process (`python -m bench.generate --worker ours|llama.cpp`, JSON lines over a pipe), so its
  peak RSS (VmHWM: ru_maxrss would include the parent's, see _peak_rss_kb) is its own; the llama.cpp worker imports neither torch nor our engine. llama.cpp is driven through
  its C API (llama_decode + argmax in numpy: no Python sampler in the loop), as llama-server does minus HTTP.
  The mixed-adapter row (first model, last thread count, 32 new tokens per request): 16 requests over 4 random
  rank-32 adapters, ours in one Scheduler vs llama.cpp
  serving them one adapter configuration at a time (its server cannot batch requests whose LoRAs differ), its 4
  requests per adapter batched as 4 sequences, with the GGUF adapters `mcl export --gguf` wrote.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash map is in two sentences.",
    "def is_prime(n):",
    "List three uses of binary search.",
    "Write a function to reverse a linked list in Python, with a short explanation of the approach.",
    "What is the time complexity of merge sort?",
    "Plan the steps to find the longest common subsequence of two strings.",
    "Fix the bug: def add(a, b): return a - b",
]


def _best(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(args):
    if getattr(args, "peer", False):
        result = peer_main(args)
        if result is not None and args.json:
            print(json.dumps(result))
        return 0
    import torch
    import transformers

    from bench.common import device_name, isa, write_result

    from engine.loading.hub import load_model, model_path
    from engine.serving.generate import generate

    name = args.model or "smollm2-135m"
    device = args.device or "cpu"
    new_tokens = 16 if args.quick else 64
    repeats = 1 if args.quick else 3
    packed = getattr(args, "weights", None) or ("q4" if device == "cpu" else "fp32")
    ours_fp32, tok = load_model(name, device=device, dtype="float32")
    ours_packed = load_model(name, device=device, dtype="float32", weights=packed)[0] if packed != "fp32" else ours_fp32
    gguf = Path(model_path(name))
    hf_models = {dt: transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=getattr(torch, dt)).to(device).eval()
        for dt in ("float32", "bfloat16")}
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    pad = tok.pad_id if tok.pad_id is not None else next(iter(tok.eos_ids))

    def ours(model, ps):
        return [r.token_ids for r in generate(model, ps, new_tokens, ignore_eos=True)]

    def theirs(hf, ps):
        T = max(len(p) for p in ps)
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, T:].tolist()

    runs = {"ours_" + packed: lambda b: ours(ours_packed, prompts[:b]), "ours_fp32": lambda b: ours(ours_fp32, prompts[:b]),
            "hf_fp32": lambda b: theirs(hf_models["float32"], prompts[:b]),
            "hf_bf16": lambda b: theirs(hf_models["bfloat16"], prompts[:b])}
    rows = []
    for batch in (1, 8):
        for fn in runs.values():
            fn(batch)                                                    # warm-up
        best = {key: float("inf") for key in runs}
        for _ in range(repeats):                                         # round robin: a noisy neighbour hits all
            for key, fn in runs.items():
                best[key] = min(best[key], _best(lambda: fn(batch), 1))
        tok_s = {key: round(batch * new_tokens / t, 2) for key, t in best.items()}
        best_hf = max(tok_s["hf_fp32"], tok_s["hf_bf16"])
        rows.append({"batch": batch, "new_tokens": new_tokens, "ours_tok_s": tok_s["ours_" + packed],
                     "hf_tok_s": tok_s["hf_fp32"], "ratio": round(tok_s["ours_" + packed] / tok_s["hf_fp32"], 3),
                     **{k + "_tok_s": v for k, v in tok_s.items()},
                     "ratio_vs_best_hf": round(tok_s["ours_" + packed] / best_hf, 3),
                     "ratio_fp32_vs_hf_fp32": round(tok_s["ours_fp32"] / tok_s["hf_fp32"], 3)})
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in tok_s.items()) + " tok/s", flush=True)
    # Same model on both sides: fp32 greedy tokens must equal transformers' fp32 ones; the packed model's agreement
    # with fp32 (bf16 rounding flips near-ties, after which the continuations differ) is reported, not hidden.
    # transformers is compared prompt by prompt (alone): its left-padded batch is not bitwise its unpadded self.
    # Compared up to the first EOS: past it transformers' min_new_tokens forbids EOS while ours just goes on.
    eos = set(tok.eos_ids)
    cut = lambda xs: [x[:next((i for i, t in enumerate(x) if t in eos), len(x))] for x in xs]
    g32, gpk = cut(ours(ours_fp32, prompts)), cut(ours(ours_packed, prompts))
    ghf = [theirs(hf_models["float32"], [p])[0][:len(g)] for p, g in zip(prompts, g32)]
    def same_prefix(xs, ys):
        return [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y))) for x, y in zip(xs, ys)]
    result = {"model": name, "device": device_name(device), **isa(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "ours_weights": packed, "hf_weights": "fp32 (transformers dequantises the GGUF to fp32)",
              "same_greedy_tokens": g32 == ghf,
              "identical_greedy_prefix": {"before_eos": [len(g) for g in g32], "ours_fp32_vs_hf_fp32": same_prefix(g32, ghf),
                                          f"ours_{packed}_vs_ours_fp32": same_prefix(gpk, g32)},
              "rows": rows,
              "command": "mcl bench generate" + (" --quick" if args.quick else "")
              + (f" --weights {packed}" if getattr(args, "weights", None) else "")
              + (f" --threads {args.threads}" if getattr(args, "threads", None) else "")}
    write_result(result, args.out, f"generate_{device}.json")
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# --peer: llama.cpp (llama-cpp-python) beside ours, batch 1 on every embedded model, and the mixed-adapter row
# ----------------------------------------------------------------------------------------------------------
PEER_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
MIXED = {"requests": 16, "adapters": 4, "rank": 32, "new_tokens": 32}
PREFILL_TOKENS = 512                # the prefill row: one prompt of exactly this many tokens
BATCH = {"rows": 16, "new_tokens": 64}   # the batched-decode row: 16 sequences decoded together (no adapters)


class WorkerDied(RuntimeError):
    """A worker process ended mid-run: llama.cpp killed by a signal (SIGSEGV, SIGILL on a CPU its build does not
    fit), or an exception; the message is one line and the other rows go on."""


class _Worker:
    """One side (ours or llama.cpp) for one model, in its own fresh process (`python -m bench.generate --worker`),
    so that its ru_maxrss is its own peak. Driven by JSON lines on stdin/stdout; stderr goes to a temp file whose
    last line a WorkerDied quotes."""

    def __init__(self, side: str, model: str, weights: str, adapters: list[str] = (), seqs: int = 0,
                 env: dict | None = None, ctx: int = 0):
        import os
        import subprocess
        import sys
        import tempfile

        from engine.loading.hub import model_path
        self.side, self.model = side, model
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_{side}_", suffix=".log")
        cmd = [sys.executable, "-m", "bench.generate", "--worker", side, "--model", model,
               "--gguf", str(model_path(model)), "--weights", weights,
               *(a for p in adapters for a in ("--adapter", str(p))), *(("--seqs", str(seqs)) if seqs else ()),
               *(("--ctx", str(ctx)) if ctx else ())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=str(Path(__file__).resolve().parent.parent),
                                     env={**os.environ, **(env or {})})
        self.ask({"op": "ping"})                                             # wait until the model is loaded

    def ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            import signal
            import subprocess
            try:
                rc = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:                # stdout closed but still running: stop it
                self.proc.kill()
                rc = self.proc.wait()
            self.log.seek(0)
            last = next((ln.strip() for ln in reversed(self.log.readlines()) if ln.strip()), "")
            how = (f"was killed by {signal.Signals(-rc).name}" if -rc in signal.valid_signals()
                   else f"exited with code {rc}")
            raise WorkerDied(f"bench worker {self.side} ({self.model}) {how} on '{msg['op']}'"
                             + (f": {last}" if last else ""))
        return json.loads(line)

    def close(self) -> dict:
        if self.proc.poll() is not None:                    # died already (WorkerDied said how): nothing to ask
            self.log.close()
            return {"maxrss_kb": float("nan")}
        out = self.ask({"op": "rss"})
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()
        return out


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _same_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _chat_prompts(name: str, texts) -> list[list[int]]:
    """Chat-templated prompt ids from the model's own GGUF tokenizer (no weights loaded)."""
    from engine.loading.gguf_header import read_header
    from engine.loading.hub import model_path
    from engine.loading.tokenizer import Tokenizer
    path = model_path(name)
    tok = Tokenizer.from_gguf(read_header(path).meta, source=str(path))
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]


def _batch1_rows(name, packed, threads_list, new_tokens, rounds) -> list[dict]:
    """Batch-1 greedy decode, ours vs llama.cpp, interleaved: round r runs prompt r on both sides at every thread
    count, the side that goes first alternating between rounds."""
    prompts = _chat_prompts(name, PROMPTS)
    sides = {}
    try:
        for s in ("ours", "llama.cpp"):
            sides[s] = _Worker(s, name, packed)
        for w in sides.values():
            w.ask({"op": "gen", "prompt": prompts[-1], "new_tokens": 8, "threads": threads_list[0]})   # warm-up
        got = {(s, t): [] for s in sides for t in threads_list}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for t in threads_list:
                for s in order:
                    got[s, t].append(sides[s].ask({"op": "gen", "prompt": prompts[r % len(prompts)],
                                                   "new_tokens": new_tokens, "threads": t}))
    finally:
        rss = {s: w.close()["maxrss_kb"] / 2**20 for s, w in sides.items()}           # GiB
    rows = []
    for t in threads_list:
        o, l = got["ours", t], got["llama.cpp", t]
        dec = {s: _median([(new_tokens - 1) / g["decode_s"] for g in got[s, t]]) for s in sides}
        tot = {s: _median([new_tokens / (g["prefill_s"] + g["decode_s"]) for g in got[s, t]]) for s in sides}
        cpu = {s: _median([(new_tokens - 1) / g["decode_cpu_s"] for g in got[s, t]]) for s in sides}
        rows.append({
            "model": name, "threads": t, "batch": 1, "new_tokens": new_tokens, "rounds": rounds,
            "ours_weights": packed,
            "ours_decode_tok_s": round(dec["ours"], 2), "llama_cpp_decode_tok_s": round(dec["llama.cpp"], 2),
            "decode_ratio": round(dec["ours"] / dec["llama.cpp"], 3),
            "ours_tok_s_with_prefill": round(tot["ours"], 2), "llama_cpp_tok_s_with_prefill": round(tot["llama.cpp"], 2),
            "ratio_with_prefill": round(tot["ours"] / tot["llama.cpp"], 3),
            "per_round_decode_ratio": [round(b["decode_s"] / a["decode_s"], 3) for a, b in zip(o, l)],
            "ours_decode_cpu_tok_s": round(cpu["ours"], 2), "llama_cpp_decode_cpu_tok_s": round(cpu["llama.cpp"], 2),
            "cpu_decode_ratio": round(cpu["ours"] / cpu["llama.cpp"], 3),
            "ours_peak_rss_gib": round(rss["ours"], 3), "llama_cpp_peak_rss_gib": round(rss["llama.cpp"], 3),
            "rss_ratio": round(rss["ours"] / rss["llama.cpp"], 2),
            "greedy_agreement_tokens": [_same_prefix(a["tokens"], b["tokens"]) for a, b in zip(o, l)],
        })
        print(f"{name} threads {t}: decode ours {dec['ours']:.1f} tok/s, llama.cpp {dec['llama.cpp']:.1f} "
              f"({dec['ours'] / dec['llama.cpp']:.2f}x); peak RSS {rss['ours']:.2f} / {rss['llama.cpp']:.2f} GiB",
              flush=True)
    return rows


def _mixed_row(name, packed, threads, new_tokens, rounds, workdir: Path) -> dict:
    """16 requests over 4 random rank-32 adapters: ours in one Scheduler (every request in flight at once, rows
    of different adapters in one decode batch) vs llama.cpp serving them as its server does, one adapter
    configuration at a time (its 4 requests batched as 4 sequences), with the GGUF adapters `mcl export` wrote."""
    import torch

    from engine.loading.export_gguf import export_gguf
    from engine.loading.hub import load_model
    from engine.lora import add_adapters, save_peft
    n_req, n_ad, rank = MIXED["requests"], MIXED["adapters"], MIXED["rank"]
    names = [f"a{i}" for i in range(n_ad)]
    model, _ = load_model(name, device="cpu", dtype="float32")
    add_adapters(model, names, rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.002)
    peft_dirs, gguf_files = [], []
    for a in names:
        peft_dirs.append(save_peft(model, a, workdir / "peft" / a, base_model=name))
        gguf_files.append(export_gguf(peft_dirs[-1], workdir / f"{a}.gguf", model=name))
    del model
    texts = [f"{PROMPTS[i % len(PROMPTS)]} (request {i})" for i in range(n_req)]   # 16 distinct prompts
    requests = [[p, i % n_ad] for i, p in enumerate(_chat_prompts(name, texts))]
    sides = {}
    try:
        for s, files in (("ours", peft_dirs), ("llama.cpp", gguf_files)):
            sides[s] = _Worker(s, name, packed, files)
        for w in sides.values():
            w.ask({"op": "mixed", "requests": requests[:n_ad], "new_tokens": 4, "threads": threads})   # warm-up
        got = {s: [] for s in sides}
        for r in range(rounds):
            for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                got[s].append(sides[s].ask({"op": "mixed", "requests": requests, "new_tokens": new_tokens,
                                            "threads": threads}))
    finally:
        rss = {s: w.close()["maxrss_kb"] / 2**20 for s, w in sides.items()}
    agg = {s: _median([n_req * new_tokens / x["wall_s"] for x in got[s]]) for s in sides}
    agree = [_same_prefix(a, b) for a, b in zip(got["ours"][0]["tokens"], got["llama.cpp"][0]["tokens"])]
    print(f"{name} mixed {n_req} requests / {n_ad} adapters: ours {agg['ours']:.1f} tok/s, llama.cpp "
          f"{agg['llama.cpp']:.1f} ({agg['ours'] / agg['llama.cpp']:.2f}x)", flush=True)
    return {"model": name, "threads": threads, "requests": n_req, "adapters": n_ad, "rank": rank,
            "new_tokens": new_tokens, "rounds": rounds, "ours_weights": packed,
            "ours": "one Scheduler, 16 slots, every request submitted at once, prefix cache off",
            "llama_cpp": "one context with all 4 exported GGUF adapters loaded; per adapter: set it, prefill its 4 "
                         "prompts as 4 sequences in one batch, decode the 4 together, clear the KV cache",
            "ours_tok_s": round(agg["ours"], 2), "llama_cpp_tok_s": round(agg["llama.cpp"], 2),
            "ratio": round(agg["ours"] / agg["llama.cpp"], 3),
            "ours_peak_rss_gib": round(rss["ours"], 3), "llama_cpp_peak_rss_gib": round(rss["llama.cpp"], 3),
            "greedy_agreement_tokens": agree}


def _long_prompt(name: str, n: int) -> list[int]:
    """A chat-templated prompt of exactly n tokens: a question followed by enough of the other prompts."""
    ids = _chat_prompts(name, [" ".join(PROMPTS * 64)])[0]
    head = _chat_prompts(name, [""])[0]
    return ids[:n - 8] + head[-8:]                                      # ends as a template's assistant turn does


def prefill_rows(name, packed, threads, rounds) -> list[dict]:
    """One prompt of PREFILL_TOKENS tokens, time to the first token: ours (its GEMM dtype: bf16 where the CPU
    multiplies bf16 natively; then also ours with MCL_GEMM_DTYPE=fp32 beside it) vs llama.cpp. Fresh workers that do
    only this, so their peak RSS is the peak through prefill."""
    from engine.cpu.kernels import gemm_dtype
    prompt = _long_prompt(name, PREFILL_TOKENS)
    variants = {"ours": {}, "llama.cpp": {}}
    if gemm_dtype() != __import__("torch").float32:
        variants["ours_fp32_gemm"] = {"MCL_GEMM_DTYPE": "fp32"}
    sides, got = {}, {}
    try:
        for v, env in variants.items():
            sides[v] = _Worker("llama.cpp" if v == "llama.cpp" else "ours", name, packed, env=env,
                               ctx=PREFILL_TOKENS + 16)
            sides[v].ask({"op": "gen", "prompt": prompt, "new_tokens": 2, "threads": threads})      # warm-up
        got = {v: [] for v in sides}
        for r in range(rounds):
            for v in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                got[v].append(sides[v].ask({"op": "gen", "prompt": prompt, "new_tokens": 2, "threads": threads}))
    finally:
        rss = {v: w.close()["maxrss_kb"] / 2**20 for v, w in sides.items()}
    tps = {v: _median([len(prompt) / g["prefill_s"] for g in got[v]]) for v in got}
    row = {"model": name, "threads": threads, "prompt_tokens": len(prompt), "rounds": rounds, "ours_weights": packed,
           "ours_gemm_dtype": str(gemm_dtype()).replace("torch.", "")}
    for v in got:
        row[f"{v.replace('.', '_')}_prefill_tok_s"] = round(tps[v], 1)
        row[f"{v.replace('.', '_')}_peak_rss_gib"] = round(rss[v], 3)
    row["prefill_ratio"] = round(tps["ours"] / tps["llama.cpp"], 3)
    row["rss_ratio"] = round(rss["ours"] / rss["llama.cpp"], 2)
    if "ours_fp32_gemm" in got:
        row["prefill_ratio_fp32_gemm"] = round(tps["ours_fp32_gemm"] / tps["llama.cpp"], 3)
    print(f"{name} prefill {len(prompt)} tokens, threads {threads}: " + ", ".join(f"{v} {tps[v]:.0f} tok/s"
          for v in tps) + f" ({row['prefill_ratio']:.2f}x); peak RSS ours / llama.cpp {rss['ours']:.2f} / "
          f"{rss['llama.cpp']:.2f} GiB", flush=True)
    return [row]


def batch_row(name, packed, threads, rounds) -> dict:
    """BATCH["rows"] chat prompts decoded together, greedy, EOS ignored: decode tok/s after every row has its first
    token (ours: one Scheduler, every request in flight; llama.cpp: one context, one sequence per prompt)."""
    n, new = BATCH["rows"], BATCH["new_tokens"]
    prompts = _chat_prompts(name, [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(n)])
    sides, got = {}, {}
    try:
        for s in ("ours", "llama.cpp"):
            sides[s] = _Worker(s, name, packed, seqs=n)
            sides[s].ask({"op": "batched", "prompts": prompts, "new_tokens": 4, "threads": threads})    # warm-up
        got = {s: [] for s in sides}
        for r in range(rounds):
            for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                got[s].append(sides[s].ask({"op": "batched", "prompts": prompts, "new_tokens": new, "threads": threads}))
    finally:
        rss = {s: w.close()["maxrss_kb"] / 2**20 for s, w in sides.items()}
    tps = {s: _median([n * (new - 1) / g["decode_s"] for g in got[s]]) for s in got}
    agree = [_same_prefix(a, b) for a, b in zip(got["ours"][0]["tokens"], got["llama.cpp"][0]["tokens"])]
    print(f"{name} batched decode {n} rows, threads {threads}: ours {tps['ours']:.1f} tok/s, llama.cpp "
          f"{tps['llama.cpp']:.1f} ({tps['ours'] / tps['llama.cpp']:.2f}x)", flush=True)
    return {"model": name, "threads": threads, "rows": n, "new_tokens": new, "rounds": rounds, "ours_weights": packed,
            "ours_decode_tok_s": round(tps["ours"], 1), "llama_cpp_decode_tok_s": round(tps["llama.cpp"], 1),
            "ratio": round(tps["ours"] / tps["llama.cpp"], 3),
            "ours_peak_rss_gib": round(rss["ours"], 3), "llama_cpp_peak_rss_gib": round(rss["llama.cpp"], 3),
            "greedy_agreement_tokens": agree}


def peer_main(args) -> dict | None:
    """`mcl bench generate --peer`: the llama.cpp rows. Returns the result dict, or None (with a note) when
    llama-cpp-python is not installed."""
    import importlib.metadata
    import importlib.util
    import os
    import subprocess
    import tempfile
    if importlib.util.find_spec("llama_cpp") is None:      # found, never imported here: only the worker loads it
        print("llama.cpp peer rows skipped: llama-cpp-python is not installed (python -m bench.llama_build)")
        return None
    quick = args.quick
    models = [args.model] if args.model else (PEER_MODELS[:1] if quick else PEER_MODELS)
    threads_list = [args.threads] if args.threads else [2, 1]
    new_tokens, rounds = (16, 1) if quick else (64, 3)
    packed = getattr(args, "weights", None) or "q4"
    from bench.common import isa, write_result
    root = str(Path(__file__).resolve().parent.parent)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "kernels", "bench", ":!bench/results"],
                           capture_output=True, text=True, cwd=root).stdout.strip()
    cpu = isa()
    llama_version = importlib.metadata.version("llama_cpp_python")
    result = {"bench": "generate --peer", "device": f"cpu: {cpu['cpu_model']}, {os.cpu_count()} cores", **cpu,
              "peer": f"llama.cpp via llama-cpp-python {llama_version} (ctypes C API, greedy argmax in numpy)",
              "commit": commit + (" (+ uncommitted changes under engine/kernels/bench)" if dirty else ""),
              "method": "each side in its own fresh process (peak RSS = its VmHWM; ru_maxrss would carry the parent's); "
                        "same GGUF file, same chat-templated prompt ids, same thread count; greedy, batch 1, EOS "
                        "ignored; median of interleaved rounds (the side going first alternates); decode tok/s = "
                        "(N-1) / time after the first token; *_cpu_tok_s: the same over the process's CPU time "
                        "(at 1 thread the work done, which other jobs' load does not inflate; at 2 threads it "
                        "includes spin-waiting)",
              "rows": [], "prefill": [], "batched": [], "mixed_adapters": None,
              "command": "mcl bench generate --peer" + (" --quick" if quick else "")
              + (f" --model {args.model}" if args.model else "") + (f" --threads {args.threads}" if args.threads else "")
              + (f" --weights {args.weights}" if getattr(args, "weights", None) else "")
              + (f" --out {args.out}" if args.out else "")}
    # Written after every piece, so that a run cut short keeps what it measured; the mixed row right after the
    # first model's rows (the larger models take longest).
    # A worker that dies (llama.cpp crashing on this CPU) costs its rows, reported as one line in "errors".
    for i, m in enumerate(models):
        for key, fn in (("rows", lambda: _batch1_rows(m, packed, threads_list, new_tokens, rounds)),
                        ("prefill", lambda: prefill_rows(m, packed, threads_list[0], rounds)),
                        ("batched", lambda: [batch_row(m, packed, threads_list[0], rounds)])):
            try:
                result[key] += fn()
            except WorkerDied as e:
                print(e, flush=True)
                result.setdefault("errors", []).append(str(e))
            write_result(result, args.out, "generate_peer_cpu.json")
        if i == 0:
            try:
                with tempfile.TemporaryDirectory(prefix="bench_mixed_") as tmp:
                    result["mixed_adapters"] = _mixed_row(m, packed, threads_list[-1],
                                                          8 if quick else MIXED["new_tokens"], rounds, Path(tmp))
            except WorkerDied as e:
                print(e, flush=True)
                result.setdefault("errors", []).append(str(e))
            write_result(result, args.out, "generate_peer_cpu.json")
    return result


# --- the worker processes ---------------------------------------------------------------------------------
class _OursSide:
    def __init__(self, model: str, weights: str, adapters: list[str]):
        from engine.loading.hub import load_model
        from engine.lora import load_peft
        self.model, self.tok = load_model(model, device="cpu", dtype="float32", weights=weights)
        self.adapters = [load_peft(self.model, d) for d in adapters]

    def gen(self, prompt, new_tokens, threads):
        import torch

        from engine.serving.generate import generate
        torch.set_num_threads(threads)
        t = {}
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(self.model, [prompt], new_tokens, ignore_eos=True,
                       on_token=lambda row, tok: t.setdefault("first", (time.perf_counter(), time.process_time())))
        t1, c1 = time.perf_counter(), time.process_time()
        return {"prefill_s": t["first"][0] - t0, "decode_s": t1 - t["first"][0], "decode_cpu_s": c1 - t["first"][1],
                "tokens": out[0].token_ids}

    def mixed(self, requests, new_tokens, threads):
        import torch

        from engine.serving.scheduler import Scheduler
        torch.set_num_threads(threads)
        sched = Scheduler(self.model, self.tok, n_slots=len(requests), max_len=512, ignore_eos=True,
                          prefix_cache=False)
        t0 = time.perf_counter()
        futs = [sched.submit(p, adapter=self.adapters[a], max_new_tokens=new_tokens) for p, a in requests]
        sched.run_until_done()
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": [f.result().token_ids for f in futs]}


    def batched(self, prompts, new_tokens, threads):
        import torch

        from engine.serving.scheduler import Scheduler
        torch.set_num_threads(threads)
        sched = Scheduler(self.model, self.tok, n_slots=len(prompts), max_len=512, ignore_eos=True,
                          prefix_cache=False)
        firsts = {}
        t0 = time.perf_counter()
        futs = [sched.submit(p, max_new_tokens=new_tokens,
                             on_token=lambda tok, i=i: firsts.setdefault(i, time.perf_counter()))
                for i, p in enumerate(prompts)]
        sched.run_until_done()
        t1 = time.perf_counter()
        return {"prefill_s": max(firsts.values()) - t0, "decode_s": t1 - max(firsts.values()),
                "tokens": [f.result().token_ids for f in futs]}


class _LlamaSide:
    """llama.cpp through llama-cpp-python's bindings of its C API (what llama-server does, minus HTTP): one
    context, the adapters loaded once, greedy argmax over the logits of the last token of each sequence."""

    def __init__(self, gguf: str, adapters: list[str], ctx_per_seq: int = 512, seqs: int = 0):
        import ctypes

        import llama_cpp as L
        self.L, self.ctypes = L, ctypes
        self._quiet = L.llama_log_callback(lambda level, text, data: None)   # kept: ctypes must not free it
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        n_seq = seqs or (MIXED["adapters"] if adapters else 1)            # sequences decoded together
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = n_seq * ctx_per_seq, n_seq * ctx_per_seq, n_seq
        cp.n_threads = cp.n_threads_batch = 2
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_seq * ctx_per_seq, 0, 1)
        self.adapters = []
        for p in adapters:
            a = L.llama_adapter_lora_init(self.model, str(p).encode())
            if not a:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {p}")
            self.adapters.append(a)

    def _set_adapter(self, idx: int | None):
        L = self.L
        if idx is None:
            L.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            arr = (L.llama_adapter_lora_p_ctypes * 1)(self.adapters[idx])
            L.llama_set_adapters_lora(self.ctx, arr, 1, (self.ctypes.c_float * 1)(1.0))

    def _decode(self, entries) -> list[int]:
        """entries: (token, pos, seq, want_logits) -> the argmax token of each entry that wants logits."""
        import numpy as np
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, seq, int(want)
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, e in enumerate(entries):
            if e[3]:
                row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def _run(self, prompts, new_tokens) -> list[list[int]]:
        """Greedy-decode the prompts together, one sequence each, from an empty KV cache."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        first = self._decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        outs = [[t] for t in first]
        for k in range(1, new_tokens):
            nxt = self._decode([(o[-1], len(p) + k - 1, s, True) for s, (p, o) in enumerate(zip(prompts, outs))])
            for o, t in zip(outs, nxt):
                o.append(t)
        return outs

    def gen(self, prompt, new_tokens, threads):
        self.L.llama_set_n_threads(self.ctx, threads, threads)
        self._set_adapter(None)
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        first = self._decode([(t, j, 0, j == len(prompt) - 1) for j, t in enumerate(prompt)])
        t1, c1 = time.perf_counter(), time.process_time()
        out = first
        for k in range(1, new_tokens):
            out += self._decode([(out[-1], len(prompt) + k - 1, 0, True)])
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "decode_cpu_s": time.process_time() - c1,
                "tokens": out}

    def batched(self, prompts, new_tokens, threads):
        self.L.llama_set_n_threads(self.ctx, threads, threads)
        self._set_adapter(None)
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        first = self._decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        t1 = time.perf_counter()
        outs = [[t] for t in first]
        for k in range(1, new_tokens):
            nxt = self._decode([(o[-1], len(p) + k - 1, s, True) for s, (p, o) in enumerate(zip(prompts, outs))])
            for o, t in zip(outs, nxt):
                o.append(t)
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "tokens": outs}

    def mixed(self, requests, new_tokens, threads):
        self.L.llama_set_n_threads(self.ctx, threads, threads)
        tokens = [None] * len(requests)
        t0 = time.perf_counter()
        for a in sorted({a for _, a in requests}):                       # one adapter configuration at a time
            idx = [i for i, (_, ra) in enumerate(requests) if ra == a]
            self._set_adapter(a)
            for i, o in zip(idx, self._run([requests[i][0] for i in idx], new_tokens)):
                tokens[i] = o
        return {"wall_s": time.perf_counter() - t0, "tokens": tokens}


def _peak_rss_kb() -> int:
    """This process's peak RSS: VmHWM of /proc/self/status. Not ru_maxrss: Linux carries the parent's high-water
    mark into a child's ru_maxrss across fork/vfork + exec (measured: both workers of the mixed row reported the
    parent's 1.23 GiB), while VmHWM belongs to the memory map that exec created."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def worker_main(argv=None) -> None:
    """`python -m bench.generate --worker ours|llama.cpp --model NAME [--weights q4] [--adapter PATH ...]`:
    JSON requests on stdin, one JSON answer per line on stdout."""
    import argparse
    import resource
    import sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=["ours", "llama.cpp"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf", required=True, help="the model's GGUF file (llama.cpp's side loads only this)")
    ap.add_argument("--weights", default="q4")
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--seqs", type=int, default=0, help="llama.cpp: sequences in one context (batched rows)")
    ap.add_argument("--ctx", type=int, default=512, help="llama.cpp: context tokens per sequence")
    a = ap.parse_args(argv)
    side = (_OursSide(a.model, a.weights, a.adapter) if a.worker == "ours"
            else _LlamaSide(a.gguf, a.adapter, ctx_per_seq=a.ctx, seqs=a.seqs))
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "ping":
            out = {}
        elif op == "rss":
            out = {"maxrss_kb": _peak_rss_kb(), "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        else:
            out = getattr(side, op)(**msg)
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    import sys
    if "--worker" in sys.argv:
        worker_main()
    else:                                   # python -m bench.generate [--peer] ... == mcl bench generate ...
        from engine.cli import main as _cli
        _cli(["bench", "generate", *sys.argv[1:]])
