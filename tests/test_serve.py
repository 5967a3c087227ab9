"""Continuous batching with mixed adapters: each request's greedy output equals running it alone with its
adapter; 1000 random requests (cancellations, budgets hitting the context) leak nothing; bad requests are
refused while the others continue. Prefix caching: outputs with reuse equal outputs without it (mixed
adapters, prefixes ending mid-chunk, eviction with few slots, waiting on a running prefill); the cache key
includes the adapter; an evicted prefix is never used; the counters add up.

    python -m pytest tests/test_serve.py -q
"""
import random

import pytest
import torch

from engine.config import PRESETS
from engine.lora import add_adapters
from engine.model import Transformer
from engine.serving.generate import generate
from engine.serving.scheduler import Scheduler

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


def test_two_schedulers_sharing_a_turn_lock_never_step_at_once_and_both_finish(model):
    import threading
    import time
    from engine.serving.scheduler import TurnLock
    turns, active, steps, overlap = TurnLock(), [0], {"a": 0, "b": 0}, []
    guard = threading.Lock()
    scheds = {k: Scheduler(model, CharTokenizer(), n_slots=2, max_len=128, step_lock=turns) for k in steps}
    for k, sc in scheds.items():
        def counted(step=sc.step, k=k):                  # the loop's step, timed for overlap
            with guard:
                active[0] += 1
                overlap.append(active[0] > 1)
            time.sleep(0.001)
            try:
                return step()
            finally:
                with guard:
                    active[0] -= 1
                steps[k] += 1
        sc.step = counted
        sc.start()
    try:
        futs = [sc.submit([3, 4, 5 + i], max_new_tokens=40) for sc in scheds.values() for i in range(2)]
        assert all(f.result(timeout=120).new_tokens >= 1 for f in futs)
    finally:
        for sc in scheds.values():
            sc.stop()
    assert steps["a"] > 5 and steps["b"] > 5 and not any(overlap)


def test_turn_lock_serves_waiters_in_arrival_order():
    import threading
    import time
    from engine.serving.scheduler import TurnLock
    lock, order = TurnLock(), []
    lock.__enter__()                                     # held: the threads below queue up one by one
    threads = []
    for i in range(4):
        t = threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i), lock.__exit__()))
        t.start()
        threads.append(t)
        time.sleep(0.05)                                 # each takes its ticket before the next starts
    lock.__exit__()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3]


# --- prefix caching -------------------------------------------------------------------------------

def _run(model, reqs, arrive_every=0, **kw):
    """Submit (prompt, adapter, budget) requests (all at once, or one per `arrive_every` steps); results + sched."""
    sched = Scheduler(model, CharTokenizer(), **kw)
    futs, pending = [], list(reqs)
    while pending or sched.has_work():
        for _ in range(len(pending) if not arrive_every else 1):
            if pending:
                p, a, n = pending.pop(0)
                futs.append(sched.submit(p, adapter=a, max_new_tokens=n))
        for _ in range(max(1, arrive_every)):
            sched.step()
    return [f.result().token_ids for f in futs], sched


@pytest.mark.parametrize("arrive_every,n_slots", [(0, 3), (2, 2), (1, 6)])
def test_prefix_reuse_equals_no_reuse(model, arrive_every, n_slots):
    rng = random.Random(10 + n_slots)
    prefixes = [rand_prompt(rng, n) for n in (13, 21, 30)]          # 13, 21: end mid-chunk (chunk 8)
    reqs = []
    for _ in range(24):
        pre = rng.choice(prefixes)
        reqs.append((pre[:rng.randint(len(pre) - 4, len(pre))] + rand_prompt(rng, rng.randint(0, 9)),
                     rng.choice(["planner", "coder", None]), rng.randint(1, 8)))
    reqs.append((prefixes[0], "planner", 5))                        # a prompt that is entirely a cached prefix
    kw = dict(n_slots=n_slots, max_len=64, prefill_chunk=8)
    with_cache, s1 = _run(model, reqs, arrive_every, prefix_min=4, **kw)
    without, s0 = _run(model, reqs, arrive_every, prefix_cache=False, **kw)
    assert with_cache == without
    for (p, a, n), out in zip(reqs[:6], with_cache):                # and equal to running alone
        assert out == generate(model, [p], n, adapter_ids=[-1 if a is None else ROLES.index(a)], eos_ids={0})[0].token_ids
    st = s1.stats
    assert st["prefix_hits"] > 0 and st["prefix_copies"] > 0 and st["prefix_hits"] > st["prefix_copies"]  # in place too
    assert st["prefill_tokens"] == st["prompt_tokens"] - st["prefix_reused_tokens"]
    assert st["prefill_tokens"] < s0.stats["prefill_tokens"] == s0.stats["prompt_tokens"]
    assert s0.stats["prefix_hits"] == 0 and sorted(s1.free) == list(range(n_slots))


