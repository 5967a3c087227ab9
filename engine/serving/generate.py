"""KV-cached generation: generate() over a batch of prompts, plus `mcl generate` / `mcl chat`.

    from engine.loading.hub import load_model
    from engine.serving.generate import generate
    model, tok = load_model("smollm2-135m")
    outs = generate(model, [tok.encode("def fib(n):")], max_new_tokens=32, eos_ids=tok.eos_ids)
    print(tok.decode(outs[0].token_ids))

    mcl generate --model smollm2-135m --prompt "Write a haiku about tensors" --chat --max-new-tokens 64

Batches of prompts of different lengths are right-padded and prefilled together; each row then decodes
at its own position (attention masks by position, so padding never leaks). Rows that finish leave the
batch. There is one decode loop: generate() hands its prompts to the continuous-batching scheduler
(engine/serving/scheduler.py), which calls `prefill`, `decode_one` and `sample` (engine/serving/steps.py).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVCache
from engine.serving.scheduler import Scheduler


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""        # "stop" (EOS or stop string), "length"
    prompt_tokens: int = 0


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int] = 64, *, adapter_ids=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_ids=(), stop_strings=(), tokenizer=None, on_token=None, cache: KVCache | None = None,
             ignore_eos: bool = False) -> list[Generation]:
    """Generate for a batch of token-id prompts. adapter_ids: None, or a (B,) tensor/list (-1 = base).

    The one decode loop: the prompts go to an engine.serving.scheduler.Scheduler with a slot each (all prefilled in one batch,
    then decoded together; rows that finish leave the batch), the same code that serves requests. on_token(row,
    token_id) streams. Stops per row on an EOS id, on a stop string (needs `tokenizer`; the token that completes
    it is kept) or after its max_new_tokens."""
    B = len(prompts)
    ctx = model.cfg.max_seq_len if cache is None else cache.max_len
    budgets = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= ctx:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the context limit is {ctx} (prompt + at least one new token)")
        budgets[i] = min(budgets[i], ctx - len(p))                          # never write past the cache
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    ids = [-1] * B if adapter_ids is None else [int(a) for a in torch.as_tensor(adapter_ids).reshape(-1).tolist()]
    max_len = max(len(p) + b for p, b in zip(prompts, budgets))
    sched = Scheduler(model, tokenizer, n_slots=B, max_len=max_len, prefill_chunk=max_len, max_prefill_rows=B,
                      prefix_cache=False, eos_ids=eos_ids, ignore_eos=ignore_eos, cache=cache)
    futs = [sched.submit(p, adapter=a, max_new_tokens=b, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=None if seed is None else seed + i, stop_strings=stop_strings,
                         on_token=None if on_token is None else (lambda t, i=i: on_token(i, t)))
            for i, (p, a, b) in enumerate(zip(prompts, ids, budgets))]
    while sched.has_work():
        sched.step()
    return [Generation(r.token_ids, r.finish_reason, r.prompt_tokens) for r in (f.result() for f in futs)]


# --- CLI ---------------------------------------------------------------------------------------
class _Streamer:
    """Print decoded text as it grows; hold back an incomplete multi-byte character."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, row, tok_id):
        self.ids.append(tok_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text


def _load(args):
    from engine.loading.hub import load_model
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, weights=getattr(args, "weights", "fp32"))
    if getattr(args, "eager_decode", False):
        from engine.cpu.modules import set_decode_kernel
        set_decode_kernel(model, False)
    return model, tok


def cli_generate(args):
    model, tok = _load(args)
    adapter = None
    if getattr(args, "adapters", None):
        from engine.lora import adapter_id, load_adapters
        load_adapters(model, args.adapters)
        adapter = [adapter_id(model, args.adapter)] if args.adapter else None
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True) \
        if args.chat else tok.encode(args.prompt)
    if not args.chat:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    out = generate(model, [ids], args.max_new_tokens, adapter_ids=adapter, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_ids=tok.eos_ids,
                   on_token=_Streamer(tok))[0]
    dt = time.perf_counter() - t0
    print(f"\n[{len(ids)} prompt tokens, {len(out.token_ids)} new in {dt:.2f}s, "
          f"{len(out.token_ids) / dt:.1f} tok/s, finish: {out.finish_reason}]", file=sys.stderr)


def cli_chat(args):
    model, tok = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        streamer = _Streamer(tok)
        out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, eos_ids=tok.eos_ids,
                       on_token=streamer)[0]
        print()
        messages.append({"role": "assistant", "content": tok.decode(out.token_ids)})
