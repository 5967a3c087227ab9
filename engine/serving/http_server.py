"""A small OpenAI-compatible server in front of a backend: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models. Loopback by default. Used by the tests and by `mcl eval --backend http` against the local engine.

    MCL_API_KEY=... mcl serve --model smollm2-135m --adapters runs/adapters --port 8000   # key optional
    mcl eval --backend http --url http://127.0.0.1:8000 --benchmark humaneval --out runs/eval_http

    server = serve(backend, model_name="smollm2-135m")       # in-process: port 0 picks a free port
    server.url                              # 'http://127.0.0.1:PORT'
    server.shutdown(); server.server_close()

    from openai import OpenAI               # the official client drives it (tests/agents/test_openai_client.py)
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="coder", messages=[...], n=2, top_p=0.9, seed=1, logprobs=True,
                                       top_logprobs=3, extra_body={"top_k": 40})

The request's `model` picks the adapter: a role name (retriever, planner, coder, debugger: the convention of
servers that expose LoRA adapters as models) is that role's adapter; the served model's own name (`model_name`,
what `mcl serve --model` loaded) is the base model, no adapter; any other string (a teacher's name a client was
configured with) means "coder" -- the documented fallback. GET /v1/models lists the roles and the model's name.

Sampling, for both endpoints: `n` choices share one prefill and decode as rows of one batch (engine/serving/scheduler.py's
submit_n); with `seed`, choice i draws from its own stream seeded from (seed, i) (engine.serving.scheduler.row_seed);
`top_p`, and `top_k` (an extension field: extra_body with the openai client) in engine/serving/steps.py's sampler.
Logprobs are the model's log-softmax of the raw logits (before temperature / top-k / top-p, as OpenAI reports
them), computed only for requests that ask: chat `logprobs: true` + `top_logprobs` 0..20 -> choices[i].logprobs
= {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}; completions `logprobs` 0..5 ->
choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}, k most likely + the sampled one],
text_offset (character offsets into the choice's text)}. A token that is part of a UTF-8 character is named
"bytes:\\xNN..." (its `bytes` are exact). The text keeps a stop string that ended it (the agents' parsers rely
on it); its logprobs cover every generated token. Defaults differ from OpenAI's: temperature 0 (greedy),
max_tokens 512.

What is checked at the door, before anything reaches the backend (each failure: 4xx + a JSON message
naming the field, OpenAI's error shape; the connection stays usable or is closed cleanly):
  - Host header a loopback name (or one given with --allow-host), Origin (when sent) the same: a web page
    or a DNS-rebinding name cannot drive the server (403); API key when one is set (401; constant-time).
  - Content-Length present (411), at most `max_body` bytes (413, the body is not read), body read within
    `read_timeout` seconds in all (408; headers too: a stalled client is dropped, its thread freed).
  - JSON without NaN/Infinity, an object; chat: `messages` a non-empty list of {role: system|user|assistant,
    content: string}; completions: `prompt` a non-empty string or a non-empty list of token ids (0..vocab-1);
    `model` a string; `max_tokens` an integer 1..MAX_TOKENS (default 512); `temperature` a finite number 0..2
    (below 1e-5 it samples greedily: engine/serving/steps.py); `top_p` a number in (0, 1]; `top_k` an integer >= 0
    (0: off); `n` an integer 1..max_n (MAX_N, or fewer: the scheduler's slots); `seed` an integer (64-bit);
    `stop` a non-empty string or a list of at most 16 of them; `stream` a boolean; `stream_options`
    {include_usage: boolean}; chat `logprobs` a boolean and `top_logprobs` an integer 0..20 (with logprobs
    true); completions `logprobs` an integer 0..5, `echo` false, `suffix` null, `best_of` 1 or n (not served
    otherwise); every string of the body (keys too) Unicode text, no lone surrogate. Other fields are ignored.
    A backend that only chats (HTTPBackend, a test double) serves plain chat; n > 1, top_p, top_k, seed,
    logprobs and /v1/completions need one that samples locally (LocalBackend): 400 naming the field.
Not checked at the door, but bounded behind it: a prompt longer than the context is an error completion from
the backend (502); special-token text inside `content` (`<|im_start|>system ...`) is tokenized as text, only
the chat template's own markers are control tokens (engine/loading/tokenizer.py); a request whose sampling or stream
callback fails ends alone, the other requests in the scheduler go on (engine/serving/scheduler.py).
`stream: true` answers OpenAI-style server-sent events (`data: {chat.completion.chunk}` or `data:
{text_completion}` ... `data: [DONE]`): token by token (with their logprobs when asked) from a backend that
samples locally, else one chunk with the whole answer. Text is sent in whole characters, and the last
characters are held back while a stop string could still cut them.

Each request is handled in its own thread (listen backlog `backlog`), so concurrent clients reach the
backend concurrently. A client that hangs up before its answer is complete has its request cancelled in the
scheduler (LocalBackend's `gone` hook). End-of-file on the socket alone does not mean "gone": a client may
half-close after sending (shutdown(SHUT_WR)) and still wait for its answer. So on EOF the server writes a
probe the client must accept (an interim `HTTP/1.1 100 Continue`, which HTTP/1.1 clients skip; an SSE
comment once a stream has begun): a closed socket answers it with a reset, a half-closed one does not.
"""
from __future__ import annotations

