"""Where the agents' chat calls go: the local engine (engine/serving/backend.py's LocalBackend, `open_local`) or an
OpenAI-compatible HTTP endpoint (HTTPBackend, here). Both answer `chat(role, messages, max_new_tokens, temperature,
stop)` with a Completion.

    backend = HTTPBackend("http://127.0.0.1:8000", model="qwen2.5-coder-32b", api_key=None)
    c = backend.chat("planner", messages, max_new_tokens=384, temperature=0.0)
    c.text, c.prompt_tokens, c.completion_tokens, c.wall_s, c.finish_reason, c.error

HTTPBackend never raises: a timeout, a dropped connection, an HTTP error or a body that is not the
expected JSON becomes a Completion with empty text and `error` set, after `retries` further tries
(exponential backoff; 4xx other than 408/429 is not retried). Recipes rely on this: a teacher that
misbehaves costs one trajectory, never the run. Stdlib urllib only: no client library to pin.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

from engine.serving.backend import Completion


def chat_url(url: str) -> str:
    """'http://h:p', 'http://h:p/v1' or the full endpoint -> 'http://h:p/v1/chat/completions'."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HTTPBackend:
    """An OpenAI-compatible /v1/chat/completions endpoint (vLLM, llama.cpp server, a hosted teacher, or
    engine/serving/http_server.py). `role_models` maps a role to a model name, for servers that expose
    LoRA adapters as models (vLLM --lora-modules planner=...); other roles use `model`."""

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 300.0,
                 retries: int = 2, role_models: dict[str, str] | None = None, backoff_s: float = 1.0):
        self.url, self.model, self.api_key = chat_url(url), model, api_key
        # A loopback server is reached directly, whatever http_proxy says; a remote teacher honours it.
        loopback = urllib.parse.urlsplit(self.url).hostname in ("127.0.0.1", "localhost", "::1")
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({}) if loopback else
                                                 urllib.request.ProxyHandler()).open
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.role_models = dict(role_models or {})

    def chat(self, role: str, messages: list[dict], max_new_tokens: int, temperature: float = 0.0,
             stop: list[str] | None = None) -> Completion:
        body = {"model": self.role_models.get(role, self.model), "messages": messages,
                "max_tokens": max_new_tokens, "temperature": temperature}
        if stop:
            body["stop"] = list(stop)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        t0, error = time.perf_counter(), None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with self._open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                c = _completion_from_json(raw)
                c.wall_s = time.perf_counter() - t0
                return c
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
                error = f"HTTP {e.code} from {self.url}: {detail}"
                if 400 <= e.code < 500 and e.code not in (408, 429):
                    break                                       # our request is wrong: retrying will not help
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"bad response body from {self.url}: {type(e).__name__}: {e}"
            except Exception as e:                              # timeout, refused, reset, dropped mid-body
                error = f"{type(e).__name__} talking to {self.url}: {e}"
        return Completion("", 0, 0, time.perf_counter() - t0, "error", error=error)


def _completion_from_json(raw: bytes) -> Completion:
    """An OpenAI chat.completion body -> Completion; ValueError/KeyError/TypeError when it is not one."""
    d = json.loads(raw)
    choice = d["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str):
        raise TypeError(f"choices[0].message.content is {type(text).__name__}, not a string")
    usage = d.get("usage") or {}
    return Completion(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                      finish_reason=choice.get("finish_reason") or "stop")
