"""`mcl bench generate`: our KV-cached generation vs transformers' `generate`, side by side in one run.

    mcl bench generate --json                      # SmolLM2-135M, batch 1 and 8, greedy, 64 new tokens
    mcl bench generate --json --out bench/results/ # also write the JSON file

Same model file for both (transformers loads the same GGUF with gguf_file=), same prompts (chat-templated),
greedy, exactly N new tokens each (ours ignores EOS, transformers gets min_new_tokens=N), same thread count,
one warm-up each, then the best of `repeats` timed runs. transformers pads a batch on the left with an
attention mask; we prefill right-padded and decode every row at its own position.
Prints one JSON object as the last line: {"model", "device", "rows": [{batch, new_tokens, ours_tok_s, hf_tok_s, ratio}]}.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

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
    import transformers

    from engine.generate import generate
    from engine.hub import load_model, model_path

    name = args.model or "smollm2-135m"
    device = args.device or "cpu"
    new_tokens = 16 if args.quick else 64
    repeats = 1 if args.quick else 3
    model, tok = load_model(name, device=device, dtype="float32")
    gguf = Path(model_path(name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           torch_dtype=torch.float32).to(device).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
    pad = tok.pad_id if tok.pad_id is not None else next(iter(tok.eos_ids))

    def ours(batch):
        return generate(model, prompts[:batch], new_tokens, ignore_eos=True)

    def theirs(batch):
        ps = prompts[:batch]
        T = max(len(p) for p in ps)
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=device)
        with torch.inference_mode():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    rows = []
    for batch in (1, 8):
        ours(batch), theirs(batch)                                   # warm-up
        t_ours, t_hf = _best(lambda: ours(batch), repeats), _best(lambda: theirs(batch), repeats)
        n = batch * new_tokens
        rows.append({"batch": batch, "new_tokens": new_tokens, "ours_tok_s": round(n / t_ours, 2),
                     "hf_tok_s": round(n / t_hf, 2), "ratio": round(t_hf / t_ours, 3)})
        print(f"batch {batch}: ours {n / t_ours:.1f} tok/s, transformers {n / t_hf:.1f} tok/s, "
              f"ratio {t_hf / t_ours:.2f}x", flush=True)
    # Greedy agreement on the first prompt, as a sanity check that both ran the same model.
    a = ours(1)[0].token_ids
    b = theirs(1)[0, len(prompts[0]):].tolist()
    result = {"model": name, "device": _device_name(device), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "same_greedy_tokens": a == b, "rows": rows,
              "command": "mcl bench generate" + (" --quick" if args.quick else "") + (f" --threads {args.threads}" if getattr(args, "threads", None) else "")}
    _write(result, args.out, f"generate_{device}.json")
    print(json.dumps(result))


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _write(result: dict, out: str | None, default_name: str):
    if not out:
        return
    p = Path(out)
    if out.endswith("/") or p.is_dir():
        p.mkdir(parents=True, exist_ok=True)
        p = p / default_name
    p.write_text(json.dumps(result, indent=2) + "\n")
