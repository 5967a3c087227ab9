"""The model steps every serving path runs, and the sampler: sample -> prefill -> decode_one.

    logits = prefill(model, cache, prompts, slots, adapter_ids)       # right-padded prompts -> last logits (B, V)
    logits = decode_one(model, cache, last, pos, slots, adapter_ids)  # one token per row -> logits (B, V)
    ids = sample(logits, [SamplingParams(temperature=0.8, top_p=0.9)] * B, generators)

The scheduler (engine/serving/scheduler.py) is the one decode loop that calls them; generate()
(engine/serving/generate.py) hands its prompts to it.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    one-call CPU decode step (engine/cpu/decode_step.py) returns logits like the eager forward does. A row whose
    probabilities come out non-finite or all zero (NaN logits, overflow) falls back to the argmax of its finite
    logits instead of raising, so one request's parameters never fail the batch."""
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