def test_requests_wait_for_a_shared_prefix_being_prefilled(model):
    rng = random.Random(6)
    pre = rand_prompt(rng, 27)
    reqs = [(pre + rand_prompt(rng, 3), "planner", 4) for _ in range(4)]    # all at once, 4 free slots
    outs, sched = _run(model, reqs, n_slots=4, max_len=64, prefill_chunk=8)  # 27 = 3 chunks of 8 + 3
    st = sched.stats
    assert st["prefix_waits"] > 0 and st["prefix_hits"] == 3 and st["prefix_reused_tokens"] >= 3 * 27
    assert st["prefill_tokens"] <= 30 + 3 * 3
    for (q, a, n), out in zip(reqs, outs):
        assert out == generate(model, [q], n, adapter_ids=[ROLES.index(a)], eos_ids={0})[0].token_ids


def test_prefix_cache_key_includes_the_adapter(model):
    p = rand_prompt(random.Random(3), 40)
    reqs = [(p, "coder", 4), (p, "debugger", 4), (p, None, 4), (p + [7, 8], "coder", 4)]
    outs, sched = _run(model, reqs, arrive_every=3, n_slots=4, max_len=64)
    assert sched.stats["prefix_hits"] == 1 and sched.stats["prefix_reused_tokens"] == 40   # only coder -> coder
    for (q, a, n), out in zip(reqs, outs):
        assert out == generate(model, [q], n, adapter_ids=[-1 if a is None else ROLES.index(a)], eos_ids={0})[0].token_ids


@pytest.mark.parametrize("n_slots,hits", [(1, 0), (2, 1)])
def test_evicted_prefix_is_not_used(model, n_slots, hits):
    rng = random.Random(4)
    a, b = rand_prompt(rng, 30), rand_prompt(rng, 30)
    reqs = [(a + [1], "coder", 3), (b + [2], "coder", 3), (a + [3], "coder", 3)]    # one at a time
    outs, sched = _run(model, reqs, arrive_every=6, n_slots=n_slots, max_len=64)
    assert sched.stats["prefix_hits"] == hits                       # one slot: b evicted a; two: a's rows kept (LRU)
    assert sched.stats["prefix_reused_tokens"] == 30 * hits
    for (q, ad, n), out in zip(reqs, outs):
        assert out == generate(model, [q], n, adapter_ids=[ROLES.index(ad)], eos_ids={0})[0].token_ids


def test_common_prefix_matches_naive():
    from engine.serving.scheduler import _common_prefix
    rng = random.Random(5)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randint(0, 12))]
        b = a[:rng.randint(0, len(a))] + [rng.randrange(3) for _ in range(rng.randint(0, 12))]
        naive = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert _common_prefix(a, b) == naive


def test_prefill_batch_bounds_padding_and_keeps_the_oldest_row():
    from engine.serving.scheduler import _prefill_batch
    rng = random.Random(7)
    for _ in range(500):
        rem = [rng.choice([rng.randint(1, 8), rng.randint(1, 700)]) for _ in range(rng.randint(1, 8))]
        cap = rng.choice([16, 512])
        T, rows = _prefill_batch(rem, cap)
        assert 0 in rows and 1 <= T <= cap and T == max(min(rem[i], T) for i in rows)
        assert sum(min(rem[i], T) for i in rows) >= 0.9 * T * len(rows)         # padding <= 10%
    assert _prefill_batch([300, 700], 512) == (300, [0, 1])               # not 1024 positions for 812 tokens
    assert _prefill_batch([400, 3, 400, 400], 512) == (400, [0, 2, 3])     # the 3-token row waits a step


# --- one request never fails another ------------------------------------------------------------------

def test_sampling_never_raises_for_tiny_temperatures_or_nan_logits():
    from engine.serving.steps import SamplingParams, sample
    logits = torch.randn(4, 50)
    logits[3] = float("nan")
    logits[3, 7] = 1.0
    params = [SamplingParams(t, top_k=k, top_p=p) for t, k, p in
              [(1e-300, 0, 1.0), (5e-324, 5, 0.5), (1e-6, 0, 1.0), (1.0, 0, 1.0)]]
    out = sample(logits, params, [None] * 4).tolist()
    assert out[:3] == logits[:3].argmax(-1).tolist() and out[3] == 7


