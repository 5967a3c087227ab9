"""Quality of the packed CPU weights: teacher-forced top-1 agreement of weights="q4" with the fp32 model.

    python -m bench.quality --out bench/results/                    # the three embedded models, 4 prompts x 256 tokens
    python -m bench.quality --models smollm2-135m --tokens 64      # quicker
    python -m bench.quality --peer                                  # + llama.cpp's agreement on the same texts
    python -m bench.quality --prompts 16 --models smollm2-135m       # 16 prompts: ci95 about +-0.45 points at 98%

For each model: the q4 model writes a greedy continuation of `--tokens` tokens for each of `--prompts` chat prompts
(4 by default; batched, EOS ignored), then both models score prompt + continuation in one forward pass each (teacher
forcing) and we count the continuation positions where their next-token argmax agrees (with a Wilson ci95 over all
positions). The q4 forward is held on the integer kernel for every row (MCL_DEQUANT_MIN_M raised: a long forward
would otherwise take dequant + GEMM), the arithmetic of its decode steps (each row's activations quantised on their
own), so this is the decode path's agreement; `agreement_prefill_path_fp32_text` is the same on the fp32 text
through the prefill path (whole sequences: dequantise + GEMM, bf16 where the CPU multiplies bf16 natively,
engine.cpu.kernels.gemm_dtype). Target (the JSON's `goal`): >= 98% per model. The same is reported on the fp32
model's own greedy text (`agreement_fp32_text`: one text for every side), and with --peer llama.cpp's top-1 on both
texts (a prefill with logits at every position): how far int8 activations as llama.cpp computes them move the argmax
(llama-cpp-python from `python -m bench.llama_build`, run in a child process: a crash there is one line,
`llama_cpp_error`). Writes quality_cpu.json.
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
    # --prompts 16: twelve more, for a tighter estimate (4 x 256 tokens: a binomial ci95 of about +-0.9 points at 98%)
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Implement a stack class in Python with push, pop and peek, and show how to use it.",
    "Write a function that counts the words in a string and returns the five most common.",
    "Explain recursion with an example in Python that computes the factorial of a number.",
    "Write a Python function that checks whether a string of brackets is balanced.",
    "Implement quicksort in Python and explain its average running time.",
    "Write a function that converts a Roman numeral to an integer.",
    "Write a Python class for a bank account with deposit, withdraw and a balance check.",
    "Write a function that finds all pairs in a list of integers that sum to a target.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a function that rotates a square matrix by 90 degrees clockwise.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
]


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a binomial proportion k / n (95% by default)."""
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / d
    return [round(c - h, 4), round(c + h, 4)]


def _llama_cpp_picks(name: str, seqs, ns, threads: int) -> dict:
    """llama.cpp's next-token argmax at the last n positions of each sequence (one prefill with logits for every
    position; llama-cpp-python, the same GGUF): {"0": (n,) array, ...}. Run in a child process (_peer_picks)."""
    import llama_cpp
    import numpy as np

    from engine.loading.hub import model_path
    llm = llama_cpp.Llama(model_path=str(model_path(name)), n_ctx=max(map(len, seqs)) + 8, logits_all=True,
                          n_threads=threads, n_batch=512, verbose=False)
    out = {}
    for i, (s, n) in enumerate(zip(seqs, ns)):
        llm.reset()
        llm.eval(s)
        out[str(i)] = np.asarray(llm.scores[len(s) - n - 1:len(s) - 1]).argmax(-1)
    del llm
    return out


def _peer_picks(name: str, seqs, ns, threads: int) -> list[torch.Tensor] | str:
    """_llama_cpp_picks in its own process (bench/isolated.py): the picks, or one line saying why there are none
    (llama.cpp crashed on this CPU, or is not installed)."""
    from bench.isolated import ChildError, run_isolated
    try:
        got = run_isolated(_llama_cpp_picks, name, seqs, ns, threads, label="llama.cpp (llama-cpp-python)")
    except ChildError as e:
        return str(e)
    return [torch.from_numpy(got[str(i)]) for i in range(len(seqs))]


