"""Continuous batching with mixed adapters: each request's greedy output equals running it alone with its
adapter; 1000 random requests (cancellations, budgets hitting the context) leak nothing; bad requests are
refused while the others continue.

    python -m pytest tests/test_serve.py -q
"""
import random

import pytest
import torch

from engine.config import PRESETS
from engine.generate import generate
from engine.lora import add_adapters
from engine.model import Transformer
from engine.serve import Scheduler

ROLES = ["retriever", "planner", "coder", "debugger"]


class CharTokenizer:
    """Stand-in tokenizer for the tiny vocabulary: id -> one letter."""
    eos_ids = {0}

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    m = Transformer(PRESETS["tiny"].replace(arch="qwen2", qkv_bias=True)).init_weights(seed=5, std=0.1).eval()
    add_adapters(m, ROLES, rank={"retriever": 8, "planner": 16, "coder": 4, "debugger": 8}, alpha=16)
    g = torch.Generator().manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:                       # make every adapter change the outputs
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def rand_prompt(rng, n):
    return [rng.randrange(1, 256) for _ in range(n)]


def test_greedy_equals_alone_with_its_adapter(model):
    rng = random.Random(0)
    sched = Scheduler(model, CharTokenizer(), n_slots=4, max_len=96, prefill_chunk=7, log_batches=True)
    reqs = [(rand_prompt(rng, rng.randint(1, 30)), rng.choice(ROLES + [None]), rng.randint(1, 20)) for _ in range(14)]
    futs = [sched.submit(p, adapter=a, max_new_tokens=n) for p, a, n in reqs]
    sched.run_until_done()
    for (p, a, n), f in zip(reqs, futs):
        aid = -1 if a is None else ROLES.index(a)
        alone = generate(model, [p], n, adapter_ids=[aid], eos_ids={0})[0]
        res = f.result()
        assert res.token_ids == alone.token_ids, (a, len(p))
        assert res.adapter == a and res.prompt_tokens == len(p)
    mixed = [b for b in sched.batch_log if len(b["adapters"]) > 1]
    assert mixed, "no decode batch mixed adapters"
    assert sched.stats["prefill_calls"] > 0 and sorted(sched.free) == [0, 1, 2, 3]


def test_adapters_change_outputs(model):
    p = rand_prompt(random.Random(1), 12)
    outs = {a: generate(model, [p], 12, adapter_ids=[i])[0].token_ids for i, a in enumerate(ROLES)}
    assert len({tuple(v) for v in outs.values()}) > 1


def test_1000_random_requests_leak_nothing(model):
    rng = random.Random(2)
    n_slots, max_len = 8, 48
    sched = Scheduler(model, CharTokenizer(), n_slots=n_slots, max_len=max_len, prefill_chunk=16)
    futs, prompts, cancelled = [], [], set()
    submitted = 0
    while submitted < 1000 or sched.has_work():
        for _ in range(rng.randint(0, 6)):                       # requests arrive while others run
            if submitted == 1000:
                break
            p = rand_prompt(rng, rng.randint(1, max_len - 1))
            futs.append(sched.submit(p, adapter=rng.choice(ROLES + [None]), max_new_tokens=rng.randint(1, 60),
                                     stop_strings=["zz"] if rng.random() < 0.1 else ()))
            prompts.append(p)
            submitted += 1
        if futs and rng.random() < 0.15:                         # cancel a random queued or running request
            i = rng.randrange(len(futs))
            sched.cancel(futs[i])
            cancelled.add(i)
        sched.step()
    assert all(f.done() for f in futs)
    reasons = [f.result().finish_reason for f in futs]
    assert len(reasons) == 1000 and set(reasons) <= {"stop", "length", "cancelled"}
    assert all(reasons[i] != "cancelled" or i in cancelled for i in range(1000))
    for p, f in zip(prompts, futs):
        assert len(p) + f.result().new_tokens <= max_len         # budgets clipped at the context limit
    assert sorted(sched.free) == list(range(n_slots)), "a KV-cache slot leaked"
    assert not sched.running and not sched.waiting and not sched.by_future
    assert reasons.count("length") > 0 and reasons.count("cancelled") > 0


def test_bad_requests_are_refused_and_others_continue(model):
    sched = Scheduler(model, CharTokenizer(), n_slots=2, max_len=32)
    ok = sched.submit([5, 6, 7], adapter="coder", max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt of 40 tokens does not fit the context of 32 tokens"):
        sched.submit(list(range(1, 41)))
    with pytest.raises(ValueError, match="unknown adapter 'reviewer'; loaded adapters: \\['retriever'"):
        sched.submit([1, 2], adapter="reviewer")
    sched.run_until_done()
    assert ok.result().new_tokens >= 1


def test_background_thread_streams_and_cancels(model):
    seen = []
    with Scheduler(model, CharTokenizer(), n_slots=2, max_len=128) as sched:
        f1 = sched.submit([3, 4, 5], adapter="planner", max_new_tokens=10, on_token=seen.append)
        long = sched.submit([9] * 5, max_new_tokens=120)
        sched.cancel(long)
        r1 = f1.result(timeout=60)
        r2 = long.result(timeout=60)
    assert seen == r1.token_ids[:len(seen)] and len(seen) == r1.new_tokens
    assert r2.finish_reason == "cancelled" and r1.wall_s >= r1.ttft_s >= r1.queue_s >= 0