def test_a_hostile_request_fails_at_most_itself(model):
    """A long request and hostile ones (tiny temperatures, a raising on_token, bad ids) in flight together: the long
    one completes with the output it has alone, every time."""
    p = rand_prompt(random.Random(8), 10)
    alone = generate(model, [p], 40, adapter_ids=[ROLES.index("coder")], eos_ids={0})[0].token_ids

    def boom(_):
        raise RuntimeError("client callback broke")
    with Scheduler(model, CharTokenizer(), n_slots=4, max_len=128) as sched:
        for _ in range(3):
            long = sched.submit(p, adapter="coder", max_new_tokens=40)
            hostile = [sched.submit([5, 6], max_new_tokens=30, temperature=t, top_p=0.9, seed=1)
                       for t in (1e-300, 5e-324, 1e-30)]
            bad_cb = sched.submit([5, 6], max_new_tokens=30, on_token=boom)
            assert long.result(timeout=60).token_ids == alone
            assert all(h.result(timeout=60).new_tokens >= 1 for h in hostile)
            with pytest.raises(RuntimeError, match="client callback broke"):
                bad_cb.result(timeout=60)
        for bad in (dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=0.0),
                    dict(top_k=-1)):
            with pytest.raises(ValueError):
                sched.submit([5, 6], **bad)
        with pytest.raises(ValueError, match="prompt token 1 .* not an integer id"):
            sched.submit([5, 10 ** 9])
        assert sched.submit(p, adapter="coder", max_new_tokens=40).result(timeout=60).token_ids == alone
    assert sorted(sched.free) == [0, 1, 2, 3]


# --- n samples of one prompt, per-token logprobs, the sampler against plain torch ---------------------

def test_n_samples_share_one_prefill_and_decode_in_one_batch(model):
    """submit_n: the prompt is prefilled once (prefill_tokens grows by its length, not n times), the n rows decode
    as one batch, row i draws exactly what a lone request seeded with row_seed(seed, i) draws, row 0 = seed itself."""
    from engine.serving.scheduler import row_seed
    p = rand_prompt(random.Random(11), 9)                     # shorter than prefix_min: the prefix cache cannot help
    sched = Scheduler(model, CharTokenizer(), n_slots=6, max_len=64, log_batches=True, ignore_eos=True)
    futs = sched.submit_n(p, 4, adapter="planner", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    sched.run_until_done()
    outs = [f.result().token_ids for f in futs]
    st = sched.stats
    assert st["prefill_tokens"] == len(p) and st["prefill_calls"] == 1 and st["forks"] == 3
    assert st["fork_tokens"] == 3 * len(p) and sched.batch_log and all(b["size"] == 4 for b in sched.batch_log)
    assert len({tuple(o) for o in outs}) > 1                  # each row its own stream
    for i, out in enumerate(outs):
        alone = Scheduler(model, CharTokenizer(), n_slots=1, max_len=64, ignore_eos=True)
        f = alone.submit(p, adapter="planner", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=row_seed(3, i))
        alone.run_until_done()
        assert f.result().token_ids == out, i
    assert row_seed(3, 0) == 3 and len({row_seed(3, i) for i in range(16)} | {row_seed(4, 1)}) == 17
    assert sorted(sched.free) == list(range(6))


def test_n_samples_wait_for_n_slots_and_survive_cancelling_row_0(model):
    p = rand_prompt(random.Random(12), 30)
    sched = Scheduler(model, CharTokenizer(), n_slots=4, max_len=64, prefill_chunk=8, ignore_eos=True)
    busy = sched.submit(rand_prompt(random.Random(13), 5), max_new_tokens=6)
    sched.step()                                              # one slot taken: a group of 4 must wait
    futs = sched.submit_n(p, 4, max_new_tokens=5)
    sched.step()
    assert len(sched.running) == 1 and len(sched.waiting) == 4
    sched.run_until_done()
    greedy = [f.result().token_ids for f in futs]
    assert busy.result().new_tokens == 6 and all(g == greedy[0] for g in greedy)
    assert greedy[0] == generate(model, [p], 5)[0].token_ids
    futs = sched.submit_n(p + [1], 3, max_new_tokens=5)       # row 0 cancelled mid-prefill: the forks go on alone
    sched.step()
    sched.cancel(futs[0])
    sched.run_until_done()
    assert futs[0].result().finish_reason == "cancelled"
    assert [f.result().token_ids for f in futs[1:]] == [generate(model, [p + [1]], 5)[0].token_ids] * 2
    assert sorted(sched.free) == list(range(4)) and not sched.running and not sched.by_future
    with pytest.raises(ValueError, match="n must be an integer from 1 to the 4 slots, not 5"):
        sched.submit_n(p, 5)


def test_logprobs_are_the_raw_log_softmax_and_only_when_asked(model):
    """Each token's logprob is log_softmax of the model's logits at that position (temperature-independent), with
    the k most likely in order; a request that does not ask gets none."""
    p = rand_prompt(random.Random(14), 7)
    sched = Scheduler(model, CharTokenizer(), n_slots=4, max_len=64, ignore_eos=True)
    seen = []
    asked = sched.submit(p, adapter="coder", max_new_tokens=6, temperature=0.7, seed=1, logprobs=3,
                         on_logprob=seen.append)
    plain = sched.submit(p, adapter="coder", max_new_tokens=6)
    sched.run_until_done()
    r = asked.result()
    assert plain.result().logprobs is None and len(r.logprobs) == len(r.token_ids) == 6 and seen == r.logprobs
    with torch.inference_mode():
        full = model(torch.tensor([p + r.token_ids]), torch.tensor([ROLES.index("coder")]))[0].float()
    ref = torch.log_softmax(full[len(p) - 1:-1], -1)                                # (6, V)
    for j, e in enumerate(r.logprobs):
        assert e.token == r.token_ids[j] and abs(e.logprob - float(ref[j, e.token])) < 1e-4
        top_v, top_i = ref[j].topk(3)
        assert [t for t, _ in e.top] == top_i.tolist()
        assert max(abs(a - b) for (_, a), b in zip(e.top, top_v.tolist())) < 1e-4
    with pytest.raises(ValueError, match="logprobs must be None or an integer"):
        sched.submit(p, logprobs=-1)


def ref_sample(logits, temperature, top_k, top_p, generator):
    """Plain torch, as transformers' warpers do it: temperature, top-k, then top-p over the ascending cumulative
    probabilities (a token goes when the tokens at most as likely as it hold <= 1 - top_p), one multinomial draw."""
    l = logits / temperature
    if top_k:
        l = torch.where(l < torch.topk(l, top_k).values[-1], torch.tensor(float("-inf")), l)
    if top_p < 1:
        asc, idx = torch.sort(l)
        remove = asc.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[-1] = False
        l = l.clone()
        l[idx[remove]] = float("-inf")
    return int(torch.multinomial(l.softmax(-1), 1, generator=generator))


def test_sampler_equals_plain_torch_on_fixed_logits_with_mixed_rows():
    """sample() on one batch whose rows each have their own temperature / top-k / top-p / seed draws exactly what the
    plain reference draws row by row with the same seeds, 50 times over."""
    from engine.serving.steps import SamplingParams, sample
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    settings = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 1.0), (1.0, 50, 0.5), (0.5, 0, 0.05), (2.0, 3, 0.99)]
    params = [SamplingParams(t, k, p) for t, k, p in settings]
    ours = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    refs = [torch.Generator().manual_seed(100 + i) for i in range(6)]
    draws = []
    for _ in range(50):
        got = sample(logits.clone(), params, ours).tolist()
        want = [ref_sample(logits[i], t, k, p, refs[i]) for i, (t, k, p) in enumerate(settings)]
        assert got == want
        draws.append(got)
    kept = [set(col) for col in zip(*draws)]
    assert len(kept[0]) > 10 and len(kept[2]) <= 20 and len(kept[5]) <= 3 and len(kept[4]) <= 2


