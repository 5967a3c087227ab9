"""Backends: LocalBackend routes roles to adapters through a scheduler; HTTPBackend against the local
OpenAI-compatible server, including garbage bodies, timeouts, dropped connections, HTTP errors and
retries; the server's own error handling; `mcl eval --backend http` end to end against a local server.

    python -m pytest tests/agents/test_agents_backends.py -q
"""
import json
import sys
import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import pytest

from engine.agents.backends import HTTPBackend, chat_url
from engine.serving.backend import Completion, LocalBackend
from engine.serving.http_server import serve

MSGS = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello there"}]


# --- LocalBackend ---------------------------------------------------------------------------------

class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        assert add_generation_prompt
        return [len(m["content"]) for m in messages] + [1, 2, 3]


class FakeScheduler:
    max_len = 64

    def __init__(self):
        self.submits = []

    def submit(self, prompt_ids, adapter=None, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, seed=None,
               stop_strings=(), on_token=None):
        self.submits.append(dict(prompt=list(prompt_ids), adapter=adapter, max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop=list(stop_strings)))
        f = Future()
        f.set_result(SimpleNamespace(text=f"answer for {adapter}", prompt_tokens=len(prompt_ids), new_tokens=7,
                                     finish_reason="length", queue_s=0.25, token_ids=[5] * 7, wall_s=1.0))
        return f

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize("adapters, expect", [
    (True, {"retriever": "retriever", "planner": "planner", "coder": "coder", "debugger": "debugger"}),
    (False, {"retriever": None, "planner": None, "coder": None, "debugger": None}),
    (["coder", "debugger"], {"retriever": None, "planner": None, "coder": "coder", "debugger": "debugger"}),
])
def test_local_backend_tags_requests_with_the_role_adapter(adapters, expect):
    sched = FakeScheduler()
    b = LocalBackend(sched, FakeTokenizer(), adapters=adapters)
    for role, adapter in expect.items():
        c = b.chat(role, MSGS, max_new_tokens=11, temperature=0.5, stop=["```\n"])
        assert sched.submits[-1]["adapter"] == adapter
        assert c.text == f"answer for {adapter}" and c.prompt_tokens == 5 and c.completion_tokens == 7
        assert c.finish_reason == "length" and c.queue_s == 0.25 and c.error is None
    assert sched.submits[0]["prompt"] == [3, 11, 1, 2, 3]
    assert sched.submits[0]["max_new_tokens"] == 11 and sched.submits[0]["stop"] == ["```\n"]
    b.close()
    assert sched.stopped


def test_local_backend_refuses_a_prompt_longer_than_the_context():
    sched = FakeScheduler()
    c = LocalBackend(sched, FakeTokenizer()).chat("coder", [{"role": "user", "content": "x"}] * 70, 10)
    assert c.text == "" and "does not fit the context of 64" in c.error and sched.submits == []


# --- HTTP: server + client ------------------------------------------------------------------------

class EchoBackend:
    """Answers with the role and the last user message; counts calls."""

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
        with self.lock:
            self.calls.append((role, max_new_tokens, temperature, stop))
        if messages[-1]["content"] == "explode":
            raise RuntimeError("kaboom")
        return Completion(f"[{role}] {messages[-1]['content']}", prompt_tokens=12, completion_tokens=3,
                          finish_reason="stop")


@pytest.fixture
def echo_server():
    backend = EchoBackend()
    server = serve(backend)
    yield server, backend
    server.shutdown()
    server.server_close()


class HangingScheduler(FakeScheduler):
    """submit() returns a future that only a cancel() resolves (as the real scheduler does: 'cancelled')."""

    def __init__(self):
        super().__init__()
        self.cancelled = threading.Event()

    def submit(self, prompt_ids, **kw):
        self.submits.append(dict(prompt=list(prompt_ids), **kw))
        return Future()

    def cancel(self, fut):
        self.cancelled.set()
        fut.set_result(SimpleNamespace(text="par", prompt_tokens=5, new_tokens=2, finish_reason="cancelled",
                                       queue_s=0.0))


def test_a_client_that_hangs_up_cancels_its_request():
    import socket
    sched = HangingScheduler()
    backend = LocalBackend(sched, FakeTokenizer(), adapters=True)
    server = serve(backend)
    try:
        body = json.dumps({"model": "coder", "messages": MSGS, "max_tokens": 50}).encode()
        sock = socket.create_connection(server.server_address)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 5
        while not sched.submits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.submits and not sched.cancelled.is_set()     # admitted; still waiting on the model
        time.sleep(0.5)
        assert not sched.cancelled.is_set()                        # a connected client is never cancelled
        sock.close()                                               # the client hangs up
        assert sched.cancelled.wait(5)
    finally:
        server.shutdown()
        server.server_close()
    # a direct call without `gone` just waits for the scheduler, as before
    f = LocalBackend(FakeScheduler(), FakeTokenizer()).chat("coder", MSGS, 5)
    assert f.finish_reason == "length"


