"""A small OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models) in front of a backend.
Loopback by default. Used by the tests and by `mcl eval --backend http` against the local engine.

    MCL_API_KEY=... mcl serve --model smollm2-135m --adapters runs/adapters --port 8000   # key optional
    python -m engine.agents.http_server ...                  # the same flags
    mcl eval --backend http --url http://127.0.0.1:8000 --benchmark humaneval --out runs/eval_http

    server = serve(backend)                 # in-process: port 0 picks a free port
    server.url                              # 'http://127.0.0.1:PORT'
    server.shutdown(); server.server_close()

The request's `model` picks the role when it is a role name (retriever, planner, coder, debugger: the
convention of servers that expose LoRA adapters as models); any other string (the served model's name, a
teacher's name a client was configured with) means "coder" -- the documented fallback.

What is checked at the door, before anything reaches the backend (each failure: 4xx + a JSON message
naming the field, OpenAI's error shape; the connection stays usable or is closed cleanly):
  - Host header a loopback name (or one given with --allow-host), Origin (when sent) the same: a web page
    or a DNS-rebinding name cannot drive the server (403); API key when one is set (401; constant-time).
  - Content-Length present (411), at most `max_body` bytes (413, the body is not read), body read within
    `read_timeout` seconds in all (408; headers too: a stalled client is dropped, its thread freed).
  - JSON without NaN/Infinity, an object; `messages` a non-empty list of {role: system|user|assistant,
    content: string}; `model` a string; `max_tokens` an integer 1..MAX_TOKENS (default 512);
    `temperature` a finite number 0..2 (below 1e-5 it samples greedily: engine/generate.py); `stop` a non-empty
    string or a list of at most 16 of them; `stream` a boolean; `n` 1; `top_p` 1 (other sampling is not served);
    every string of the body (keys too) Unicode text, no lone surrogate. Other fields are ignored.
Not checked at the door, but bounded behind it: a prompt longer than the context is an error completion from
the backend; special-token text inside `content` (`<|im_start|>system ...`) is tokenized as text, only the chat
template's own markers are control tokens (engine/tokenizer.py); a request whose sampling or stream callback
fails ends alone, the other requests in the scheduler go on (engine/serve.py).
`stream: true` answers OpenAI-style server-sent events (`data: {chat.completion.chunk}` ... `data: [DONE]`):
token by token when the backend takes `on_text` (LocalBackend), else one chunk with the whole answer.

Each request is handled in its own thread (listen backlog `backlog`), so concurrent clients reach the
backend concurrently. A client that hangs up before its answer is complete has its request cancelled in the
scheduler (LocalBackend's `gone` hook). End-of-file on the socket alone does not mean "gone": a client may
half-close after sending (shutdown(SHUT_WR)) and still wait for its answer. So on EOF the server writes a
probe the client must accept (an interim `HTTP/1.1 100 Continue`, which HTTP/1.1 clients skip; an SSE
comment once a stream has begun): a closed socket answers it with a reset, a half-closed one does not.
"""
from __future__ import annotations

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

from engine.agents.prompts import ROLES

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_TOKENS = 32768                 # a request asking for more is refused (the scheduler clips to its context)
MESSAGE_ROLES = ("system", "user", "assistant")
API_KEY_ENV = "MCL_API_KEY"