def test_the_one_call_cpu_decode_path_samples_each_row_with_its_settings(monkeypatch):
    """A packed model's decode steps run engine/cpu/decode_step.py's one C call per layer, which returns logits; the
    scheduler samples them in Python with each row's own temperature / top-k / top-p / seed, so a row draws in a
    mixed batch exactly what it draws alone."""
    from engine.loading.packed_model import pack_dense_model
    import engine.serving.scheduler as serve_mod
    m = Transformer(PRESETS["tiny"]).init_weights(seed=0).eval()
    add_adapters(m, ["coder"], rank=8, alpha=16)
    pack_dense_model(m)
    seen, real = [], serve_mod.sample
    monkeypatch.setattr(serve_mod, "sample", lambda logits, params, gens: seen.append(
        sorted((p.temperature, p.top_k, p.top_p) for p in params)) or real(logits, params, gens))
    settings = [(1.0, 0, 0.9), (0.7, 20, 1.0), (0.0, 0, 1.0)]

    def run(rows):
        sched = Scheduler(m, None, n_slots=len(rows), max_len=64, ignore_eos=True)
        futs = [sched.submit([5, 6, 7, 8], adapter="coder" if i else None, max_new_tokens=6, temperature=t, top_k=k,
                             top_p=p, seed=i) for i, (t, k, p) in rows]
        sched.run_until_done()
        return [f.result().token_ids for f in futs]
    mixed = run(list(enumerate(settings)))
    assert m.model.steps is not None and m.model.steps.layers is not None           # the C path ran
    assert seen[-1] == sorted(settings) and len(seen) == 6                          # prefill + 5 decode steps
    assert [run([(i, s)])[0] for i, s in enumerate(settings)] == mixed
