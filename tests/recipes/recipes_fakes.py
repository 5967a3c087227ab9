"""Stand-ins for the recipe tests: a scripted teacher/supervisor, an in-process test runner (trusted code
only), four tiny problems, a tiny random-weight model behind the real LocalBackend + Scheduler, and an HTTP
server that misbehaves on purpose.

    from recipes_fakes import PROBLEMS, FakeTeacher, run_tests_inprocess, tiny_local_backend
"""
from __future__ import annotations

import json
import re
import time
import zlib
from http.server import BaseHTTPRequestHandler

from engine.agents.problem import Problem, Test, TestReport, TestResult
from engine.serving.backend import Completion


def _problem(name, op_doc, samples, hidden):
    starter = f"def {name}(a, b):\n    \"\"\"{op_doc}\"\"\"\n"
    return Problem(id=f"fake/{name}", benchmark="fake", description=f"Write a function {name}(a, b) that {op_doc}",
                   entry_point=name, starter_code=starter,
                   sample_tests=[Test("assert", code=c) for c in samples],
                   hidden_tests=[Test("assert", code=c) for c in hidden])


PROBLEMS = [
    # coder right at once
    _problem("add", "returns a + b.", ["assert add(1, 2) == 3"], ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    # coder wrong, the debugger fixes it
    _problem("sub", "returns a - b.", ["assert sub(3, 1) == 2"], ["assert sub(3, 1) == 2", "assert sub(0, 4) == -4"]),
    # coder and debugger wrong: a failed trajectory; the supervisor blames the coder
    _problem("mul", "returns a * b.", ["assert mul(2, 3) == 6"], ["assert mul(2, 3) == 6", "assert mul(0, 5) == 0"]),
    # passes the sample test with floor division, fails the hidden one; the supervisor blames the planner
    _problem("div", "returns the quotient of a and b.", ["assert div(4, 2) == 2"],
             ["assert div(4, 2) == 2", "assert div(1, 2) == 0.5"]),
]

RETRIEVAL = """<root>
<problem>
<description>Return the sum of a list.</description>
<code>def total(xs):
    return sum(xs)</code>
<planning>1. Sum the list.</planning>
</problem>
<algorithm>Arithmetic: apply the operator the statement names.</algorithm>
</root>"""

PROGRAMS = {   # problem -> (coder's first program body, debugger's program body, program after coder feedback)
    "add": ("a + b", "a + b", "a + b"),
    "sub": ("a + b", "a - b", "a - b"),
    "mul": ("a + b", "a + b", "a * b"),
    "div": ("a // b", "a // b", "a // b"),
}
VERDICTS = {
    "mul": "<root>\n<agent>coder</agent>\n<feedback>The program adds; it must multiply a and b.</feedback>\n</root>",
    "div": "The planner is at fault: the plan uses floor division. Feedback: use true division a / b.",
}


def _which(messages) -> str:
    text = "\n".join(m["content"] for m in messages)
    return next(n for n in PROGRAMS if f"{n}(a, b)" in text)


class FakeTeacher:
    """Scripted answers by role and problem (see PROGRAMS / VERDICTS). `bad_roles` answer garbage."""

    def __init__(self, bad_roles=()):
        self.bad_roles = set(bad_roles)
        self.log = []                                   # (role, messages)

    def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
        self.log.append((role, messages))
        name, last = _which(messages), messages[-1]["content"]
        feedback = "A reviewer checked your answer" in last
        if role in self.bad_roles:
            text = "" if role != "supervisor" else "I am not sure. Maybe?"
        elif role == "retriever":
            text = RETRIEVAL
        elif role == "planner" and "<confidence>" in last:
            text = "<root>\n<explanation>It follows the statement.</explanation>\n<confidence>90</confidence>\n</root>"
        elif role == "planner":
            text = "1. Use true division a / b.\n2. Return it." if feedback else f"1. Compute the result of {name}.\n2. Return it."
        elif role == "coder":
            body = PROGRAMS[name][2] if feedback else "a / b" if "true division" in last else PROGRAMS[name][0]
            text = f"```python\ndef {name}(a, b):\n    return {body}\n```"
        elif role == "debugger":
            text = f"1. Fix the operator.\n```python\ndef {name}(a, b):\n    return {PROGRAMS[name][1]}\n```"
        elif role == "supervisor":
            text = VERDICTS.get(name, "<root><agent>coder</agent><feedback>Check the operator.</feedback></root>")
        else:
            raise AssertionError(role)
        n_in = sum(len(m["content"].split()) for m in messages)
        return Completion(text, n_in, len(text.split()), 0.001)


def run_tests_inprocess(problem, code, tests) -> TestReport:
    """The harness's contract without the sandbox: trusted test code only."""
    results = []
    for t in tests:
        env = {}
        try:
            exec(problem.setup_code + "\n" + code, env)
            exec(t.code, env)
            results.append(TestResult("pass"))
        except AssertionError as e:
            results.append(TestResult("wrong_answer", input=t.code, got=str(e)))
        except Exception as e:                          # noqa: BLE001
            results.append(TestResult("runtime_error", input=t.code, stderr=repr(e)))
    return TestReport(next((r.verdict for r in results if r.verdict != "pass"), "pass"), results)


# --- the real LocalBackend + Scheduler on a tiny random model ------------------------------------------------

class WordTokenizer:
    """Words -> ids 1..255 by crc32 (0 is end of sequence); ids -> letters. Enough for the scheduler."""
    eos_ids = {0}

    def apply_chat_template(self, messages, add_generation_prompt=False):
        words = " ".join(f"<{m['role']}> {m['content']}" for m in messages).split()
        return [1 + zlib.crc32(w.encode()) % 255 for w in words] + ([1] if add_generation_prompt else [])

    def decode(self, ids, skip_special=True):
        return "".join(" " if i % 7 == 0 else chr(97 + i % 26) for i in ids)


def tiny_local_backend(n_slots=4, seed=3):
    from engine.config import PRESETS
    from engine.model import Transformer
    from engine.serving.backend import LocalBackend
    from engine.serving.scheduler import Scheduler
    model = Transformer(PRESETS["tiny"].replace(max_seq_len=1024)).init_weights(seed=seed, std=0.2).eval()
    sched = Scheduler(model, WordTokenizer(), n_slots=n_slots, max_len=1024)
    sched.start()
    return LocalBackend(sched, WordTokenizer())


# --- an OpenAI-compatible server that misbehaves -------------------------------------------------------------

def misbehaving_handler(modes, good=None, sleep_s=1.0):
    """Request n gets modes[n % len(modes)]: ok (answer from `good`, a backend), garbage (200, not JSON),
    nojson (200, JSON without choices), timeout (sleeps past the client's timeout), drop (closes the socket
    without an answer), 500."""
    counter = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            mode = modes[counter["n"] % len(modes)]
            counter["n"] += 1
            if mode == "ok":
                role = req["model"] if req["model"] in ("retriever", "planner", "coder", "debugger", "supervisor") \
                    else _role_of(req["messages"])
                c = good.chat(role, req["messages"], req.get("max_tokens", 64))
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": c.text},
                                                         "finish_reason": "stop"}],
                                            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode())
            elif mode == "garbage":
                self._send(200, b"\x00\xffnot json at all <html>")
            elif mode == "nojson":
                self._send(200, b'{"id": "x", "object": "chat.completion"}')
            elif mode == "timeout":
                time.sleep(sleep_s)
                try:                                    # the client gave up long ago
                    self._send(200, b"{}")
                except (BrokenPipeError, ConnectionResetError):
                    pass
            elif mode == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
            else:
                self._send(500, b'{"error": {"message": "boom"}}')

    return Handler


def _role_of(messages) -> str:
    system = messages[0]["content"]
    m = re.search(r"You are the (\w+)", system)
    return m.group(1) if m else "coder"


# --- a tiny student on disk (HF directory) for the main job ---------------------------------------------------

def tiny_hf_dir(path, seed=0, max_seq_len=4096):
    """A random tiny llama as an HF directory (config.json, model.safetensors, tokenizer.json)."""
    from pathlib import Path
    from safetensors.torch import save_file
    from engine.config import PRESETS
    from engine.model import Transformer
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = PRESETS["tiny"].replace(max_seq_len=max_seq_len)
    model = Transformer(cfg).init_weights(seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    from tests.train.tiny_setup import byte_tokenizer     # the same 256-id byte-level tokenizer the trainer tests use
    byte_tokenizer().save(path)
    return path