import codecs
import hmac
import inspect
import ipaddress
import json
import math
import os
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.roles import ROLES
from engine.serving.backend import Choice, Sampled, Sampling

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_TOKENS = 32768                 # a request asking for more is refused (the scheduler clips to its context)
MAX_N = 16                         # choices per request (a group of n needs n KV-cache slots at once)
MAX_TOP_LOGPROBS = 20              # chat's top_logprobs, as OpenAI's
MAX_LOGPROBS = 5                   # completions' logprobs, as OpenAI's
MESSAGE_ROLES = ("system", "user", "assistant")
API_KEY_ENV = "MCL_API_KEY"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class BadRequest(Exception):
    """A request refused at the door: HTTP status, message, the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Request:
    """One checked request of either endpoint: `messages` (chat) or `prompt` (completions) is set."""
    role: str | None                   # the adapter's role; None: the base model
    model: str
    max_tokens: int
    temperature: float
    stop: list[str]
    stream: bool
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    n: int = 1
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None        # None: not asked; k: each token's logprob and the k most likely
    include_usage: bool = False        # stream_options.include_usage: a last chunk with the usage

    def sampling(self) -> Sampling:
        return Sampling(self.max_tokens, self.temperature, self.top_p, self.top_k, self.n, self.seed,
                        tuple(self.stop), self.logprobs)

    def local_only(self) -> str | None:
        """The first field that needs a backend sampling locally (LocalBackend.complete), or None."""
        for name, used in (("prompt", self.prompt is not None), ("n", self.n != 1), ("top_p", self.top_p != 1),
                           ("top_k", self.top_k != 0), ("seed", self.seed is not None),
                           ("logprobs", self.logprobs is not None)):
            if used:
                return name
        return None


def _no_constants(name):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(req: dict, name: str, default, ok, what: str):
    """req[name], or `default` when absent or null; BadRequest naming the field unless ok(value)."""
    v = req.get(name, None)
    if v is None:
        return default
    if not ok(v):
        raise BadRequest(f"{name} must be {what}, not {v!r}", name)
    return v


def _utf8(v) -> bool:
    """A string that is Unicode text: JSON's \\ud800 escapes give lone surrogates, which no tokenizer can encode."""
    try:
        v.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _strings(v, where: str = "body"):
    """BadRequest naming the first string anywhere in v (keys too) that holds a lone surrogate."""
    stack = [(v, where)]
    while stack:
        x, at = stack.pop()
        if isinstance(x, str) and not _utf8(x):
            raise BadRequest(f"{at} holds a lone surrogate (not Unicode text)", at)
        if isinstance(x, dict):
            for k, y in x.items():
                if not _utf8(k):
                    raise BadRequest(f"a key of {at} holds a lone surrogate (not Unicode text)", at)
                stack.append((y, f"{at}.{k}" if at != "body" else k))
        elif isinstance(x, list):
            stack.extend((y, f"{at}[{i}]") for i, y in enumerate(x))


def _json_object(body: bytes) -> dict:
    try:
        req = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:             # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest(f"body must be a JSON object, not {type(req).__name__}")
    _strings(req)
    return req


