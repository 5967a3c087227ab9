"""Fakes for the agent tests: a scripted backend that answers by role and step, a sandbox stand-in, and
builders for well-formed answers.

    from agents_fakes import ScriptedBackend, fake_run_tests, retrieval, code
"""
import re
import threading

import engine.agents.problem as ev
from engine.serving.backend import Completion


def step_of(role, user):
    if role == "retriever":
        return "retrieve"
    if role == "planner":
        return "verify" if "Decide whether the plan is correct" in user else "plan"
    if role == "debugger":
        return "debug"
    if "by following the plan" in user:
        return "code"
    return "cot" if "Think step by step" in user else "direct"


class ScriptedBackend:
    """answer(role, step, user_text) -> str or Completion. Every call is logged (thread-safe)."""

    def __init__(self, answer):
        self.answer, self.log, self.lock = answer, [], threading.Lock()

    def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        user = messages[-1]["content"]
        step = step_of(role, user)
        with self.lock:
            self.log.append((role, step, user))
        out = self.answer(role, step, user)
        if isinstance(out, Completion):
            return out
        return Completion(out, prompt_tokens=len(user.split()), completion_tokens=len(out.split()), wall_s=0.001)


def fake_run_tests(problem, code, tests):
    """Programs say how they fare: `# PASS` passes every test, `# HALF` only the first, else none."""
    fake_run_tests.calls.append(code)
    n_ok = len(tests) if "# PASS" in code else (1 if "# HALF" in code else 0)
    results = [ev.TestResult("pass" if i < n_ok else "wrong_answer", input=None, expected=i, got=-1)
               for i in range(len(tests))]
    return ev.TestReport("pass" if n_ok == len(tests) else "wrong_answer", results)


fake_run_tests.calls = []


def retrieval(n):
    return "<root>\n" + "".join(
        f"<problem><description>EX{i} similar problem</description><code>def g{i}(): pass</code>"
        f"<planning>plan of EX{i}</planning></problem>\n" for i in range(n)) + \
        "<algorithm>Simulation.</algorithm>\n</root>"


def code(tag, body="return x"):
    return f"```python\ndef f(x):\n    # {tag}\n    {body}\n```"


def example_of(user):
    m = re.search(r"EX(\d)", user)
    return int(m.group(1)) if m else -1
