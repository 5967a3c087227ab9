"""Continuous batching where every request brings its own adapter.

    sched = Scheduler(model, tokenizer, n_slots=16, max_len=2048)
    sched.start()                                        # background thread; or call sched.step() yourself
    fut = sched.submit(ids, adapter="coder", max_new_tokens=256, stop_strings=["```\\n"])
    res = fut.result()                                   # Result: token_ids, text, counts, timings
    futs = sched.submit_n(ids, 4, temperature=0.8, top_p=0.9, seed=7, logprobs=2)   # 4 samples, one prefill
    sched.cancel(fut); sched.stop()
    turns = TurnLock()                                   # two models in one process: their steps take turns
    a, b = Scheduler(m1, tok1, step_lock=turns).start(), Scheduler(m2, tok2, step_lock=turns).start()

One step: (1) finish cancelled requests, (2) admit waiting requests into free KV-cache slots and prefill
them (several prompts in one batch, long prompts in chunks of `prefill_chunk` tokens across steps), (3) decode
one token for every running request in ONE batch whose rows carry different adapter ids (the fused
multi-LoRA kernel on CUDA), (4) sample, check stops, free the slots of finished requests at once so the
next step refills them. Results go back through concurrent.futures.Future; `on_token` streams.
What belongs to one request fails only that request: sampling parameters are checked at submit (tiny
temperatures sample greedily, a non-finite row falls back to argmax), a row whose sampling or on_token raises
gets the exception and the batch goes on. Only a failure of the batched forward itself fails every request in
flight (a bad prompt id, the one way a request could cause that, is refused at submit).

Automatic prefix caching (as vLLM's automatic prefix caching and SGLang's radix cache do, without blocks):
every slot remembers the prompt whose keys/values it holds -- while its request runs and after it finishes,
until the slot is reused. On admission a request looks for the slot holding the longest common prefix of
its prompt under the SAME adapter (k/v projections carry the adapter, so KV differs between adapters),
takes that slot in place when it is free or else copies the prefix's K/V rows into a free slot (the least
recently used), and prefills only the rest. When a prefix it shares is still being prefilled by a running
request, the request waits for it rather than computing it twice. Eviction is implicit: a freed slot's
rows stay reusable until a new request takes the slot. The reused K/V rows are the ones a prefill of the
same tokens at the same positions writes, so outputs match a run without the cache (greedy: equal up to
floating-point ties; tests/test_serve.py checks). `stats` counts prompt_tokens, prefill_tokens (computed),
prefix_hits, prefix_reused_tokens, prefix_copies (vs in place) and prefix_waits.

n samples of one prompt (submit_n) share one prefill: row 0 is admitted with its n - 1 forks (the group waits
until n slots are free), only row 0 is prefilled, and when its prefill completes the forks copy its K/V rows and
sample their first token from its last logits with their own generators; then all n decode as rows of the same
batches. `stats` counts forks and fork_tokens (prompt tokens copied instead of computed).

Per-token logprobs (Result.logprobs, on_logprob) are computed only for the requests that ask for them: the model's
log-softmax of the raw logits, before temperature, top-k and top-p (the convention of OpenAI's API), so a
logprob does not depend on the sampling settings.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.kv_cache import KVCache
from engine.serving.steps import SamplingParams, check_sampling, decode_one, prefill, sample


LOGPROB_FLOOR = -9999.0    # logprobs below it (and -inf, NaN) are reported as it: JSON has no -inf


class TurnLock:
    """A lock that waiting threads get in arrival order (a ticket lock). Schedulers of two models in one process
    share one so that their steps take turns: each step already uses every core (OpenMP / torch threads), and two at
    once oversubscribe the cores, where a parallel region waits on descheduled threads. threading.Lock would let a
    scheduler that releases it take it straight back and starve the other."""

    def __init__(self):
        self._cv = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self):
        with self._cv:
            ticket, self._next = self._next, self._next + 1
            while ticket != self._serving:
                self._cv.wait()

    def __exit__(self, *exc):
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


@dataclass
class TokenLogprob:
    token: int
    logprob: float                # log-softmax of the raw logits at the sampled token
    top: list[tuple[int, float]]  # the k most likely (id, logprob), most likely first


@dataclass
class Result:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str            # "stop" | "length" | "cancelled"
    adapter: str | None
    queue_s: float                # submit -> admitted
    ttft_s: float                 # submit -> first new token
    wall_s: float                 # submit -> finished
    logprobs: list[TokenLogprob] | None = None    # one per token of token_ids, when the request asked


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    adapter: str | None
    adapter_id: int
    budget: int
    params: SamplingParams
    generator: torch.Generator | None
    stop_strings: tuple
    on_token: object
    future: Future
    t_submit: float
    logprobs: int | None = None   # None: none; k: the sampled token's logprob and the k most likely
    on_logprob: object = None
    fork_of: "_Request | None" = None                      # row 0 of its group, until its prefill is shared
    forks: list = field(default_factory=list)              # row 0: the group's other rows
    slot: int = -1
    prefilled: int = 0            # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    cancelled: bool = False


class Scheduler:
    def __init__(self, model, tokenizer, n_slots: int = 16, max_len: int = 2048, prefill_chunk: int = 512,
                 max_prefill_rows: int = 8, log_batches: bool = False, ignore_eos: bool = False,
                 prefix_cache: bool = True, prefix_min: int = 16, eos_ids=None, cache: KVCache | None = None,
                 step_lock: TurnLock | None = None):
        """eos_ids: token ids that end a request (default the tokenizer's; ignore_eos: none).
        cache: a KVCache with at least n_slots slots to use instead of allocating one.
        step_lock: held around each background step (start()), shared with other schedulers of this process."""
        self.model, self.tok = model, tokenizer
        dev = model.device
        self.device = dev
        if cache is not None and cache.n_slots < n_slots:
            raise ValueError(f"the given KV cache has {cache.n_slots} slots; the scheduler needs {n_slots}")
        self.cache = cache or KVCache(model.cfg, n_slots, max_len, dtype=model.output_weight.dtype, device=dev)
        self.max_len = self.cache.max_len
        self.prefill_chunk, self.max_prefill_rows = prefill_chunk, max_prefill_rows
        if eos_ids is None:
            eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
        self.eos = set() if ignore_eos else set(eos_ids)
        self.free = list(range(n_slots))[::-1]
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}          # slot -> request
        self.by_future: dict[int, _Request] = {}
        self.cv = threading.Condition()
        self._next_id, self._thread, self._stop = 0, None, False
        self.step_lock = step_lock if step_lock is not None else contextlib.nullcontext()
        self.log_batches = log_batches
        self.batch_log: list[dict] = []                  # per decode step: size and adapters in the batch
        self.stats = collections.Counter()
        # Prefix cache: owner[slot] is the last request that wrote the slot (running or finished); its rows
        # 0..owner.prefilled-1 hold the KV of owner.prompt[:owner.prefilled] under owner.adapter_id.
        self.prefix_cache, self.prefix_min = prefix_cache, max(1, prefix_min)
        self.owner: list[_Request | None] = [None] * n_slots
        self.last_use = [0] * n_slots                   # admission tick of the last request that used the slot
        self._tick = 0

    # --- submitting ------------------------------------------------------------------------------
    def submit(self, prompt_ids, adapter: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_strings=(), on_token=None,
               logprobs: int | None = None, on_logprob=None) -> Future:
        """Queue a request; raises ValueError at once for an unknown adapter, a prompt that cannot fit or sampling
        parameters out of range. adapter: a loaded adapter's name, its id (int; -1 = base) or None (base).
        on_token(id) after each new token; logprobs=k: Result.logprobs holds each token's TokenLogprob with the k
        most likely, also passed to on_logprob(entry) before on_token."""
        return self.submit_n(prompt_ids, 1, adapter, max_new_tokens, temperature, top_p, top_k, seed, stop_strings,
                             None if on_token is None else (lambda _, t: on_token(t)), logprobs,
                             None if on_logprob is None else (lambda _, e: on_logprob(e)))[0]

    def submit_n(self, prompt_ids, n: int, adapter: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop_strings=(), on_token=None, logprobs: int | None = None, on_logprob=None) -> list[Future]:
        """n samples of one prompt, one future each, sharing one prefill (see the module docstring). Row i draws
        from a generator seeded with row_seed(seed, i) (row 0: seed itself, so n=1 is submit); on_token(row, id)
        and on_logprob(row, entry) say which row. ValueError as submit, and when n is not 1..n_slots."""
        check_sampling(temperature, top_k, top_p)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.cache.n_slots:
            raise ValueError(f"n must be an integer from 1 to the {self.cache.n_slots} slots, not {n!r}")
        V = self.model.cfg.vocab_size
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= V):
            raise ValueError(f"logprobs must be None or an integer from 0 to {V}, not {logprobs!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer, not {seed!r}")
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("empty prompt")
        for i, t in enumerate(prompt):                  # one bad id would fail the whole batch's forward
            if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t < V:
                raise ValueError(f"prompt token {i} ({t!r}) is not an integer id in 0..{V - 1}")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens "
                             "(prompt + at least one new token)")
        names = self.model.adapter_names
        if isinstance(adapter, int):
            if not -1 <= adapter < len(names):
                raise ValueError(f"adapter id {adapter} out of range; loaded adapters: {names or 'none'}")
            aid, adapter = adapter, (names[adapter] if adapter >= 0 else None)
        elif adapter is None:
            aid = -1
        elif adapter in names:
            aid = names.index(adapter)
        else:
            raise ValueError(f"unknown adapter {adapter!r}; loaded adapters: {names or 'none'}")
        if stop_strings and self.tok is None:
            raise ValueError("stop_strings need a tokenizer")
        budget = max(1, min(max_new_tokens, self.max_len - len(prompt)))
        with self.cv:
            reqs = []
            for i in range(n):
                req = _Request(self._next_id, prompt, adapter, aid, budget, SamplingParams(temperature, top_k, top_p),
                               None if seed is None else torch.Generator().manual_seed(row_seed(seed, i)),
                               tuple(stop_strings), None if on_token is None else _row_callback(on_token, i),
                               Future(), time.perf_counter(), logprobs,
                               None if on_logprob is None else _row_callback(on_logprob, i),
                               fork_of=reqs[0] if reqs else None)
                self._next_id += 1
                reqs.append(req)
                self.by_future[id(req.future)] = req
            reqs[0].forks = reqs[1:]
            self.waiting.extend(reqs)
            self.cv.notify()
        return [r.future for r in reqs]

    def cancel(self, fut: Future) -> None:
        """Cancel a queued or running request; its future resolves with finish_reason 'cancelled'."""
        with self.cv:
            req = self.by_future.get(id(fut))
            if req is not None:
                req.cancelled = True
                self.cv.notify()

    # --- the loop --------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> None:
        with self.cv:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in [r for r in self.running.values() if r.cancelled]:
                self._finish(req, "cancelled")
            self._admit()
        self._prefill_step()
        self._decode_step()

    def _admit(self):
        """Free slots to waiting requests (FIFO), each starting from the longest cached prefix it can reuse."""
        deferred = []
        while self.free and self.waiting:
            req = self.waiting.popleft()
            if req.fork_of is not None:                 # a fork follows row 0 into a slot; it prefills nothing
                if req.fork_of.slot < 0:
                    deferred.append(req)                # row 0 waits (a prefix it shares is being prefilled)
                    continue
                self._tick += 1
                slot = min(self.free, key=lambda s: (self.owner[s] is not None, self.last_use[s]))
                self._place(req, slot)
                continue
            if len(self.free) < 1 + sum(not f.future.done() for f in req.forks):   # a group enters whole
                self.waiting.appendleft(req)
                break
            src, n, pending = self._longest_prefix(req) if self.prefix_cache else (-1, 0, 0)
            if pending > n and pending >= self.prefix_min:   # a running prefill is computing more of our prefix
                deferred.append(req)
                self.stats["prefix_waits"] += 1
                continue
            self._tick += 1
            if n >= self.prefix_min and src in self.free:
                slot = src                              # reuse in place: nothing to copy
            else:
                slot = min(self.free, key=lambda s: (self.owner[s] is not None, self.last_use[s]))   # LRU
            self.free.remove(slot)
            if n >= self.prefix_min:
                if slot != src:                         # cache[:, slot, :, :n] = cache[:, src, :, :n], K and V
                    self.cache.k[:, slot, :, :n] = self.cache.k[:, src, :, :n]
                    self.cache.v[:, slot, :, :n] = self.cache.v[:, src, :, :n]
                    self.stats["prefix_copies"] += 1
                self.last_use[src] = self._tick
                self.stats["prefix_hits"] += 1
                self.stats["prefix_reused_tokens"] += n
                req.prefilled = n
            self._place(req, slot)
        self.waiting.extendleft(reversed(deferred))

    def _place(self, req, slot: int):
        """req runs in `slot` from now on (taken off the free list here when still on it)."""
        if slot in self.free:
            self.free.remove(slot)
        self.stats["prompt_tokens"] += len(req.prompt)
        req.slot, req.t_admit = slot, time.perf_counter()
        self.owner[slot], self.last_use[slot] = req, self._tick
        self.running[slot] = req

    def _longest_prefix(self, req) -> tuple[int, int, int]:
        """(slot, n, pending): the slot whose rows 0..n-1 hold req's first n prompt tokens under req's adapter
        (longest n; a free slot wins ties), n < len(prompt) so one token is left to prefill; `pending` is the
        longest shared prefix that a prefill now running will have computed. (-1, 0, 0) when nothing matches."""
        src, best, pending, cap = -1, 0, 0, len(req.prompt) - 1
        for slot, o in enumerate(self.owner):
            if o is None or o.adapter_id != req.adapter_id:
                continue
            m = min(_common_prefix(o.prompt, req.prompt), cap)
            n = min(m, o.prefilled)
            if self.running.get(slot) is o:
                pending = max(pending, m)
            if (n, slot in self.free) > (best, src in self.free):
                src, best = slot, n
        return src, best, max(pending, best)

    def _prefill_step(self):
        todo = sorted((r for r in self.running.values() if r.prefilled < len(r.prompt) and r.fork_of is None),
                      key=lambda r: r.rid)
        todo = todo[: self.max_prefill_rows]
        if not todo:
            return
        T, rows = _prefill_batch([len(r.prompt) - r.prefilled for r in todo], self.prefill_chunk)
        todo = [todo[i] for i in rows]
        chunks = [r.prompt[r.prefilled: r.prefilled + T] for r in todo]
        logits = prefill(self.model, self.cache, chunks, self._slots(todo), self._adapter_ids(todo),
                         start_pos=[r.prefilled for r in todo])
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(len(c) for c in chunks)
        done_rows = []
        for i, (r, c) in enumerate(zip(todo, chunks)):
            r.prefilled += len(c)
            if r.prefilled == len(r.prompt):
                done_rows.append(i)
        if done_rows:
            reqs = [todo[i] for i in done_rows]
            forks = [(f, i) for i in done_rows for f in self._fork(todo[i])]
            self._accept(reqs + [f for f, _ in forks], logits[done_rows + [i for _, i in forks]])

    def _fork(self, r: _Request) -> list[_Request]:
        """r's prompt is in its slot: copy its K/V rows to its running forks (cache[:, fork, :, :L] = cache[:, r, :,
        :L], K and V), which then sample from r's last logits. A fork not running yet prefills on its own."""
        out, L = [], len(r.prompt)
        for f in r.forks:
            f.fork_of = None
            if self.running.get(f.slot) is not f:
                continue
            self.cache.k[:, f.slot, :, :L] = self.cache.k[:, r.slot, :, :L]
            self.cache.v[:, f.slot, :, :L] = self.cache.v[:, r.slot, :, :L]
            f.prefilled = L
            self.stats["forks"] += 1
            self.stats["fork_tokens"] += L
            out.append(f)
        r.forks = []
        return out

    def _decode_step(self):
        reqs = sorted((r for r in self.running.values() if r.prefilled == len(r.prompt) and r.out),
                      key=lambda r: r.slot)
        if not reqs:
            return
        dev = self.device
        last = torch.tensor([r.out[-1] for r in reqs], device=dev)
        pos = torch.tensor([len(r.prompt) + len(r.out) - 1 for r in reqs], device=dev)
        logits = decode_one(self.model, self.cache, last, pos, self._slots(reqs), self._adapter_ids(reqs),
                            kv_len=int(pos.max()) + 1)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(reqs)
        if self.log_batches:
            self.batch_log.append({"size": len(reqs), "adapters": sorted({r.adapter or "base" for r in reqs})})
        self._accept(reqs, logits)

    def _slots(self, reqs):
        """The rows' cache slots; None when they are slots 0..B-1 in order, so attention reads a view of
        the cache instead of gathering (copying) every row's keys and values in every layer."""
        slots = [r.slot for r in reqs]
        if slots == list(range(len(slots))):
            return None
        return torch.tensor(slots, device=self.device)

    def _adapter_ids(self, reqs):
        if not self.model.adapter_names:
            return None
        return torch.tensor([r.adapter_id for r in reqs], device=self.device)

    def _accept(self, reqs, logits):
        """Sample one token per request; finish the ones that stop. What belongs to one request (its sampling,
        its on_token callback) fails only that request: the others in the batch go on."""
        logits = logits.float()
        try:
            nxt = sample(logits, [r.params for r in reqs], [r.generator for r in reqs]).tolist()
        except Exception:                               # find the row(s) at fault; sample the others alone
            nxt = []
            for i, r in enumerate(reqs):
                try:
                    nxt.append(int(sample(logits[i:i + 1], [r.params], [r.generator])[0]))
                except Exception as e:
                    nxt.append(e)
        asked = [i for i, (r, t) in enumerate(zip(reqs, nxt)) if r.logprobs is not None and not isinstance(t, Exception)]
        lps = dict(zip(asked, token_logprobs(logits[asked], [nxt[i] for i in asked],
                                             [reqs[i].logprobs for i in asked]))) if asked else {}
        now = time.perf_counter()
        for i, (r, t) in enumerate(zip(reqs, nxt)):
            if isinstance(t, Exception):
                self._fail(r, t)
                continue
            if not r.out:
                r.t_first = now
            if t in self.eos:
                self._finish(r, "stop")
                continue
            if i in lps:
                r.lps.append(lps[i])
            r.out.append(t)
            try:
                if r.on_logprob is not None and i in lps:
                    r.on_logprob(lps[i])
                if r.on_token is not None:
                    r.on_token(t)
                if r.stop_strings and _stops(self.tok, r.out, r.stop_strings):
                    self._finish(r, "stop")
                    continue
            except Exception as e:
                self._fail(r, e)
                continue
            if len(r.out) >= r.budget:
                self._finish(r, "length")

    def _fail(self, r: _Request, e: Exception):
        """End one request with an exception; its slot is freed and its rows forgotten by the prefix cache."""
        self._release_forks(r)
        if r.slot >= 0 and self.running.get(r.slot) is r:
            del self.running[r.slot]
            self.free.append(r.slot)
            self.owner[r.slot] = None
        self.by_future.pop(id(r.future), None)
        self.stats["failed"] += 1
        if not r.future.done():
            r.future.set_exception(e)

    def _release_forks(self, r: _Request):
        """r ends before its prefill was shared: its forks prefill on their own (the prefix cache may serve them)."""
        for f in r.forks:
            f.fork_of = None
        r.forks = []

    def _finish(self, r: _Request, reason: str):
        self._release_forks(r)
        if r.slot >= 0 and self.running.get(r.slot) is r:
            del self.running[r.slot]
            self.free.append(r.slot)
        self.by_future.pop(id(r.future), None)
        now = time.perf_counter()
        ids = r.out
        text = self.tok.decode(ids) if self.tok is not None else ""
        if reason == "stop" and r.stop_strings:
            cut = min((text.find(s) + len(s) for s in r.stop_strings if s in text), default=None)
            if cut is not None:
                text = text[:cut]
        res = Result(ids, text, len(r.prompt), len(ids), reason, r.adapter, (r.t_admit or now) - r.t_submit,
                     (r.t_first or now) - r.t_submit, now - r.t_submit, r.lps if r.logprobs is not None else None)
        self.stats["finished_" + reason] += 1
        if not r.future.done():
            r.future.set_result(res)

    def prefix_summary(self) -> dict:
        """Prompt tokens admitted, computed and reused (forks' copied prompts apart); hit rate = reused / admitted
        prompt tokens."""
        st = self.stats
        return {"prompt_tokens": st["prompt_tokens"], "prefill_tokens": st["prefill_tokens"],
                "prefix_reused_tokens": st["prefix_reused_tokens"], "prefix_hits": st["prefix_hits"],
                "prefix_copies": st["prefix_copies"], "prefix_waits": st["prefix_waits"],
                "forks": st["forks"], "fork_tokens": st["fork_tokens"],
                "requests": self._tick,
                "token_hit_rate": round(st["prefix_reused_tokens"] / max(1, st["prompt_tokens"]), 4),
                "request_hit_rate": round(st["prefix_hits"] / max(1, self._tick), 4)}

    # --- running in the background ---------------------------------------------------------------
    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def start(self) -> "Scheduler":
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mcl-scheduler", daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while True:
            with self.cv:
                while not self._stop and not self.has_work():
                    self.cv.wait()
                if self._stop:
                    return
            try:
                with self.step_lock:
                    self.step()
            except Exception as e:                      # a broken step fails every request in flight, loudly
                with self.cv:
                    for r in list(self.running.values()) + list(self.waiting):
                        if not r.future.done():
                            r.future.set_exception(e)
                    self.running.clear()
                    self.waiting.clear()
                    self.free = list(range(self.cache.n_slots))[::-1]
                    self.owner = [None] * self.cache.n_slots      # the broken step may have half-written rows
                    self.by_future.clear()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row` of a request seeded with `seed`: row 0 uses seed itself (mod 2**64, as
    torch.Generator.manual_seed takes it), row i > 0 a 64-bit hash of (seed, i), so rows never share a stream."""
    if row == 0:
        return seed % (1 << 64)
    return int.from_bytes(hashlib.blake2b(f"{seed},{row}".encode(), digest_size=8).digest(), "little")


def token_logprobs(logits: torch.Tensor, ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits (B, V) float, the sampled ids (B,), how many most likely to list per row -> one TokenLogprob per row.
    The log-softmax of the raw logits (temperature, top-k and top-p do not enter); non-finite values and values
    below LOGPROB_FLOOR are reported as LOGPROB_FLOOR."""
    lsm = torch.log_softmax(logits, -1).nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_min(LOGPROB_FLOOR)
    chosen = lsm.gather(1, torch.tensor(ids, device=lsm.device)[:, None])[:, 0].tolist()      # (B,)
    k = max(ks)
    top_v, top_i = lsm.topk(k, -1) if k else (lsm[:, :0], lsm[:, :0].long())               # (B, k)
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [TokenLogprob(t, c, list(zip(top_i[b][:kb], top_v[b][:kb]))) for b, (t, c, kb) in
            enumerate(zip(ids, chosen, ks))]


def _row_callback(f, row: int):
    return lambda x: f(row, x)


STOP_WINDOW = 64      # tokens decoded per stop-string check: bounded work per token, not the whole output


def _stops(tok, out: list[int], stop_strings) -> bool:
    """Does a stop string end in the newest token? Checked after every token, so only the output's tail is decoded
    (STOP_WINDOW tokens; a stop string longer than that many tokens' text would be missed)."""
    text = tok.decode(out[-STOP_WINDOW:])
    return any(s in text for s in stop_strings)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slice comparisons run in C; binary search)."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n                                       # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _prefill_batch(remaining: list[int], cap: int, min_useful: float = 0.9) -> tuple[int, list[int]]:
    """(T, rows): the chunk length and the rows of one batched prefill. Rows are right-padded to the longest
    chunk and padding costs as much as real tokens, so pick the T <= cap (and the rows that have at least T/2
    tokens left) that prefills the most real tokens while they are >= min_useful of the positions computed;
    the other rows wait for a later step. Row 0 (the oldest) is always in, so no row waits forever. Prompts of 300 and 700 tokens at T = 512 would compute 1024
    positions for 812 real tokens; T = 300 computes 600 for 600, then 400 for 400."""
    best = (0, 0, [])
    for T in sorted({min(r, cap) for r in remaining if r <= 2 * remaining[0]} | {min(remaining[0], cap)}):
        rows = [i for i, r in enumerate(remaining) if 2 * min(r, T) >= T]
        useful = sum(min(remaining[i], T) for i in rows)
        if useful >= min_useful * T * len(rows) and (useful, T) >= best[:2]:
            best = (useful, T, rows)
    return best[1], best[2]