def role_of(model: str, model_name: str | None) -> str | None:
    """A role name -> that role; the served model's own name -> None (the base model); anything else -> coder."""
    if model in ROLES:
        return model
    return None if model_name and model == model_name else "coder"


def _common(req: dict, max_n: int, model_name: str | None) -> dict:
    """The fields both endpoints share, checked -> Request keyword arguments."""
    model = req.get("model")
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    max_tokens = _field(req, "max_tokens", 512, lambda v: _integer(v) and 1 <= v <= MAX_TOKENS,
                        f"an integer from 1 to {MAX_TOKENS}")
    temperature = _field(req, "temperature", 0.0, lambda v: _number(v) and math.isfinite(v) and 0 <= v <= 2,
                         "a number from 0 to 2")
    top_p = _field(req, "top_p", 1.0, lambda v: _number(v) and 0 < v <= 1, "a number above 0 and at most 1")
    top_k = _field(req, "top_k", 0, lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: off)")
    n = _field(req, "n", 1, lambda v: _integer(v) and 1 <= v <= max_n, f"an integer from 1 to {max_n}")
    seed = req.get("seed", None)
    if seed is not None and (not _integer(seed) or not -(1 << 63) <= seed < (1 << 64)):
        raise BadRequest(f"seed must be a 64-bit integer, not {seed!r}", "seed")
    stop = req.get("stop", None)
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of at most 16 of them", "stop")
    stream = req.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    options = req.get("stream_options", None)
    if options is None:
        options = {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("stream_options must be an object like {\"include_usage\": true}", "stream_options")
    return dict(role=role_of(model, model_name), model=model, max_tokens=max_tokens, temperature=float(temperature),
                stop=stop, stream=stream, n=n, top_p=float(top_p), top_k=top_k, seed=seed,
                include_usage=options.get("include_usage", False))


def parse_chat_request(body: bytes, max_n: int = MAX_N, model_name: str | None = None) -> Request:
    """Bytes of a POST /v1/chat/completions -> Request, or BadRequest naming the field."""
    req = _json_object(body)
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        if m.get("role") not in MESSAGE_ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}, not {m.get('role')!r}",
                             f"messages[{i}].role")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
    kw = _common(req, max_n, model_name)
    logprobs = req.get("logprobs", None)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(f"logprobs must be true or false, not {logprobs!r}", "logprobs")
    top = req.get("top_logprobs", None)
    if top is not None and (not _integer(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, not {top!r}", "top_logprobs")
    if top is not None and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return Request(messages=messages, logprobs=(top or 0) if logprobs else None, **kw)


def parse_completion_request(body: bytes, max_n: int = MAX_N, model_name: str | None = None,
                             vocab_size: int | None = None) -> Request:
    """Bytes of a POST /v1/completions -> Request, or BadRequest naming the field. `prompt`: a string or a list
    of token ids (each below vocab_size when it is given); one prompt per request."""
    req = _json_object(body)
    prompt = req.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest("prompt must not be empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(_integer(t) for t in prompt):
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t < (vocab_size or 1 << 62)), None)
        if bad is not None:
            raise BadRequest(f"prompt[{bad}] ({prompt[bad]}) is not a token id"
                             + (f" (0..{vocab_size - 1})" if vocab_size else ""), "prompt")
    else:
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)",
                         "prompt")
    kw = _common(req, max_n, model_name)
    logprobs = req.get("logprobs", None)
    if logprobs is not None and (not _integer(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise BadRequest(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, not {logprobs!r}", "logprobs")
    if req.get("echo", False) not in (False, None):
        raise BadRequest("echo is not served (the completion's text only)", "echo")
    if req.get("suffix", None) is not None:
        raise BadRequest("suffix is not served (no insertion)", "suffix")
    best_of = req.get("best_of", None)
    if best_of is not None and best_of not in (1, kw["n"]):
        raise BadRequest(f"best_of must be 1 or n (no ranking of extra samples), not {best_of!r}", "best_of")
    return Request(prompt=prompt, logprobs=logprobs, **kw)


# --- logprobs in OpenAI's shapes ---------------------------------------------------------------------------
def token_bytes(tok, token_id: int) -> bytes:
    """The bytes a token stands for: the tokenizer's token_bytes when it has one, else its decoded text."""
    f = getattr(tok, "token_bytes", None)
    return f(token_id) if f is not None else tok.decode([token_id]).encode("utf-8")


def token_name(b: bytes) -> str:
    """A token's text; a token that is part of a UTF-8 character is named by its bytes: 'bytes:\\xe2\\x80'."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def chat_logprobs(tok, entries) -> dict:
    """engine.serving.scheduler.TokenLogprob entries -> a chat choice's (or chunk's) `logprobs` object."""
    def one(t, lp):
        b = token_bytes(tok, t)
        return {"token": token_name(b), "logprob": lp, "bytes": list(b)}
    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tok, entries, offset: int = 0, decoder=None) -> tuple[dict, int]:
    """TokenLogprob entries -> (a completion choice's (or chunk's) `logprobs` object, the offset after them).
    text_offset counts the characters of the choice's text before each token, starting at `offset`; `decoder`
    (a UTF-8 incremental decoder) carries a character split between chunks."""
    decoder = decoder or codecs.getincrementaldecoder("utf-8")("replace")
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        b = token_bytes(tok, e.token)
        out["tokens"].append(token_name(b))
        out["token_logprobs"].append(e.logprob)
        top = {token_name(token_bytes(tok, t)): lp for t, lp in e.top}
        top.setdefault(token_name(b), e.logprob)          # the sampled token is always listed
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(decoder.decode(b))
    return out, offset


@dataclass
class _Sent:
    """What one choice's stream has sent: tokens, their text, and (completions) the text offset reached."""
    k: int = 0
    text: str = ""
    offset: int = 0
    decoder: object = None


def ready(tok, ids: list[int], done: int, hold: int) -> tuple[int, str | None]:
    """How many of `ids` a stream can send now and their text: the longest prefix (beyond `done` tokens) whose text
    has whole characters only and leaves out the last `hold` characters (a stop string may still cut them)."""
    full = tok.decode(ids)
    limit = len(full.rstrip("\ufffd")) - hold
    for k in range(len(ids), done, -1):
        text = tok.decode(ids[:k])
        if len(text) <= limit and not text.endswith("\ufffd") and full.startswith(text):
            return k, text
    return done, None


def usage(s: Sampled) -> dict:
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens}


