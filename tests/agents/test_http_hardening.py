"""The HTTP server against a hostile or careless client: every malformed field is a 400
that never reaches the backend; body cap (413), read deadline, a half-closing client still answered;
API key, Host/Origin restricted to loopback, a non-loopback --host refused before the model loads;
OpenAI-style streaming (through the real scheduler on a tiny model); and a bounded load test: 64 concurrent
clients, valid and invalid requests mixed, no connection reset, every answer well-formed.

    python -m pytest tests/agents/test_http_hardening.py -q

The load and half-close tests use only `serve` and raw sockets, so they also run against the old server.
"""
import http.client
import json
import socket
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from engine.agents.backends import HTTPBackend
from engine.serving.backend import Completion, LocalBackend
from engine.serving.http_server import serve

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"}]


class EchoBackend:
    """Answers with the role and the last user message after `delay` seconds; records every call."""

    def __init__(self, delay=0.0):
        self.calls, self.lock, self.delay = [], threading.Lock(), delay

    def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
        with self.lock:
            self.calls.append((role, messages, max_new_tokens, temperature, stop))
        time.sleep(self.delay)
        return Completion(f"[{role}] {messages[-1]['content']}", prompt_tokens=12, completion_tokens=3)


@pytest.fixture
def echo():
    backend = EchoBackend()
    server = serve(backend)
    yield server, backend
    server.shutdown()
    server.server_close()


