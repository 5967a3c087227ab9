"""Quality of the packed CPU weights: teacher-forced top-1 agreement of weights="q4" with the fp32 model.

    python -m bench.quality --out bench/results/                    # the three embedded models, 4 prompts x 256 tokens
    python -m bench.quality --models smollm2-135m --tokens 64      # quicker

For each model: the q4 model writes a greedy continuation of `--tokens` tokens for each of 4 chat prompts (batched,
EOS ignored), then both models score prompt + continuation in one forward pass each (teacher forcing) and we count
the continuation positions where their next-token argmax agrees. The q4 forward is held on the integer kernel for
every row (engine.cpu_kernels.DEQUANT_MIN_M raised: a long forward would otherwise take dequant + SGEMM, fp32
activations), the arithmetic of its decode steps (each row's activations quantised on their own), so this is the
decode path's agreement. Goal
(issue 15): >= 98% per model. Writes quality_cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

PROMPTS = [
    "Write a Python function that checks whether a number is prime, then explain it.",
    "Implement binary search over a sorted list in Python and give two test cases.",
    "Write a function that returns the longest common prefix of a list of strings.",
    "Explain what a Python generator is and write one that yields Fibonacci numbers.",
]


@torch.inference_mode()
def agreement(name: str, n_tokens: int) -> dict:
    from engine.generate import generate
    from engine.hub import load_model
    q4, tok = load_model(name, device="cpu", weights="q4")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    t0 = time.perf_counter()
    conts = [g.token_ids for g in generate(q4, prompts, n_tokens, ignore_eos=True)]
    gen_s = time.perf_counter() - t0
    seqs = [p + c for p, c in zip(prompts, conts)]
    pick = lambda m, s, n: m(torch.tensor([s]))[0, len(s) - n - 1:-1].argmax(-1)     # (n,) next-token choices
    import engine.cpu_kernels as ck
    saved, ck.DEQUANT_MIN_M = ck.DEQUANT_MIN_M, 1 << 30
    try:
        got = [pick(q4, s, len(c)) for s, c in zip(seqs, conts)]
    finally:
        ck.DEQUANT_MIN_M = saved
    stats = q4.pack_stats
    del q4
    gc.collect()
    fp32, _ = load_model(name, device="cpu")
    want = [pick(fp32, s, len(c)) for s, c in zip(seqs, conts)]
    per = [(g == w).float().mean().item() for g, w in zip(got, want)]
    total = sum(int((g == w).sum()) for g, w in zip(got, want)) / sum(len(c) for c in conts)
    del fp32
    gc.collect()
    return {"model": name, "tokens_per_prompt": n_tokens, "prompts": len(PROMPTS), "agreement": round(total, 4),
            "per_prompt": [round(a, 4) for a in per], "packed": stats["packed"], "step_bytes": stats["step_bytes"],
            "q4_generate_s": round(gen_s, 1), "goal": 0.98, "goal_met": total >= 0.98}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(agreement(name, args.tokens))
        print(rows[-1], flush=True)
    from bench.common import device_name, write_result
    write_result({"bench": "quality", "device": device_name("cpu"), "rows": rows}, args.out, "quality_cpu.json")


if __name__ == "__main__":
    main()