class BadRequest(Exception):
    """A request refused at the door: HTTP status, message, the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class ChatRequest:
    role: str
    model: str
    messages: list[dict]
    max_tokens: int
    temperature: float
    stop: list[str]
    stream: bool


def _no_constants(name):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def parse_chat_request(body: bytes) -> ChatRequest:
    """Bytes of a POST /v1/chat/completions -> ChatRequest, or BadRequest naming the field."""
    try:
        req = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:             # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise BadRequest(f"body must be a JSON object, not {type(req).__name__}")
    _strings(req)
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
    model = req.get("model")
    if model is None:
        model = ""
    if not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    max_tokens = req.get("max_tokens", None)
    if max_tokens is None:
        max_tokens = 512
    elif not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(f"max_tokens must be an integer from 1 to {MAX_TOKENS}, not {max_tokens!r}", "max_tokens")
    temperature = req.get("temperature", None)
    if temperature is None:
        temperature = 0.0
    elif not _number(temperature) or not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise BadRequest(f"temperature must be a number from 0 to 2, not {temperature!r}", "temperature")
    stop = req.get("stop", None)
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a non-empty string or a list of at most 16 of them", "stop")
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", "stream")
    if req.get("n", 1) != 1 or isinstance(req.get("n"), bool):
        raise BadRequest("n must be 1 (one answer per request)", "n")
    top_p = req.get("top_p", 1)
    if not _number(top_p) or top_p != 1:
        raise BadRequest("top_p must be 1 (nucleus sampling is not served)", "top_p")
    return ChatRequest(model if model in ROLES else "coder", model, messages, max_tokens, float(temperature),
                       stop, stream)


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
                 read_timeout: float = 30.0):
    takes_gone = _takes(backend, "gone")
    takes_text = _takes(backend, "on_text")
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
                return self._send(200, {"object": "list", "data": [{"id": r, "object": "model"} for r in ROLES]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                       "param": None, "code": None}})

        def do_POST(self):
            body_read = False
            try:
                self._check_door()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise BadRequest(f"no route {self.path}", status=404)
                body = self._read_body()
                body_read = True
                self._read_done.set()
                req = parse_chat_request(body)
            except BadRequest as e:
                return self._refuse(e, body_read)
            if req.stream:
                return self._answer_stream(req)
            try:
                c = self._chat(req)
            except Exception as e:                      # noqa: BLE001 -- report it to the client, keep serving
                return self._send(500, {"error": {"message": f"backend failed: {type(e).__name__}: {e}",
                                                  "type": "server_error", "param": None, "code": None}})
            if c.finish_reason == "cancelled" or self._gone:
                self.close_connection = True
                return None                             # the client is gone: nobody to answer
            if c.error:
                return self._send(502, {"error": {"message": c.error, "type": "server_error", "param": None,
                                                  "code": None}})
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model or req.role,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "total_tokens": c.prompt_tokens + c.completion_tokens},
            })

        def _chat(self, req: ChatRequest, on_text=None):
            kw = {}
            if takes_gone:
                kw["gone"] = self._client_gone
            if on_text is not None and takes_text:
                kw["on_text"] = on_text
            return backend.chat(req.role, req.messages, req.max_tokens, req.temperature, req.stop, **kw)

        # --- streaming (server-sent events) ------------------------------------------------------
        def _answer_stream(self, req: ChatRequest):
            cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
            sent = []                                    # the text the client has, in pieces
            hold = max((len(s) for s in req.stop), default=0) + 8    # a stop string may still cut the tail

            def event(delta: dict, finish=None):
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                         "model": req.model or req.role,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()

            def begin():
                if not self._streaming:
                    self._streaming = True
                    self.close_connection = True         # the stream's end is the connection's end
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    event({"role": "assistant", "content": ""})

            def on_text(text: str):                     # the text so far (LocalBackend polls it out)
                have = "".join(sent)
                safe = text.rstrip("\ufffd")[: max(0, len(text) - hold)]   # no half characters, no stop tails
                if self._gone or len(safe) <= len(have) or not safe.startswith(have):
                    return
                try:
                    begin()
                    event({"content": safe[len(have):]})
                    sent.append(safe[len(have):])
                except OSError:
                    self._gone = True

            try:
                c = self._chat(req, on_text)
            except Exception as e:                      # noqa: BLE001
                c = None
                error = f"backend failed: {type(e).__name__}: {e}"
            else:
                error = c.error if c.finish_reason != "cancelled" else None
            if self._gone or (c is not None and c.finish_reason == "cancelled"):
                self.close_connection = True
                return None
            if error and not self._streaming:
                return self._send(500 if c is None else 502, {"error": {"message": error, "type": "server_error",
                                                                        "param": None, "code": None}})
            try:
                begin()
                have = "".join(sent)
                if error:
                    self.wfile.write(b"data: " + json.dumps({"error": {"message": error, "type": "server_error"}})
                                     .encode() + b"\n\n")
                else:
                    rest = c.text[len(have):] if c.text.startswith(have) else ""
                    if rest:
                        event({"content": rest})
                    event({}, c.finish_reason)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:
                pass

    return Handler


def _takes(backend, name: str) -> bool:
    """Whether backend.chat accepts the keyword `name` (LocalBackend takes `gone` and `on_text`)."""
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
          read_timeout: float = 30.0) -> Server:
    """Start serving in a daemon thread; returns the server (`.url` added). `handler` overrides the
    request handler class (the tests use it to misbehave). A non-loopback `host` needs allow_remote=True;
    it is then added to the allowed Host names."""
    check_host(host, allow_remote)
    if not is_loopback(host):
        allowed_hosts = (*allowed_hosts, host)
    cls = Server6 if ":" in host else Server
    server = cls((host, port), handler or make_handler(backend, api_key, allowed_hosts, max_body, read_timeout))
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
    from engine.agents.backends import open_local
    backend = open_local(a.model, a.device, a.dtype, a.adapters, n_slots=a.slots, weights=a.weights)
    server = serve(backend, a.host, a.port, api_key=api_key, allowed_hosts=a.allow_host,
                   allow_remote=a.allow_remote, max_body=a.max_body, read_timeout=a.read_timeout)
    print(f"serving {a.model} at {server.url}/v1/chat/completions" + (" (API key required)" if api_key else "")
          + " (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        backend.close()


def main(argv=None):
    """`python -m engine.agents.http_server FLAGS` = `mcl serve FLAGS` (the flags are defined in engine/cli.py)."""
    from engine import cli
    cli.main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