def response_body(req: Request, s: Sampled, tok, cid: str, created: int) -> dict:
    """The whole answer: a chat.completion or a text_completion object."""
    model = req.model or req.role or "base"
    if req.messages is not None:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None if c.logprobs is None else chat_logprobs(tok, c.logprobs),
                    "finish_reason": c.finish_reason} for i, c in enumerate(s.choices)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage(s)}
    choices = [{"index": i, "text": c.text,
                "logprobs": None if c.logprobs is None else completion_logprobs(tok, c.logprobs)[0],
                "finish_reason": c.finish_reason} for i, c in enumerate(s.choices)]
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage(s)}


def _host_name(value: str) -> str:
    """'localhost:8000' / '[::1]:8000' / '127.0.0.1' -> the name without the port, lower case."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[1:v.find("]")] if "]" in v else v
    return v.rsplit(":", 1)[0] if v.count(":") == 1 else v


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_handler(backend, api_key: str | None = None, allowed_hosts=(), max_body: int = 1 << 20,
                 read_timeout: float = 30.0, model_name: str | None = None, max_n: int = MAX_N,
                 vocab_size: int | None = None):
    """The request handler class. model_name: the served model's name (the base model; listed by /v1/models);
    max_n: the most choices per request; vocab_size: token ids of a completions prompt must be below it."""
    takes_gone = _takes(backend, "gone")
    local = callable(getattr(backend, "complete", None))   # LocalBackend: token ids in, n choices out
    allowed = {h.lower() for h in allowed_hosts}
    key = api_key.encode() if api_key else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = read_timeout                   # per socket read/write (StreamRequestHandler.setup applies it)

        def log_message(self, *args):           # quiet: the eval has its own progress bar
            pass

        # --- reading within a deadline -----------------------------------------------------------
        def handle_one_request(self):
            """Arm a watchdog over the whole read of the request (request line, headers, body): a client
            that dribbles bytes within the per-read timeout is still dropped after `read_timeout`."""
            self._read_done = threading.Event()
            self._gone = self._probed = self._streaming = False
            timer = threading.Timer(read_timeout, self._stalled)
            timer.daemon = True
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def _stalled(self):
            if not self._read_done.is_set():
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)       # unblocks the read: it sees end-of-file
                except OSError:
                    pass

        def _read_body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if self.headers.get("Transfer-Encoding"):
                raise BadRequest("chunked request bodies are not supported: send Content-Length", status=411)
            if length is None:
                raise BadRequest("Content-Length required", status=411)
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise BadRequest(f"bad Content-Length {length!r}") from None
            if n > max_body:
                raise BadRequest(f"body of {n} bytes is over the limit of {max_body}", status=413)
            body = self.rfile.read(n)
            if len(body) < n:
                raise BadRequest(f"body cut short: {len(body)} of {n} bytes within {read_timeout:g} s", status=408)
            return body

        # --- answering ---------------------------------------------------------------------------
        def _send(self, code: int, obj: dict, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _refuse(self, e: BadRequest, body_read: bool):
            """4xx with OpenAI's error shape. When the body was not read, close after a lingering drain: closing
            with unread bytes would reset the connection and the client would never see the answer."""
            if not body_read:
                self.close_connection = True
            kind = {401: "authentication_error", 403: "permission_error"}.get(e.status, "invalid_request_error")
            extra = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
            try:
                self._send(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": None}},
                           extra)
                if not body_read:
                    self.wfile.flush()
                    self._drain()
            except OSError:
                pass

        def _drain(self, seconds: float = 2.0, limit: int = 64 << 20):
            self._read_done.set()
            try:
                self.connection.shutdown(socket.SHUT_WR)
                deadline, got = time.monotonic() + seconds, 0
                while time.monotonic() < deadline and got < limit:
                    self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = self.connection.recv(1 << 16)
                    if not chunk:
                        break
                    got += len(chunk)
            except OSError:
                pass

        def _check_door(self):
            """Host / Origin / API key, from the headers alone (before the body is read)."""
            host = self.headers.get("Host")
            if host is not None and not (is_loopback(_host_name(host)) or _host_name(host) in allowed):
                raise BadRequest(f"Host {host!r} is not served (loopback names only; see --allow-host)",
                                 status=403)
            origin = self.headers.get("Origin")
            if origin is not None:
                name = _host_name(origin.split("://", 1)[-1].split("/", 1)[0])
                if not (is_loopback(name) or name in allowed):
                    raise BadRequest(f"Origin {origin!r} is not allowed", status=403)
            if key is not None:
                auth = self.headers.get("Authorization") or ""
                given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
                if not hmac.compare_digest(given, key):
                    raise BadRequest("missing or wrong API key (Authorization: Bearer ...)", status=401)

        def _client_gone(self) -> bool:
            """True once the client has closed its connection (see the module docstring: EOF alone may be a
            half-close; a probe write tells the two apart)."""
            if self._gone:
                return True
            try:
                if self._probed:
                    if self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        self._gone = True                   # the probe drew a reset
                    return self._gone
                ready, _, _ = select.select([self.connection], [], [], 0)
                if not (ready and self.connection.recv(1, socket.MSG_PEEK) == b""):
                    return False
                if self._streaming:
                    self.wfile.write(b": still working\n\n")
                elif self.request_version == "HTTP/1.1":
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                else:
                    return False                            # an HTTP/1.0 client: no probe allowed; wait
                self.wfile.flush()
                self._probed = True
            except OSError:
                self._gone = True
            return self._gone

        def do_GET(self):
            try:
                self._check_door()
            except BadRequest as e:
                return self._refuse(e, body_read=True)
            finally:
                self._read_done.set()
            if self.path.rstrip("/") == "/v1/models":
                names = [*ROLES, *([model_name] if model_name else [])]
                return self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                    "owned_by": "mapcoder-lite"} for m in names]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                       "param": None, "code": None}})

        def do_POST(self):
            body_read = False
            try:
                self._check_door()
                path = self.path.rstrip("/")
                if path not in (CHAT, COMPLETIONS):
                    raise BadRequest(f"no route {self.path}", status=404)
                body = self._read_body()
                body_read = True
                self._read_done.set()
                req = parse_chat_request(body, max_n, model_name) if path == CHAT else \
                    parse_completion_request(body, max_n, model_name, vocab_size)
                field = None if local else req.local_only()
                if field is not None:
                    raise BadRequest(f"{field} needs a backend that samples locally (this one only chats)", field)
            except BadRequest as e:
                return self._refuse(e, body_read)
            if req.stream:
                return self._answer_stream(req)
            try:
                s = self._run(req)
            except ValueError as e:                     # the scheduler refused a value the door let through
                return self._send(400, {"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                                  "code": None}})
            except Exception as e:                      # noqa: BLE001 -- report it to the client, keep serving
                return self._send(500, {"error": {"message": f"backend failed: {type(e).__name__}: {e}",
                                                  "type": "server_error", "param": None, "code": None}})
            if self._gone or any(c.finish_reason == "cancelled" for c in s.choices):
                self.close_connection = True
                return None                             # the client is gone: nobody to answer
            if s.error:
                return self._send(502, {"error": {"message": s.error, "type": "server_error", "param": None,
                                                  "code": None}})
            self._send(200, response_body(req, s, getattr(backend, "tokenizer", None), _new_id(req), int(time.time())))

        def _run(self, req: Request, on_tokens=None) -> Sampled:
            """The backend's answer: LocalBackend.complete on token ids, or a chat-only backend's one choice."""
            if not local:
                kw = {"gone": self._client_gone} if takes_gone else {}
                c = backend.chat(req.role, req.messages, req.max_tokens, req.temperature, req.stop, **kw)
                if c.error:
                    return Sampled(prompt_tokens=c.prompt_tokens, error=c.error)
                return Sampled([Choice(c.text, c.finish_reason)], c.prompt_tokens, c.completion_tokens)
            tok = backend.tokenizer
            if req.messages is not None:
                ids = tok.apply_chat_template(req.messages, add_generation_prompt=True)
            else:
                ids = tok.encode(req.prompt, add_special=True) if isinstance(req.prompt, str) else req.prompt
            return backend.complete(req.role, ids, req.sampling(), gone=self._client_gone, on_tokens=on_tokens)

        # --- streaming (server-sent events) ------------------------------------------------------
        def _answer_stream(self, req: Request):
            cid, created, chat = _new_id(req), int(time.time()), req.messages is not None
            kind = "chat.completion.chunk" if chat else "text_completion"
            tok = getattr(backend, "tokenizer", None)
            sent = [_Sent(decoder=codecs.getincrementaldecoder("utf-8")("replace")) for _ in range(req.n)]
            hold = max((len(s) for s in req.stop), default=0) + 8    # a stop string may still cut the tail

            def write(choices, extra=None):
                obj = {"id": cid, "object": kind, "created": created, "model": req.model or req.role or "base",
                       "choices": choices, **(extra or {})}
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            def event(i: int, text: str | None, entries=None, finish=None):
                """One choice's piece: its text (None: only a finish) and the logprobs of its tokens."""
                lp = None
                if entries is not None and chat:
                    lp = chat_logprobs(tok, entries)
                elif entries is not None:
                    lp, sent[i].offset = completion_logprobs(tok, entries, sent[i].offset, sent[i].decoder)
                if chat:
                    choice = {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                              "finish_reason": finish}
                else:
                    choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
                write([choice])

            def begin():
                if not self._streaming:
                    self._streaming = True
                    self.close_connection = True         # the stream's end is the connection's end
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if chat:
                        write([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(req.n)])

            def on_tokens(i: int, ids: list[int], entries: list):       # LocalBackend polls them out
                k, text = ready(tok, ids, sent[i].k, hold)
                if self._gone or text is None or not text.startswith(sent[i].text):
                    return
                try:
                    begin()
                    event(i, text[len(sent[i].text):], entries[sent[i].k:k] if req.logprobs is not None else None)
                    sent[i].k, sent[i].text = k, text
                except OSError:
                    self._gone = True

            status, error = 502, None
            try:
                s = self._run(req, on_tokens if local else None)
            except ValueError as e:
                s, status, error = None, 400, str(e)
            except Exception as e:                      # noqa: BLE001
                s, status, error = None, 500, f"backend failed: {type(e).__name__}: {e}"
            else:
                error = s.error
            if self._gone or (s is not None and any(c.finish_reason == "cancelled" for c in s.choices)):
                self.close_connection = True
                return None
            if error and not self._streaming:
                return self._send(status, {"error": {"message": error, "param": None, "code": None,
                                                     "type": "invalid_request_error" if status == 400 else
                                                     "server_error"}})
            try:
                begin()
                if error:
                    self.wfile.write(b"data: " + json.dumps({"error": {"message": error, "type": "server_error"}})
                                     .encode() + b"\n\n")
                else:
                    for i, c in enumerate(s.choices):
                        rest = c.text[len(sent[i].text):] if c.text.startswith(sent[i].text) else ""
                        entries = None if c.logprobs is None else c.logprobs[sent[i].k:]
                        if rest or entries:
                            event(i, rest, entries)
                    for i, c in enumerate(s.choices):
                        event(i, None, finish=c.finish_reason)
                    if req.include_usage:
                        write([], {"usage": usage(s)})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:
                pass

    return Handler


