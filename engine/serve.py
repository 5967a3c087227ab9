"""Continuous batching where every request brings its own adapter.

    sched = Scheduler(model, tokenizer, n_slots=16, max_len=2048)
    sched.start()                                        # background thread; or call sched.step() yourself
    fut = sched.submit(ids, adapter="coder", max_new_tokens=256, stop_strings=["```\\n"])
    res = fut.result()                                   # Result: token_ids, text, counts, timings
    sched.cancel(fut); sched.stop()

One step: (1) finish cancelled requests, (2) admit waiting requests into free KV-cache slots and prefill
them (several prompts in one batch, long prompts in chunks of `prefill_chunk` tokens across steps), (3) decode
one token for every running request in ONE batch whose rows carry different adapter ids (the fused
multi-LoRA kernel on CUDA), (4) sample, check stops, free the slots of finished requests at once so the
next step refills them. Results go back through concurrent.futures.Future; `on_token` streams.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.generate import SamplingParams, decode_one, prefill, sample
from engine.kv_cache import KVCache


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
    slot: int = -1
    prefilled: int = 0            # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    t_admit: float = 0.0
    t_first: float = 0.0
    cancelled: bool = False


class Scheduler:
    def __init__(self, model, tokenizer, n_slots: int = 16, max_len: int = 2048, prefill_chunk: int = 512,
                 max_prefill_rows: int = 8, log_batches: bool = False, ignore_eos: bool = False):
        self.model, self.tok = model, tokenizer
        dev = next(model.parameters()).device
        self.device = dev
        self.cache = KVCache(model.cfg, n_slots, max_len, dtype=model.output_weight.dtype, device=dev)
        self.max_len = self.cache.max_len
        self.prefill_chunk, self.max_prefill_rows = prefill_chunk, max_prefill_rows
        self.eos = set(tokenizer.eos_ids) if tokenizer is not None and not ignore_eos else set()
        self.free = list(range(n_slots))[::-1]
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}          # slot -> request
        self.by_future: dict[int, _Request] = {}
        self.cv = threading.Condition()
        self._next_id, self._thread, self._stop = 0, None, False
        self.log_batches = log_batches
        self.batch_log: list[dict] = []                  # per decode step: size and adapters in the batch
        self.stats = collections.Counter()

    # --- submitting ------------------------------------------------------------------------------
    def submit(self, prompt_ids, adapter: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop_strings=(), on_token=None) -> Future:
        """Queue a request; raises ValueError at once for an unknown adapter or a prompt that cannot fit."""
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens "
                             "(prompt + at least one new token)")
        if adapter is None:
            aid = -1
        elif adapter in self.model.adapter_names:
            aid = self.model.adapter_names.index(adapter)
        else:
            raise ValueError(f"unknown adapter {adapter!r}; loaded adapters: {self.model.adapter_names or 'none'}")
        fut: Future = Future()
        with self.cv:
            req = _Request(self._next_id, prompt, adapter, aid, max(1, min(max_new_tokens, self.max_len - len(prompt))),
                           SamplingParams(temperature, top_k, top_p),
                           torch.Generator().manual_seed(seed) if seed is not None else None,
                           tuple(stop_strings), on_token, fut, time.perf_counter())
            self._next_id += 1
            self.waiting.append(req)
            self.by_future[id(fut)] = req
            self.cv.notify()
        return fut

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
            while self.free and self.waiting:
                req = self.waiting.popleft()
                req.slot, req.t_admit = self.free.pop(), time.perf_counter()
                self.running[req.slot] = req
        self._prefill_step()
        self._decode_step()

    def _prefill_step(self):
        todo = [r for r in self.running.values() if r.prefilled < len(r.prompt)][: self.max_prefill_rows]
        if not todo:
            return
        chunks = [r.prompt[r.prefilled: r.prefilled + self.prefill_chunk] for r in todo]
        dev = self.device
        logits = prefill(self.model, self.cache, chunks, torch.tensor([r.slot for r in todo], device=dev),
                         self._adapter_ids(todo), start_pos=[r.prefilled for r in todo])
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += sum(len(c) for c in chunks)
        done_rows = []
        for i, (r, c) in enumerate(zip(todo, chunks)):
            r.prefilled += len(c)
            if r.prefilled == len(r.prompt):
                done_rows.append(i)
        if done_rows:
            reqs = [todo[i] for i in done_rows]
            self._accept(reqs, logits[done_rows])

    def _decode_step(self):
        reqs = [r for r in self.running.values() if r.prefilled == len(r.prompt) and r.out]
        if not reqs:
            return
        dev = self.device
        last = torch.tensor([r.out[-1] for r in reqs], device=dev)
        pos = torch.tensor([len(r.prompt) + len(r.out) - 1 for r in reqs], device=dev)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        logits = decode_one(self.model, self.cache, last, pos, slots, self._adapter_ids(reqs),
                            kv_len=int(pos.max()) + 1)
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(reqs)
        if self.log_batches:
            self.batch_log.append({"size": len(reqs), "adapters": sorted({r.adapter or "base" for r in reqs})})
        self._accept(reqs, logits)

    def _adapter_ids(self, reqs):
        if not self.model.adapter_names:
            return None
        return torch.tensor([r.adapter_id for r in reqs], device=self.device)

    def _accept(self, reqs, logits):
        """Sample one token per request; finish the ones that stop."""
        nxt = sample(logits.float(), [r.params for r in reqs], [r.generator for r in reqs]).tolist()
        now = time.perf_counter()
        for r, t in zip(reqs, nxt):
            if not r.out:
                r.t_first = now
            if t in self.eos:
                self._finish(r, "stop")
                continue
            r.out.append(t)
            if r.on_token is not None:
                r.on_token(t)
            if r.stop_strings:
                text = self.tok.decode(r.out[-64:])
                if any(s in text for s in r.stop_strings):
                    self._finish(r, "stop")
                    continue
            if len(r.out) >= r.budget:
                self._finish(r, "length")

    def _finish(self, r: _Request, reason: str):
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
                     (r.t_first or now) - r.t_submit, now - r.t_submit)
        self.stats["finished_" + reason] += 1
        if not r.future.done():
            r.future.set_result(res)

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
                self.step()
            except Exception as e:                      # a broken step fails every request in flight, loudly
                with self.cv:
                    for r in list(self.running.values()) + list(self.waiting):
                        if not r.future.done():
                            r.future.set_exception(e)
                    self.running.clear()
                    self.waiting.clear()
                    self.free = list(range(self.cache.n_slots))[::-1]
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