def test_chat_url_forms():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_http_roundtrip_and_role_models(echo_server):
    server, backend = echo_server
    plain = HTTPBackend(server.url, model="teacher", retries=0)
    c = plain.chat("planner", MSGS, max_new_tokens=17, temperature=0.2, stop=["</root>"])
    assert c.error is None and c.text == "[coder] hello there"          # model 'teacher' is not a role name
    assert (c.prompt_tokens, c.completion_tokens, c.finish_reason) == (12, 3, "stop") and c.wall_s > 0
    assert backend.calls[-1] == ("coder", 17, 0.2, ["</root>"])
    roles = HTTPBackend(server.url + "/v1", model="teacher", role_models={r: r for r in ("planner", "debugger")})
    assert roles.chat("planner", MSGS, 5).text == "[planner] hello there"
    assert roles.chat("retriever", MSGS, 5).text == "[coder] hello there"


def test_http_concurrent_clients(echo_server):
    server, backend = echo_server
    b = HTTPBackend(server.url, model="coder")
    msgs = [[{"role": "user", "content": f"q{i}"}] for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda m: b.chat("coder", m, 5).text, msgs))
    assert outs == [f"[coder] q{i}" for i in range(16)]


def test_server_errors(echo_server):
    import urllib.error
    import urllib.request
    server, _ = echo_server
    urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open      # loopback: no proxy
    models = json.loads(urlopen(server.url + "/v1/models").read())
    assert [m["id"] for m in models["data"]] == ["retriever", "planner", "coder", "debugger"]
    for path, body, code in [("/v1/chat/completions", b"{not json", 400), ("/v1/chat/completions", b'{"x": 1}', 400),
                             ("/v1/nope", b"{}", 404)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urlopen(urllib.request.Request(server.url + path, data=body, method="POST"))
        assert e.value.code == code
    # A backend exception is a 500 for the client (and an error Completion for HTTPBackend), not a dead server.
    c = HTTPBackend(server.url, model="coder", retries=0).chat("coder", [{"role": "user", "content": "explode"}], 5)
    assert c.text == "" and "HTTP 500" in c.error and "kaboom" in c.error
    assert HTTPBackend(server.url, model="coder").chat("coder", MSGS, 5).error is None


def test_server_binds_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        serve(EchoBackend(), host="0.0.0.0")


# --- misbehaving servers ----------------------------------------------------------------------------

def faulty(behaviour):
    """A server whose handler misbehaves: behaviour(handler, attempt_number) writes the response."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hits.append(time.monotonic())
            behaviour(self, len(hits))

    server = serve(None, handler=Handler)
    server.hits = hits
    return server


def reply(h, code, body: bytes, ctype="application/json"):
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


GOOD = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 4, "completion_tokens": 1}}).encode()


@pytest.mark.parametrize("name, behaviour, retries, expect_hits, expect_error", [
    ("garbage body", lambda h, n: reply(h, 200, b"<html>502 Bad Gateway</html>", "text/html"), 1, 2, "bad response body"),
    ("wrong JSON shape", lambda h, n: reply(h, 200, b'{"choices": []}'), 0, 1, "bad response body"),
    ("null content", lambda h, n: reply(h, 200, b'{"choices": [{"message": {"content": null}}]}'), 0, 1,
     "not a string"),
    ("dropped connection", lambda h, n: h.connection.close(), 2, 3, "talking to"),
    ("truncated body", lambda h, n: (h.send_response(200), h.send_header("Content-Length", "500"), h.end_headers(),
                                     h.wfile.write(GOOD[:20]), h.connection.close()), 0, 1, "talking to"),
    ("server error, retried", lambda h, n: reply(h, 503, b'{"error": "busy"}'), 2, 3, "HTTP 503"),
    ("client error, not retried", lambda h, n: reply(h, 400, b'{"error": "bad model"}'), 3, 1, "HTTP 400"),
])
def test_http_failures_become_error_completions(name, behaviour, retries, expect_hits, expect_error):
    server = faulty(behaviour)
    try:
        c = HTTPBackend(server.url, model="m", timeout=5, retries=retries, backoff_s=0.01).chat("coder", MSGS, 5)
        assert c.text == "" and c.finish_reason == "error", name
        assert expect_error in c.error, (name, c.error)
        assert len(server.hits) == expect_hits, name
    finally:
        server.shutdown()
        server.server_close()


def test_http_timeout():
    server = faulty(lambda h, n: time.sleep(1.5))
    try:
        c = HTTPBackend(server.url, model="m", timeout=0.2, retries=0).chat("coder", MSGS, 5)
        assert c.text == "" and "timed out" in c.error.lower(), c.error
    finally:
        server.shutdown()
        server.server_close()


def test_http_retry_then_success():
    server = faulty(lambda h, n: h.connection.close() if n == 1 else reply(h, 200, GOOD))
    try:
        c = HTTPBackend(server.url, model="m", retries=2, backoff_s=0.01).chat("coder", MSGS, 5)
        assert c.error is None and c.text == "fine" and c.prompt_tokens == 4 and len(server.hits) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_http_connection_refused():
    server = faulty(lambda h, n: None)
    url = server.url
    server.shutdown()
    server.server_close()
    c = HTTPBackend(url, model="m", retries=1, backoff_s=0.01, timeout=2).chat("coder", MSGS, 5)
    assert c.text == "" and c.finish_reason == "error" and "refused" in c.error.lower(), c.error


# --- mcl eval --backend http, end to end -------------------------------------------------------------

def test_mcl_eval_over_http_end_to_end(tmp_path, monkeypatch):
    """`mcl eval --backend http` against a local server whose backend answers every role well; the
    benchmark and the sandbox are stand-ins here (the real ones: test_mcl_eval_humaneval_over_http)."""
    import eval.run
    from engine.cli import main
    from agent_fixtures import HE, GOOD_FN
    import agents_fakes as tm

    def answer(role, step, user):
        return {"retrieve": tm.retrieval(2), "plan": "1. Keep a running balance.",
                "verify": "<root><confidence>88</confidence></root>",
                "code": f"```python\nfrom typing import List\n{GOOD_FN}  # PASS\n```"}[step]

    backend = tm.ScriptedBackend(answer)
    server = serve(backend)
    tm.fake_run_tests.calls = []
    monkeypatch.setattr(eval.run, "load_benchmark", lambda name, data=None, limit=None: [HE] * (limit or 1))
    monkeypatch.setitem(sys.modules, "eval.harness", types.SimpleNamespace(run_tests=tm.fake_run_tests))
    try:
        with pytest.raises(SystemExit) as e:
            main(["eval", "--backend", "http", "--url", server.url, "--adapters", "roles", "--benchmark", "humaneval",
                  "--limit", "3", "-k", "2", "-t", "1", "--concurrency", "3", "--out", str(tmp_path)])
        assert e.value.code == 0
    finally:
        server.shutdown()
        server.server_close()
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n"] == 3 and s["pass_at_1"] == 1.0 and s["strategy"] == "mapcoder"
    assert s["calls"] == {"retriever": 3, "planner": 12, "coder": 3, "debugger": 0}
    assert sum(s["format_failures"].values()) == 0 and s["backend_errors"] == 0
    assert s["tokens"]["retriever"]["prompt"] > 0
    assert {r for r, _, _ in backend.log} == {"retriever", "planner", "coder"}   # --adapters: role = model name


def _have_real_eval():
    """The real loader, sandbox and data (other parts of the project; absent data -> skip)."""
    try:
        import eval.harness  # noqa: F401
        from eval.benchmarks import load
        return len(load("humaneval", limit=1)) == 1
    except (ImportError, FileNotFoundError):
        return False


@pytest.mark.skipif(not _have_real_eval(), reason="needs eval.harness, eval.benchmarks.humaneval and ../shared/data")
def test_mcl_eval_humaneval_over_http(tmp_path):
    """Real benchmark loader and sandbox: an oracle server that answers the coder with the canonical
    solution (and the other roles well) must score pass@1 = 1; a server that answers garbage, 0."""
    from engine.cli import main
    from eval.run import load_benchmark
    problems = load_benchmark("humaneval", limit=3)
    refs = {p.entry_point: p for p in problems}

    def oracle(role, step, user):
        import agents_fakes as tm
        if step in ("code", "direct", "cot", "debug"):
            p = next(p for ep, p in refs.items() if f"def {ep}(" in user)
            body = p.reference if p.reference.lstrip().startswith(("def ", "import ", "from ")) else \
                p.starter_code + p.reference
            return f"```python\n{body}\n```"
        return {"retrieve": tm.retrieval(1), "plan": "1. Do what the docstring says.",
                "verify": "<confidence>99</confidence>"}[step]

    import agents_fakes as tm
    for answer, want in [(oracle, 1.0), (lambda *a: "I cannot help with that.", 0.0)]:
        server = serve(tm.ScriptedBackend(answer))
        out = tmp_path / str(want)
        try:
            with pytest.raises(SystemExit):
                main(["eval", "--backend", "http", "--url", server.url, "--adapters", "roles", "--benchmark",
                      "humaneval", "--limit", "3", "-k", "1", "-t", "1", "--out", str(out)])
        finally:
            server.shutdown()
            server.server_close()
        s = json.loads((out / "summary.json").read_text())
        assert s["n"] == 3 and s["pass_at_1"] == want, s
        if want == 1.0:
            assert sum(s["format_failures"].values()) == 0 and s["solved_samples"] == 3, s
