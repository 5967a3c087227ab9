"""The local engine as a backend: chat messages or token ids in, text out, through the scheduler (role-tagged).
What the HTTP server (engine/serving/http_server.py) serves and what the agents call (engine/agents/backends.py
adds HTTPBackend, a remote OpenAI-compatible endpoint, with the same `chat`).

    backend = open_local("smollm2-135m", adapters_dir="runs/adapters")   # load, attach role adapters, start
    backend = LocalBackend(scheduler, tokenizer, adapters=True)          # engine.serving.scheduler.Scheduler, started
    c = backend.chat("planner", messages, max_new_tokens=384, temperature=0.0)
    c.text, c.prompt_tokens, c.completion_tokens, c.wall_s, c.finish_reason, c.error
    s = backend.complete("coder", ids, Sampling(n=4, temperature=0.8, top_p=0.9, seed=1, logprobs=2))
    s.choices[i].text, s.choices[i].logprobs, s.prompt_tokens, s.completion_tokens, s.error

`chat` blocks until the answer is complete; the orchestrator calls it from many threads at once, so the
scheduler sees requests of every role from many problems and batches them together. With adapters
loaded, LocalBackend tags each request with its role's adapter (adapter name = role name).

LocalBackend answers a prompt longer than the model's context with an error Completion (that call
cannot run; the orchestrator moves on); other scheduler errors propagate. LocalBackend.chat(..., gone=f)
cancels the request in the scheduler once f() is True (the HTTP server: the client hung up);
LocalBackend.chat(..., on_text=f) streams: f(text so far) as tokens arrive. LocalBackend.complete is what the
HTTP server calls: token ids in, n choices out (the scheduler's submit_n: one shared prefill), with top-p / top-k /
seed / per-token logprobs; complete(..., on_tokens=f) streams f(row, token ids so far, logprob entries so far).
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

from engine.roles import ROLES


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0                 # the whole call as the agent saw it: queueing + generation (+ retries)
    finish_reason: str = "stop"         # "stop" | "length" | "cancelled" | "error"
    error: str | None = None            # no answer: HTTP failure, or a prompt longer than the local context
    queue_s: float = 0.0                # LocalBackend: time before the scheduler admitted the request


@dataclass
class Sampling:
    """What one request asks of the sampler (the HTTP server checks each field at its door)."""
    max_tokens: int = 512
    temperature: float = 0.0           # below engine.serving.steps.GREEDY_BELOW: greedy
    top_p: float = 1.0                 # 1: off
    top_k: int = 0                     # 0: off
    n: int = 1                         # choices, sharing one prefill
    seed: int | None = None            # choice i draws from engine.serving.scheduler.row_seed(seed, i)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None        # None: none; k: each token's logprob and the k most likely


@dataclass
class Choice:
    text: str
    finish_reason: str                 # "stop" | "length" | "cancelled"
    logprobs: list | None = None       # engine.serving.scheduler.TokenLogprob per token, when asked


@dataclass
class Sampled:
    """The answer to LocalBackend.complete: n choices, or `error` (and no choices) when the prompt cannot run."""
    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    queue_s: float = 0.0
    error: str | None = None


class LocalBackend:
    """The local engine: chat template -> token ids -> scheduler (role-tagged) -> text.

    adapters: False (every role on the base model), True (adapter name = role name), or the set of
    roles that have an adapter (the others run on the base model)."""

    def __init__(self, scheduler, tokenizer, adapters=False):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.adapters = set(ROLES) if adapters is True else set(adapters or ())

    def adapter_for(self, role: str) -> str | None:
        return role if role in self.adapters else None

    def close(self):
        self.scheduler.stop()

    def chat(self, role: str, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
             stop: list[str] | None = None, gone=None, on_text=None) -> Completion:
        """`gone`: optional callable polled while waiting (every 0.2 s); when it returns True the request is
        cancelled in the scheduler (its KV slot freed at the next step) -- the HTTP server passes "the client
        hung up". `on_text`: optional callable given the text so far whenever new tokens arrived (polled
        every 0.05 s, decoded in the caller's thread, not the scheduler's)."""
        t0 = time.perf_counter()
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        on_tokens = None if on_text is None else (lambda _, out, __: on_text(self.tokenizer.decode(out)))
        s = self.complete(role, ids, Sampling(max_new_tokens, temperature, stop=tuple(stop or ())), gone, on_tokens)
        wall = time.perf_counter() - t0
        if s.error:
            return Completion("", s.prompt_tokens, 0, wall, "error", error=s.error)
        c = s.choices[0]
        return Completion(c.text, s.prompt_tokens, s.completion_tokens, wall, c.finish_reason, queue_s=s.queue_s)

    def complete(self, role: str | None, prompt_ids: list[int], sampling: Sampling, gone=None,
                 on_tokens=None) -> Sampled:
        """Token ids -> sampling.n choices (one scheduler request, or a submit_n group sharing one prefill). role
        None: the base model. `gone` as in chat (all n rows are cancelled); `on_tokens(row, ids, entries)`: the
        row's token ids and logprob entries so far (entries: [] unless sampling.logprobs), polled every 0.05 s.
        A prompt longer than the context is Sampled.error; bad sampling values raise ValueError (scheduler)."""
        t0, s = time.perf_counter(), sampling
        max_len = getattr(self.scheduler, "max_len", None)
        if max_len is not None and len(prompt_ids) >= max_len:    # a long problem + history: this call cannot run
            return Sampled(prompt_tokens=len(prompt_ids), wall_s=time.perf_counter() - t0,
                           error=f"prompt of {len(prompt_ids)} tokens does not fit the context of {max_len} tokens")
        outs = [[] for _ in range(s.n)]                     # appended by the scheduler thread as tokens come
        lps = [[] for _ in range(s.n)]
        kw = dict(adapter=self.adapter_for(role), max_new_tokens=s.max_tokens, temperature=s.temperature,
                  stop_strings=list(s.stop))
        if (s.top_p, s.top_k, s.seed) != (1.0, 0, None):
            kw.update(top_p=s.top_p, top_k=s.top_k, seed=s.seed)
        if s.logprobs is not None:
            kw["logprobs"] = s.logprobs
        if s.n == 1:                                        # callbacks: (value) here, (row, value) for submit_n
            if s.logprobs is not None and on_tokens:
                kw["on_logprob"] = lps[0].append
            futs = [self.scheduler.submit(prompt_ids, on_token=outs[0].append if on_tokens else None, **kw)]
        else:
            if s.logprobs is not None and on_tokens:
                kw["on_logprob"] = lambda i, e: lps[i].append(e)
            futs = self.scheduler.submit_n(prompt_ids, s.n, on_token=(lambda i, t: outs[i].append(t))
                                           if on_tokens else None, **kw)
        shown = [0] * s.n
        while (gone is not None or on_tokens is not None) and not all(f.done() for f in futs):
            wait([f for f in futs if not f.done()], 0.05 if on_tokens is not None else 0.2, FIRST_COMPLETED)
            for i in range(s.n):
                k = len(outs[i])                            # the entry of a token is appended before the token
                if on_tokens is not None and k > shown[i]:
                    shown[i] = k
                    on_tokens(i, outs[i][:k], lps[i][:k])
            if gone is not None and not all(f.done() for f in futs) and gone():
                for f in futs:
                    if not f.done():
                        self.scheduler.cancel(f)
        rs = [f.result() for f in futs]
        return Sampled([Choice(r.text, r.finish_reason, r.logprobs if s.logprobs is not None else None) for r in rs],
                       len(prompt_ids), sum(r.new_tokens for r in rs), time.perf_counter() - t0,
                       max(r.queue_s for r in rs))


def open_local(model: str, device: str | None = None, dtype: str | None = None, adapters_dir: str | None = None,
               n_slots: int = 16, weights: str = "fp32", step_lock=None) -> LocalBackend:
    """Load a model (engine.loading.hub; `weights` fp32 | bf16 | q4, see engine/loading/packed_model.py), attach the
    role adapters found in `adapters_dir` (one PEFT directory per role, named after it), start a scheduler. Call
    `.close()` when done. step_lock: a scheduler.TurnLock shared with the other models of this process."""
    from engine.loading.hub import load_model
    from engine.serving.scheduler import Scheduler
    m, tok = load_model(model, device=device, dtype=dtype, weights=weights)
    roles = ()
    if adapters_dir:
        from engine.lora import load_adapters
        roles = [n for n in load_adapters(m, adapters_dir) if n in ROLES]
        if not roles:
            raise FileNotFoundError(f"{adapters_dir}: no adapter subdirectory named after a role ({', '.join(ROLES)})")
    sched = Scheduler(m, tok, n_slots=n_slots, step_lock=step_lock)
    sched.start()
    return LocalBackend(sched, tok, adapters=roles)
