"""KV-cached generation: sample -> prefill -> decode_one -> generate, plus `mcl generate` / `mcl chat`.

    from engine.hub import load_model
    from engine.generate import generate
    model, tok = load_model("smollm2-135m")
    outs = generate(model, [tok.encode("def fib(n):")], max_new_tokens=32, eos_ids=tok.eos_ids)
    print(tok.decode(outs[0].token_ids))

    mcl generate --model smollm2-135m --prompt "Write a haiku about tensors" --chat --max-new-tokens 64

Batches of prompts of different lengths are right-padded and prefilled together; each row then decodes
at its own position (attention masks by position, so padding never leaks). Rows that finish leave the
batch. There is one decode loop: generate() hands its prompts to the continuous-batching scheduler
(engine/serve.py), which calls `prefill`, `decode_one` and `sample` from here.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVCache


# --- sampling ----------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off


GREEDY_BELOW = 1e-5     # temperatures below this sample greedily: logits / 1e-300 overflow, and softmax gives NaN


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Greedy rows (temperature < GREEDY_BELOW, NaN included) take argmax; others
    temperature / top-k / top-p with their own seeded generator, so a request's samples do not depend on what else
    is in the batch (rows of one batch may each have their own settings). Every serving path samples here: the
    one-call CPU decode step (engine/decode_step.py) returns logits like the eager forward does. A row whose probabilities come out non-finite or all zero (NaN logits, overflow) falls back to
    the argmax of its finite logits instead of raising, so one request's parameters never fail the batch."""
    out = logits.argmax(-1)
    for i, p in enumerate(params):
        if not p.temperature >= GREEDY_BELOW:
            continue
        out[i] = sample_row(logits[i], p, generators[i])
    return out


def sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One row (V,) -> one id: logits / temperature; top-k keeps the k largest (and ties with the k-th); top-p then
    keeps the smallest set of most likely tokens whose probability (renormalised after top-k) reaches top_p, as
    transformers' TopKLogitsWarper and TopPLogitsWarper do; one torch.multinomial draw from `generator`."""
    l = logits.float() / p.temperature                                     # (V,)
    if p.top_k > 0:
        kth = torch.topk(l, min(p.top_k, l.numel())).values[-1]
        l = l.masked_fill(l < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_l, idx = torch.sort(l, descending=True)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p      # the mass before a token already reaches top_p: the smallest
        l = l.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))    # set reaching it is kept
    probs = l.softmax(-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(logits.float().nan_to_num(nan=float("-inf")).argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature, top_k, top_p) -> None:
    """ValueError naming the field unless temperature is finite >= 0, top_k an int >= 0 and 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, not {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0, not {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], not {top_p!r}")


# --- model steps -------------------------------------------------------------------------------
def prefill(model, cache: KVCache, prompts: list[list[int]], slots: torch.Tensor, adapter_ids=None,
            start_pos: list[int] | None = None) -> torch.Tensor:
    """Run prompts (right-padded into one batch) into the given cache slots; return last-token logits (B, V).

    start_pos lets a caller prefill a chunk of a longer prompt (positions start_pos .. start_pos+len-1)."""
    dev = cache.k.device
    B = len(prompts)
    start = start_pos or [0] * B
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    lens = torch.tensor([len(p) for p in prompts])
    pos = torch.arange(T)[None, :] + torch.tensor(start)[:, None]            # (B, T)
    # Padding tokens write their keys to the cache's scratch cell, never over a real key.
    pos = torch.where(torch.arange(T)[None, :] < lens[:, None], pos, cache.scratch)
    kv_len = max(s + len(p) for s, p in zip(start, prompts))
    logits = model(tokens.to(dev), adapter_ids, input_pos=pos.to(dev), kv_cache=cache, cache_slots=slots,
                   kv_len=kv_len, last_idx=(lens - 1).to(dev))
    return logits[:, 0]                                                      # (B, V)


def decode_one(model, cache: KVCache, last: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor | None,
               adapter_ids=None, kv_len: int | None = None) -> torch.Tensor:
    """One token for every row: last (B,) ids at positions pos (B,) -> logits (B, V)."""
    logits = model(last[:, None], adapter_ids, input_pos=pos[:, None], kv_cache=cache, cache_slots=slots,
                   kv_len=kv_len)
    return logits[:, -1]


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

    The one decode loop: the prompts go to an engine.serve.Scheduler with a slot each (all prefilled in one batch,
    then decoded together; rows that finish leave the batch), the same code that serves requests. on_token(row,
    token_id) streams. Stops per row on an EOS id, on a stop string (needs `tokenizer`; the token that completes
    it is kept) or after its max_new_tokens."""
    from engine.serve import Scheduler
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
    from engine.hub import load_model
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype, weights=getattr(args, "weights", "fp32"))
    if getattr(args, "eager_decode", False):
        model.set_decode_kernel(False)
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