def _new_id(req: Request) -> str:
    return ("chatcmpl-" if req.messages is not None else "cmpl-") + uuid.uuid4().hex[:12]


def _takes(backend, name: str) -> bool:
    """Whether backend.chat accepts the keyword `name` (a chat-only backend may take `gone`)."""
    try:
        return name in inspect.signature(backend.chat).parameters
    except (TypeError, ValueError, AttributeError):
        return False


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024          # listen backlog (the kernel caps it at net.core.somaxconn); was 5

    def handle_error(self, request, client_address):
        """A client that went away mid-answer (reset, broken pipe, timeout) is not a server error: no traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class Server6(Server):
    address_family = socket.AF_INET6


def check_host(host: str, allow_remote: bool = False):
    """Refuse a non-loopback bind address unless explicitly allowed (before any model is loaded)."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"http_server binds loopback only ({', '.join(LOOPBACK)}), not {host!r}; "
                         "pass --allow-remote (and set an API key) to serve other hosts")


def serve(backend, host: str = "127.0.0.1", port: int = 0, handler=None, api_key: str | None = None,
          allowed_hosts=(), allow_remote: bool = False, max_body: int = 1 << 20,
          read_timeout: float = 30.0, model_name: str | None = None, max_n: int = MAX_N,
          vocab_size: int | None = None) -> Server:
    """Start serving in a daemon thread; returns the server (`.url` added). `handler` overrides the
    request handler class (the tests use it to misbehave). A non-loopback `host` needs allow_remote=True;
    it is then added to the allowed Host names. model_name, max_n, vocab_size: see make_handler."""
    check_host(host, allow_remote)
    if not is_loopback(host):
        allowed_hosts = (*allowed_hosts, host)
    cls = Server6 if ":" in host else Server
    server = cls((host, port), handler or make_handler(backend, api_key, allowed_hosts, max_body, read_timeout,
                                                       model_name, max_n, vocab_size))
    server.url = f"http://{host}:{server.server_address[1]}" if ":" not in host else \
        f"http://[{host}]:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="mcl-http",
                     daemon=True).start()
    return server


def api_key_of(flag: str | None) -> str | None:
    """The API key: the --api-key flag, else the MCL_API_KEY environment variable, else none."""
    return flag or os.environ.get(API_KEY_ENV) or None


def cli_serve(a):
    """`mcl serve` (flags in engine/cli.py): check the bind address, load the model, serve until Ctrl-C."""
    check_host(a.host, a.allow_remote)                   # before the model loads
    api_key = api_key_of(a.api_key)
    if not is_loopback(a.host) and not api_key:
        print(f"warning: serving {a.host} without an API key", file=sys.stderr)
    from engine.serving.backend import open_local
    backend = open_local(a.model, a.device, a.dtype, a.adapters, n_slots=a.slots, weights=a.weights)
    server = serve(backend, a.host, a.port, api_key=api_key, allowed_hosts=a.allow_host,
                   allow_remote=a.allow_remote, max_body=a.max_body, read_timeout=a.read_timeout,
                   model_name=a.model, max_n=min(MAX_N, a.slots),
                   vocab_size=backend.scheduler.model.cfg.vocab_size)
    print(f"serving {a.model} at {server.url}/v1 (chat/completions, completions, models)"
          + (" (API key required)" if api_key else "") + " (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        backend.close()