def post(server, body, headers=None, path="/v1/chat/completions", method="POST"):
    """(status, parsed JSON or raw text) for one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, raw.decode("utf-8", "replace")


def ok_body(**kw):
    return {"model": "coder", "messages": MSGS, **kw}


# --- validation at the door ---------------------------------------------------------------------------

MALFORMED = {
    "temperature NaN": b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "temperature Infinity": b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
    "temperature 1e999": b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
    "temperature string": ok_body(temperature="hot"),
    "temperature negative": ok_body(temperature=-0.5),
    "temperature 3": ok_body(temperature=3),
    "temperature true": ok_body(temperature=True),
    "content lone surrogate": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "stop lone surrogate": b'{"messages": [{"role": "user", "content": "x"}], "stop": ["\\udfff"]}',
    "model lone surrogate": b'{"messages": [{"role": "user", "content": "x"}], "model": "\\ud83d"}',
    "stop [5]": ok_body(stop=[5]),
    "stop 5": ok_body(stop=5),
    "stop empty string": ok_body(stop=""),
    "stop [None]": ok_body(stop=[None]),
    "stop 17 strings": ok_body(stop=[f"s{i}" for i in range(17)]),
    "max_tokens many": ok_body(max_tokens="many"),
    "max_tokens 0": ok_body(max_tokens=0),
    "max_tokens -3": ok_body(max_tokens=-3),
    "max_tokens 1.5": ok_body(max_tokens=1.5),
    "max_tokens true": ok_body(max_tokens=True),
    "max_tokens 10**9": ok_body(max_tokens=10 ** 9),
    "messages empty": ok_body(messages=[]),
    "messages missing": {"model": "coder"},
    "messages a string": ok_body(messages="hello"),
    "messages [5]": ok_body(messages=[5]),
    "unknown role": ok_body(messages=[{"role": "robot", "content": "x"}]),
    "role missing": ok_body(messages=[{"content": "x"}]),
    "content a list": ok_body(messages=[{"role": "user", "content": ["x"]}]),
    "content missing": ok_body(messages=[{"role": "user"}]),
    "content None": ok_body(messages=[{"role": "user", "content": None}]),
    "model a number": ok_body(model=5),
    "model a list": ok_body(model=["coder"]),
    "stream yes": ok_body(stream="yes"),
    "n 2": ok_body(n=2),
    "top_p 0.5": ok_body(top_p=0.5),
    "body a list": [ok_body()],
    "body a string": "coder",
    "body null": b"null",
    "not JSON": b"{not json",
    "not UTF-8": b'{"messages": "\xff\xfe"}',
    "empty body": b"",
    "deep nesting": b"[" * 100000 + b"]" * 100000,
}


def test_every_malformed_request_is_a_400_that_never_reaches_the_backend(echo):
    server, backend = echo
    answered = {}
    for name, body in MALFORMED.items():
        status, out = post(server, body)
        answered[name] = status
        assert status == 400, f"{name}: {status} {out}"
        assert isinstance(out, dict) and out["error"]["message"] and out["error"]["type"] == "invalid_request_error", name
    assert backend.calls == []
    assert len(answered) == len(MALFORMED) >= 35
    status, out = post(server, ok_body())                    # and the server still answers
    assert status == 200 and out["choices"][0]["message"]["content"] == "[coder] hello there"


def test_error_names_the_field(echo):
    server, _ = echo
    for field, body in [("temperature", ok_body(temperature="hot")), ("stop", ok_body(stop=[5])),
                        ("max_tokens", ok_body(max_tokens="many")), ("messages[0].role", MALFORMED["unknown role"])]:
        status, out = post(server, body)
        assert status == 400 and out["error"]["param"] == field and field.split("[")[0] in out["error"]["message"]


def test_valid_fields_reach_the_backend_as_given(echo):
    from engine.serving.http_server import parse_chat_request
    server, backend = echo
    assert post(server, ok_body(model="planner", max_tokens=7, temperature=0.25, stop="</x>"))[0] == 200
    assert backend.calls[-1][0] == "planner" and backend.calls[-1][2:] == (7, 0.25, ["</x>"])
    r = parse_chat_request(json.dumps({"messages": MSGS}).encode())
    assert (r.role, r.max_tokens, r.temperature, r.stop, r.stream) == ("coder", 512, 0.0, [], False)  # defaults
    r = parse_chat_request(json.dumps({"messages": MSGS, "model": "qwen2.5-coder-32b", "stop": None,
                                       "max_tokens": None, "temperature": 1, "n": 1, "top_p": 1.0}).encode())
    assert (r.role, r.model, r.max_tokens) == ("coder", "qwen2.5-coder-32b", 512)        # the documented fallback


def test_routes_and_lengths(echo):
    server, backend = echo
    assert post(server, ok_body(), path="/v1/nope")[0] == 404
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")                     # no Content-Length
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    for length in ("abc", "-5"):
        s = socket.create_connection(server.server_address[:2], timeout=10)
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 400")
        s.close()
    assert backend.calls == []


# --- body cap, read deadline, half-close ----------------------------------------------------------------

def test_a_body_over_the_cap_is_413_without_being_read():
    backend = EchoBackend()
    server = serve(backend, max_body=100_000)
    try:
        big = json.dumps(ok_body(messages=[{"role": "user", "content": "x" * 10_000_000}])).encode()
        t0 = time.monotonic()
        status, out = post(server, big)
        assert status == 413 and "limit of 100000" in out["error"]["message"], out
        assert time.monotonic() - t0 < 20 and backend.calls == []
        assert post(server, ok_body())[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def _closed_within(sock, seconds) -> bool:
    """Does the server close this connection within `seconds` (EOF or reset)?"""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_stalled_and_dribbling_clients_are_dropped():
    backend = EchoBackend()
    server = serve(backend, read_timeout=0.5)
    try:
        threads_before = threading.active_count()
        stalled = []
        for i in range(100):                                   # headers cut short, or a body promised, never sent
            s = socket.create_connection(server.server_address[:2])
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                      (b"Content-Length: 100\r\n\r\n{" if i % 2 else b"Content-Le"))
            stalled.append(s)
        assert all(_closed_within(s, 5) for s in stalled)
        deadline = time.monotonic() + 5
        while threading.active_count() > threads_before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= threads_before + 5, "stalled connections still hold their threads"
        d = socket.create_connection(server.server_address[:2])  # a byte every 0.2 s: under the per-read timeout
        t0, closed = time.monotonic(), False
        try:
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                d.sendall(bytes([b]))
                time.sleep(0.2)
                if time.monotonic() - t0 > 5:
                    break
        except OSError:
            closed = True
        assert closed or _closed_within(d, 1), "a dribbling client kept its thread past the read deadline"
        assert time.monotonic() - t0 < 6
        assert post(server, ok_body())[0] == 200 and backend.calls
    finally:
        server.shutdown()
        server.server_close()


class SlowScheduler:
    """A scheduler whose answer takes `delay` seconds (the server polls 'client gone?' meanwhile)."""
    max_len = 4096

    def __init__(self, delay):
        self.delay, self.cancelled = delay, []

    def submit(self, prompt_ids, **kw):
        f = Future()
        res = SimpleNamespace(text="slow answer", prompt_tokens=len(prompt_ids), new_tokens=2,
                              finish_reason="stop", queue_s=0.0)
        threading.Timer(self.delay, lambda: f.done() or f.set_result(res)).start()
        return f

    def cancel(self, fut):
        self.cancelled.append(fut)
        if not fut.done():
            fut.set_result(SimpleNamespace(text="", prompt_tokens=0, new_tokens=0, finish_reason="cancelled",
                                           queue_s=0.0))

    def stop(self):
        pass


class CharTokenizer:
    eos_ids = {0}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [ord(c) % 200 + 1 for m in messages for c in m["content"]]

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + i % 26) for i in ids)


def _read_final_response(sock) -> tuple[int, bytes]:
    """Read to EOF; skip interim 1xx responses; (status, body) of the final one."""
    data = b""
    sock.settimeout(10)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    while data.startswith(b"HTTP/1.1 1"):
        data = data[data.index(b"\r\n\r\n") + 4:]
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_client_that_half_closes_after_sending_still_gets_its_answer():
    sched = SlowScheduler(delay=1.0)
    server = serve(LocalBackend(sched, CharTokenizer()))
    try:
        body = json.dumps(ok_body()).encode()
        s = socket.create_connection(server.server_address[:2])
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        s.shutdown(socket.SHUT_WR)                       # "I have sent everything", still reading
        status, out = _read_final_response(s)
        s.close()
        assert status == 200, out
        assert json.loads(out)["choices"][0]["message"]["content"] == "slow answer"
        assert sched.cancelled == []
    finally:
        server.shutdown()
        server.server_close()


# --- authentication, Host, Origin, bind address -----------------------------------------------------------

def test_api_key():
    backend = EchoBackend()
    server = serve(backend, api_key="s3cret-key")
    try:
        assert post(server, ok_body())[0] == 401
        assert post(server, ok_body(), {"Authorization": "Bearer wrong"})[0] == 401
        assert post(server, ok_body(), {"Authorization": "Basic s3cret-key"})[0] == 401
        assert post(server, None, method="GET", path="/v1/models")[0] == 401
        assert backend.calls == []
        status, out = post(server, ok_body(), {"Authorization": "Bearer s3cret-key"})
        assert status == 200 and out["choices"][0]["message"]["content"] == "[coder] hello there"
        c = HTTPBackend(server.url, model="coder", api_key="s3cret-key", retries=0).chat("coder", MSGS, 5)
        assert c.error is None and c.text == "[coder] hello there"
        c = HTTPBackend(server.url, model="coder", retries=0).chat("coder", MSGS, 5)
        assert "HTTP 401" in c.error
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_from_flag_or_environment(monkeypatch):
    from engine import cli
    from engine.serving.http_server import API_KEY_ENV, api_key_of
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_of(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_of(None) == "from-env" and api_key_of("from-flag") == "from-flag"
    assert cli.build_parser().parse_args(["serve", "--api-key", "k"]).api_key == "k"


@pytest.mark.parametrize("headers, expect", [
    ({"Host": "evil.example"}, 403), ({"Host": "evil.example:8000"}, 403), ({"Host": "127.0.0.1.nip.io"}, 403),
    ({"Host": "localhost:8000"}, 200), ({"Host": "127.0.0.1"}, 200), ({"Host": "[::1]:8000"}, 200),
    ({"Host": "LOCALHOST"}, 200), ({"Host": "my-box.lan"}, 200),          # my-box.lan: configured
    ({"Origin": "http://evil.example"}, 403), ({"Origin": "null"}, 403), ({"Origin": "http://localhost:3000"}, 200),
])
def test_host_and_origin_are_restricted(headers, expect):
    backend = EchoBackend()
    server = serve(backend, allowed_hosts=["my-box.lan"])
    try:
        status, _ = post(server, ok_body(), headers)
        assert status == expect
        assert bool(backend.calls) == (expect == 200)
    finally:
        server.shutdown()
        server.server_close()


def test_non_loopback_host_is_refused_before_the_model_loads(monkeypatch):
    from engine import cli
    loads = []
    monkeypatch.setattr("engine.serving.backend.open_local", lambda *a, **k: loads.append(a))
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--host", host])
        assert e.value.code == 2
    assert loads == []
    with pytest.raises(ValueError, match="loopback"):
        serve(EchoBackend(), host="0.0.0.0")
    server = serve(EchoBackend(), host="0.0.0.0", allow_remote=True)     # explicitly allowed
    server.shutdown()
    server.server_close()


def test_ipv6_loopback():
    try:
        server = serve(EchoBackend(), host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        c = HTTPBackend(server.url, model="coder", retries=0).chat("coder", MSGS, 5)
        assert server.url.startswith("http://[::1]:") and c.error is None and c.text == "[coder] hello there"
    finally:
        server.shutdown()
        server.server_close()


# --- streaming ------------------------------------------------------------------------------------------------

def _sse(server, body):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    return [c["choices"][0]["delta"].get("content", "") for c in chunks]


def test_streaming_from_a_backend_without_token_streaming(echo):
    server, _ = echo
    assert "".join(_sse(server, ok_body(stream=True))) == "[coder] hello there"


def test_streaming_through_the_real_scheduler():
    import torch
    from engine.config import PRESETS
    from engine.model import Transformer
    from engine.serving.scheduler import Scheduler
    torch.manual_seed(0)
    m = Transformer(PRESETS["tiny"].replace(max_seq_len=256)).init_weights(seed=1, std=0.1).eval()
    tok = CharTokenizer()
    tok.eos_ids = set()
    sched = Scheduler(m, tok, n_slots=2, max_len=256).start()
    server = serve(LocalBackend(sched, tok))
    try:
        plain = post(server, ok_body(max_tokens=40))[1]["choices"][0]["message"]["content"]
        pieces = _sse(server, ok_body(max_tokens=40, stream=True))
        assert "".join(pieces) == plain and len(plain) == 40
        assert sum(bool(p) for p in pieces) >= 1
    finally:
        server.shutdown()
        server.server_close()
        sched.stop()


def test_a_hostile_temperature_fails_no_other_client():
    """temperature 1e-300 passes 'a number 0..2'; it samples greedily and the long request beside it completes."""
    import torch
    from engine.config import PRESETS
    from engine.model import Transformer
    from engine.serving.scheduler import Scheduler
    torch.manual_seed(0)
    m = Transformer(PRESETS["tiny"].replace(max_seq_len=256)).init_weights(seed=1, std=0.1).eval()
    tok = CharTokenizer()
    tok.eos_ids = set()
    sched = Scheduler(m, tok, n_slots=4, max_len=256).start()
    server = serve(LocalBackend(sched, tok))
    try:
        want = post(server, ok_body(max_tokens=60))[1]["choices"][0]["message"]["content"]
        results = {}
        threads = [threading.Thread(target=lambda k=k, b=b: results.__setitem__(k, post(server, b)))
                   for k, b in [("long", ok_body(max_tokens=60))] +
                   [(t, ok_body(max_tokens=20, temperature=t)) for t in (1e-300, 5e-324)]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results["long"][0] == 200 and results["long"][1]["choices"][0]["message"]["content"] == want
        assert results[1e-300][0] == 200 and results[5e-324][0] == 200
    finally:
        server.shutdown()
        server.server_close()
        sched.stop()


# --- load -------------------------------------------------------------------------------------------------------

def test_load_64_concurrent_clients_no_resets_invalid_ones_isolated():
    """64 clients connect at once (a barrier), each sends 4 requests on its own connection: 3 valid (one of them
    streamed for half the clients), 1 invalid (NaN temperature, stop [5], max_tokens 'many' or an unknown role,
    in turn). Within 120 s: no reset, every valid answer is its own echo, every invalid one a 400."""
    backend = EchoBackend(delay=0.02)
    server = serve(backend)
    n_clients, per_client = 64, 4
    bad = [b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
           json.dumps(ok_body(stop=[5])).encode(), json.dumps(ok_body(max_tokens="many")).encode(),
           json.dumps(ok_body(messages=[{"role": "robot", "content": "x"}])).encode()]
    barrier = threading.Barrier(n_clients)
    results, errors, stream_count = [], [], []

    def client(i):
        try:
            barrier.wait(30)
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            for j in range(per_client):
                invalid = j == i % per_client
                stream = not invalid and i % 2 == 0 and j == (i + 1) % per_client
                body = bad[i % len(bad)] if invalid else json.dumps(
                    {"model": "planner", "messages": [{"role": "user", "content": f"c{i} r{j}"}],
                     "stream": stream}).encode()
                conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
                if stream:                                            # SSE -> the same shape as a plain answer
                    events = [e[6:] for e in raw.decode().split("\n\n") if e.startswith("data: ")]
                    assert events[-1] == "[DONE]", events
                    chunks = [json.loads(e) for e in events[:-1]]
                    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                    out = {"object": "chat.completion", "usage": {"total_tokens": 15},
                           "choices": [{"message": {"content": text}}]}
                    stream_count.append(1)
                else:
                    out = json.loads(raw)
                results.append((invalid, r.status, out, f"c{i} r{j}"))
            conn.close()
        except Exception as e:                                     # noqa: BLE001 -- counted and reported
            errors.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, 120 - (time.monotonic() - t0)))
    took = time.monotonic() - t0
    try:
        assert not any(t.is_alive() for t in threads), "load test over its 120 s limit"
        assert errors == [], f"{len(errors)} clients failed (resets?): {errors[:5]}"
        assert len(results) == n_clients * per_client
        for invalid, status, out, tag in results:
            if invalid:
                assert status == 400 and out["error"]["message"], out
            else:
                assert status == 200 and out["choices"][0]["message"]["content"] == f"[planner] {tag}", out
                assert out["object"] == "chat.completion" and out["usage"]["total_tokens"] == 15
        assert len(backend.calls) == n_clients * (per_client - 1)     # nothing invalid reached the backend
        assert len(stream_count) == n_clients // 2
        print(f"load: {n_clients} clients x {per_client} requests ({n_clients} invalid, {len(stream_count)} "
              f"streamed) in {took:.1f} s, 0 errors")
    finally:
        server.shutdown()
        server.server_close()
