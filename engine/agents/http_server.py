"""A tiny OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models) in front of a backend.
Loopback only. Used by the tests and by `mcl eval --backend http` against the local engine.

    python -m engine.agents.http_server --model smollm2-135m --adapters runs/adapters --port 8000
    mcl eval --backend http --url http://127.0.0.1:8000 --benchmark humaneval --out runs/eval_http

    server = serve(backend)                 # in-process: port 0 picks a free port
    server.url                              # 'http://127.0.0.1:PORT'
    server.shutdown(); server.server_close()

The request's `model` picks the role when it is a role name (retriever, planner, coder, debugger:
the convention of servers that expose LoRA adapters as models); any other name means "coder".
Each request is handled in its own thread, so concurrent clients reach the backend concurrently. A client
that hangs up before its answer is complete has its request cancelled in the scheduler (LocalBackend's `gone`
hook; other backends run to the end), so an abandoned call does not hold a KV slot until its token limit.
"""
from __future__ import annotations

import argparse
import inspect
import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from engine.agents.prompts import ROLES

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def make_handler(backend):
    takes_gone = _takes_gone(backend)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):           # quiet: the eval has its own progress bar
            pass

        def _send(self, code: int, obj: dict):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _client_gone(self) -> bool:
            """True once the client closed its end: the socket reads as ready and a peek returns no bytes."""
            try:
                ready, _, _ = select.select([self.connection], [], [], 0)
                return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": r, "object": "model"} for r in ROLES]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                messages = req["messages"]
                if not isinstance(messages, list):
                    raise TypeError("messages must be a list")
            except (ValueError, KeyError, TypeError) as e:
                return self._send(400, {"error": {"message": f"bad request: {type(e).__name__}: {e}"}})
            model = str(req.get("model") or "")
            role = model if model in ROLES else "coder"
            stop = req.get("stop")
            args = (role, messages, int(req.get("max_tokens") or 512), float(req.get("temperature") or 0.0),
                    [stop] if isinstance(stop, str) else stop)
            try:
                c = backend.chat(*args, gone=self._client_gone) if takes_gone else backend.chat(*args)
            except Exception as e:                      # noqa: BLE001 -- report it to the client, keep serving
                return self._send(500, {"error": {"message": f"backend failed: {type(e).__name__}: {e}"}})
            if c.finish_reason == "cancelled":
                return None                             # the client is gone: nobody to answer
            if c.error:
                return self._send(502, {"error": {"message": c.error}})
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": model or role,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason}],
                "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                          "total_tokens": c.prompt_tokens + c.completion_tokens},
            })

    return Handler


def _takes_gone(backend) -> bool:
    """Whether backend.chat accepts the `gone` hook (LocalBackend does; HTTP and test backends need not)."""
    try:
        return "gone" in inspect.signature(backend.chat).parameters
    except (TypeError, ValueError):
        return False


def serve(backend, host: str = "127.0.0.1", port: int = 0, handler=None) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; returns the server (`.url` added). `handler` overrides the
    request handler class (the tests use it to misbehave)."""
    if host not in LOOPBACK:
        raise ValueError(f"http_server binds loopback only ({', '.join(LOOPBACK)}), not {host!r}")
    server = ThreadingHTTPServer((host, port), handler or make_handler(backend))
    server.daemon_threads = True
    server.url = f"http://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="mcl-http",
                     daemon=True).start()
    return server


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "q4"], help="CPU weights (engine/quant.py)")
    ap.add_argument("--adapters", default=None, help="directory of PEFT adapters, one subdirectory per role")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args(argv)
    from engine.agents.backends import open_local
    backend = open_local(a.model, a.device, a.dtype, a.adapters, n_slots=a.slots, weights=a.weights)
    server = serve(backend, a.host, a.port)
    print(f"serving {a.model} at {server.url}/v1/chat/completions (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        backend.close()


if __name__ == "__main__":
    main()