@torch.inference_mode()
def agreement(name: str, n_tokens: int, peer: bool = False, threads: int = 2, n_prompts: int = 4) -> dict:
    """The statistic on two texts: the q4 model's own greedy continuations (`agreement`, the goal's number) and the
    fp32 model's (`agreement_fp32_text`: the same text for every side); with `peer`, llama.cpp on both texts too."""
    from engine.loading.hub import load_model
    from engine.serving.generate import generate

    from bench.common import env_var
    from engine.cpu.kernels import gemm_dtype
    fp32, tok = load_model(name, device="cpu")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in PROMPTS[:n_prompts]]
    fp_conts = [g.token_ids for g in generate(fp32, prompts, n_tokens, ignore_eos=True)]
    q4, _ = load_model(name, device="cpu", weights="q4")
    t0 = time.perf_counter()
    conts = [g.token_ids for g in generate(q4, prompts, n_tokens, ignore_eos=True)]
    gen_s = time.perf_counter() - t0
    texts = {"q4": [p + c for p, c in zip(prompts, conts)], "fp32": [p + c for p, c in zip(prompts, fp_conts)]}
    pick = lambda m, s, n: m(torch.tensor([s]))[0, len(s) - n - 1:-1].argmax(-1)     # (n,) next-token choices
    want = {k: [pick(fp32, s, n_tokens) for s in seqs] for k, seqs in texts.items()}
    prefill = [pick(q4, s, n_tokens) for s in texts["fp32"]]      # whole sequences: the prefill path (dequant + GEMM)
    with env_var("MCL_DEQUANT_MIN_M", str(1 << 30)):
        got = {k: [pick(q4, s, n_tokens) for s in seqs] for k, seqs in texts.items()}
    stats = q4.pack_stats
    del q4, fp32
    gc.collect()
    hits = lambda g, w: sum(int((a == b).sum()) for a, b in zip(g, w))
    n_all = len(prompts) * n_tokens
    rate = lambda g, w: hits(g, w) / n_all
    total = rate(got["q4"], want["q4"])
    row = {"model": name, "tokens_per_prompt": n_tokens, "prompts": len(prompts), "agreement": round(total, 4),
           "agreement_ci95": wilson(hits(got["q4"], want["q4"]), n_all),
           "agreement_fp32_text_ci95": wilson(hits(got["fp32"], want["fp32"]), n_all),
           "per_prompt": [round((g == w).float().mean().item(), 4) for g, w in zip(got["q4"], want["q4"])],
           "agreement_fp32_text": round(rate(got["fp32"], want["fp32"]), 4),
           "agreement_prefill_path_fp32_text": round(rate(prefill, want["fp32"]), 4),
           "prefill_gemm_dtype": str(gemm_dtype()).replace("torch.", ""),
           "packed": stats["packed"], "step_bytes": stats["step_bytes"], "q4_generate_s": round(gen_s, 1),
           "goal": 0.98, "goal_met": total >= 0.98}
    if peer:
        for k, seqs in texts.items():
            picks = _peer_picks(name, seqs, [n_tokens] * len(seqs), threads)
            if isinstance(picks, str):                        # one line in the row and on stdout, then go on
                print(f"{name}: no llama.cpp agreement: {picks}", flush=True)
                row["llama_cpp_error"] = picks
                break
            row[f"llama_cpp_agreement_{k}_text"] = round(rate(picks, want[k]), 4)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar=f"1..{len(PROMPTS)}",
                    help="how many of the chat prompts (4: the tables' setting; 16: a tighter estimate)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="llama.cpp's agreement with the fp32 model on the same texts")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(agreement(name, args.tokens, args.peer, args.threads, args.prompts))
        print(rows[-1], flush=True)
    from bench.common import device_name, isa, write_result
    write_result({"bench": "quality", "device": device_name("cpu"), **isa(), "rows": rows}, args.out,
                 "quality_cpu.json")


if __name__ == "__main__":
    main()
