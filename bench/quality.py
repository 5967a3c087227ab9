"""Quality of the packed CPU weights: teacher-forced top-1 agreement of weights="q4" with the fp32 model.

    python -m bench.quality --out bench/results/                    # the three embedded models, 4 prompts x 256 tokens
    python -m bench.quality --models smollm2-135m --tokens 64      # quicker
    python -m bench.quality --peer                                  # + llama.cpp's agreement on the same texts

For each model: the q4 model writes a greedy continuation of `--tokens` tokens for each of 4 chat prompts (batched,
EOS ignored), then both models score prompt + continuation in one forward pass each (teacher forcing) and we count
the continuation positions where their next-token argmax agrees. The q4 forward is held on the integer kernel for
every row (MCL_DEQUANT_MIN_M raised: a long forward would otherwise take dequant + GEMM), the arithmetic of its
decode steps (each row's activations quantised on their own), so this is the decode path's agreement;
`agreement_prefill_path_fp32_text` is the same on the fp32 text through the prefill path (whole sequences:
dequantise + GEMM, bf16 where the CPU multiplies bf16 natively, engine.cpu.kernels.gemm_dtype).
Target (the JSON's `goal`): >= 98% per model. The same is reported on the fp32 model's own
greedy text (`agreement_fp32_text`: one text for every side), and with --peer llama.cpp's top-1 on both texts (a
prefill with logits at every position): how far int8 activations as llama.cpp computes them move the argmax
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
]


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
def agreement(name: str, n_tokens: int, peer: bool = False, threads: int = 2) -> dict:
    """The statistic on two texts: the q4 model's own greedy continuations (`agreement`, the goal's number) and the
    fp32 model's (`agreement_fp32_text`: the same text for every side); with `peer`, llama.cpp on both texts too."""
    from engine.loading.hub import load_model
    from engine.serving.generate import generate

    from bench.common import env_var
    from engine.cpu.kernels import gemm_dtype
    fp32, tok = load_model(name, device="cpu")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
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
    rate = lambda g, w: sum(int((a == b).sum()) for a, b in zip(g, w)) / sum(len(b) for b in w)
    total = rate(got["q4"], want["q4"])
    row = {"model": name, "tokens_per_prompt": n_tokens, "prompts": len(PROMPTS), "agreement": round(total, 4),
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer", action="store_true", help="llama.cpp's agreement with the fp32 model on the same texts")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows.append(agreement(name, args.tokens, args.peer, args.threads))
        print(rows[-1], flush=True)
    from bench.common import device_name, isa, write_result
    write_result({"bench": "quality", "device": device_name("cpu"), **isa(), "rows": rows}, args.out,
                 "quality_cpu.json")


if __name__ == "__main__":
    main()
