"""The agents' prompts: MapCoder's four roles (retriever, planner, coder, debugger) plus the Direct and
chain-of-thought baselines. Each builder takes a `Problem` (engine/agents/problem.py) and returns a chat list
[{"role": "system"|"user", "content": ...}] for `backend.chat(role, messages, ...)`.

    from engine.agents import prompts
    msgs = prompts.retriever(problem, k=2)
    msgs = prompts.planner(problem, example, algorithm)       # plan from one recalled example
    msgs = prompts.verifier(problem, plan)                     # the planner's confidence call (XML)
    msgs = prompts.coder(problem, plan, algorithm)
    msgs = prompts.debugger(problem, plan, code, report, algorithm)
    msgs = prompts.direct(problem); msgs = prompts.cot(problem)

The structure follows MapCoder (Islam et al., 2024): the retriever recalls k similar problems and the
algorithm behind them in XML; the planner writes one plan per recalled example and a second call scores
it (0-100, XML); the coder answers with one ```python block; the debugger sees the failing sample tests
and answers with a revised plan and one code block. The wording is ours. Output formats here and the
parsers in engine/agents/parsers.py must change together.
"""
from __future__ import annotations

import json

from engine.agents.problem import Problem, Test, TestReport
from engine.roles import ROLES

_SYSTEM = {
    "retriever": "You are the retriever in a team of coding agents. You recall programming problems similar "
                 "to a given one and name the algorithm that solves it. You answer in the XML format you are "
                 "asked for and write nothing outside it.",
    "planner": "You are the planner in a team of coding agents. You write short, concrete, step-by-step plans "
               "for programming problems and judge whether a plan is correct.",
    "coder": "You are the coder in a team of coding agents. You turn a plan into a correct, complete Python 3 "
             "program. You answer with one ```python code block.",
    "debugger": "You are the debugger in a team of coding agents. You find why a Python program fails its "
                "tests, fix the plan, and rewrite the program. You answer with the revised plan and then "
                "one ```python code block.",
}

_MAX_FIELD = 1500          # characters of one test's input/expected/got shown to a model


def _msgs(role: str, user: str) -> list[dict]:
    return [{"role": "system", "content": _SYSTEM[role]}, {"role": "user", "content": user.strip() + "\n"}]


def _clip(s, n: int = _MAX_FIELD) -> str:
    s = s if isinstance(s, str) else json.dumps(s) if _jsonable(s) else repr(s)
    return s if len(s) <= n else s[: n // 2] + f"\n... [{len(s) - n} characters cut] ...\n" + s[-n // 2:]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def problem_text(p: Problem) -> str:
    """The statement the agents read: the description, plus the starter code when it is not already in it."""
    text = p.description.strip()
    if p.starter_code.strip() and p.starter_code.strip() not in text:
        text += f"\n\nStarter code:\n```python\n{p.starter_code.rstrip()}\n```"
    return text


def io_rules(p: Problem) -> str:
    """How the program talks to the tests, in words that are the same for every problem of a kind (a function
    to complete, or stdin/stdout), so that they can sit in the constant head of a prompt."""
    if p.entry_point:
        return ("Write the function named under \"# Function to write\", with the signature given in the problem "
                "or called as in the sample tests, plus any imports and helpers it needs. Do not read input and "
                "do not print.")
    return ("Read the input from standard input and print the answer to standard output in exactly the format "
            "the problem asks for. Print nothing else.")


def entry_point_text(p: Problem) -> str:
    """The problem-specific half of the I/O rules: the function's name (empty for stdin/stdout problems)."""
    return f"# Function to write\n`{p.entry_point}`" if p.entry_point else ""


def answer_cue(p: Problem, what: str) -> str:
    """The closing line of a code-writing prompt: what to answer with, and the function's name again. It comes after
    every problem-specific part (so it costs the prefix cache nothing) and right before the answer, where a small
    model still reads it: with the name only in the middle of the prompt, models wrote a function of another name."""
    return f"Answer now: {what}" + (f", defining `{p.entry_point}`." if p.entry_point else ".")


def format_test(p: Problem, t: Test) -> str:
    if t.kind == "stdio":
        return f"Input:\n{_clip(t.input)}\nExpected output:\n{_clip(t.expected)}"
    if t.kind == "call":
        args = ", ".join(_clip(a, 300) for a in (t.input if isinstance(t.input, (list, tuple)) else [t.input]))
        return f"{p.entry_point}({args}) == {_clip(t.expected)}"
    return _clip(t.code.strip())                               # assert / check: the test code itself


def format_tests(p: Problem, tests: list[Test]) -> str:
    return "\n\n".join(format_test(p, t) for t in tests) or "(no sample tests)"


def format_report(p: Problem, report: TestReport, max_failures: int = 3) -> str:
    """The failing sample tests, as the debugger sees them: verdict, input, expected, got, stderr tail."""
    fails = report.failures()
    if not fails:
        return f"Verdict: {report.verdict} (no per-test detail)"
    out = [f"{len(fails)} of {len(report.results)} sample tests failed."]
    calls = bool(p.entry_point) and any(t.kind == "call" for t in p.sample_tests)
    for i, r in enumerate(fails[:max_failures], 1):
        lines = [f"Test {i}: {r.verdict}"]
        if r.input is not None and calls and isinstance(r.input, (list, tuple)):
            lines.append(f"Call:\n{p.entry_point}({', '.join(_clip(a, 300) for a in r.input)})")
        elif isinstance(r.input, str) and r.input.lstrip().startswith(("assert", "check(")):
            lines.append(f"Test:\n{_clip(r.input)}")
        elif r.input is not None:
            lines.append(f"Input:\n{_clip(r.input)}")
        if r.expected is not None:
            lines.append(f"Expected:\n{_clip(r.expected)}")
        if r.got is not None:
            lines.append(f"Got:\n{_clip(r.got)}")
        if r.stderr.strip():
            lines.append(f"Error:\n{_clip(r.stderr.strip()[-800:], 800)}")
        out.append("\n".join(lines))
    if len(fails) > max_failures:
        out.append(f"({len(fails) - max_failures} more failing tests not shown)")
    return "\n\n".join(out)


# --- MapCoder roles --------------------------------------------------------------------------
# Layout: every prompt opens with the role's constant instructions and output format, then the problem and
# what earlier agents wrote. The scheduler's prefix cache (engine/serving/scheduler.py) reuses the longest token prefix
# that an earlier request shares, so text that is the same for every problem belongs first.

def _prompt(role: str, head: str, parts: list[str], tail: str) -> list[dict]:
    """head (constant for the role), the problem-specific parts (empty ones dropped), a constant closing cue."""
    return _msgs(role, "\n\n".join([head.strip(), *(x.strip() for x in parts if x.strip()), tail.strip()]))


def retriever(p: Problem, k: int) -> list[dict]:
    head = f"""
Recall {k} programming problems that are relevant to the problem given at the end but different from it.
Then name the algorithm that the given problem needs and explain it in a short tutorial.

# For each recalled problem write
1. a short description of the problem,
2. Python 3 code that solves it,
3. a step-by-step plan for solving it.

# Then write the algorithm
Name the algorithm or technique the given problem needs (for example brute force, greedy, dynamic programming,
binary search, two pointers, sorting, hashing, graph search, recursion, math) and write a short, general
tutorial on it: when it applies and the steps to use it. No code in the tutorial.

# Output format
Answer with this XML and nothing outside the <root> element:
<root>
<problem>
<description>the recalled problem</description>
<code>Python code that solves it</code>
<planning>numbered steps that solve it</planning>
</problem>
... ({k} <problem> elements in all) ...
<algorithm>the algorithm's name and the tutorial</algorithm>
</root>"""
    return _prompt("retriever", head, [f"# Problem\n{problem_text(p)}"], "Answer now, in the XML format above.")


def planner(p: Problem, example, algorithm: str) -> list[dict]:
    """`example` is a parsers.Example (description, code, planning) or None when retrieval failed."""
    head = ("Write a concrete plan for solving the problem given under \"# Problem to solve\". Write only the "
            "plan, as numbered steps. No code and no other text.")
    parts = []
    if example is not None:
        parts.append(f"# A similar problem\n{example.description.strip()}")
        if example.planning.strip():
            parts.append(f"# Its plan\n{example.planning.strip()}")
    if algorithm.strip():
        parts.append(f"# Relevant algorithm\n{algorithm.strip()}")
    parts += [f"# Problem to solve\n{problem_text(p)}", f"# Sample tests\n{format_tests(p, p.sample_tests)}"]
    return _prompt("planner", head, parts, "# Your answer\nThe plan, as numbered steps.")


def verifier(p: Problem, plan: str) -> list[dict]:
    head = """
Below are a programming problem and a plan for solving it in Python 3. Decide whether the plan is correct,
that is, whether code that follows it would pass every test of the problem.

# Output format
Answer with this XML and nothing else:
<root>
<explanation>why the plan does or does not solve the problem</explanation>
<confidence>an integer from 0 to 100: how sure you are that the plan is correct</confidence>
</root>"""
    return _prompt("planner", head, [f"# Problem\n{problem_text(p)}", f"# Plan\n{plan.strip()}"],
                   "Answer now, in the XML format above.")


def coder(p: Problem, plan: str, algorithm: str) -> list[dict]:
    head = (f"Write Python 3 code that solves the problem below by following the plan.\n\n# Rules\n{io_rules(p)}\n"
            f"Answer with exactly one ```python code block that holds the whole program, and no other text.")
    parts = [f"# Relevant algorithm\n{algorithm.strip()}" if algorithm.strip() else "",
             f"# Problem\n{problem_text(p)}", entry_point_text(p),
             f"# Plan\n{plan.strip() or '(no plan: solve the problem directly)'}",
             f"# Sample tests\n{format_tests(p, p.sample_tests)}"]
    return _prompt("coder", head, parts, answer_cue(p, "one ```python code block"))


def debugger(p: Problem, plan: str, code: str, report: TestReport, algorithm: str) -> list[dict]:
    head = ("Your Python 3 program for the problem below fails some of its sample tests. Find the mistake, "
            f"revise the plan, and fix the program.\n\n# Rules\n{io_rules(p)}\nFirst write the revised plan as "
            "numbered steps. Then write exactly one ```python code block that holds the whole corrected program.")
    parts = [f"# Relevant algorithm\n{algorithm.strip()}" if algorithm.strip() else "",
             f"# Problem\n{problem_text(p)}", entry_point_text(p),
             f"# Plan\n{plan.strip() or '(none)'}",
             f"# Program\n```python\n{code.rstrip() or '# (no code was found in the previous answer)'}\n```",
             f"# Test report\n{format_report(p, report)}"]
    return _prompt("debugger", head, parts, answer_cue(p, "the revised plan, then one ```python code block"))


# --- baselines (tagged with the coder role) -------------------------------------------------

def direct(p: Problem) -> list[dict]:
    head = (f"Write Python 3 code that solves the problem below. {io_rules(p)}\n"
            f"Answer with exactly one ```python code block and no other text.")
    return _prompt("coder", head, [f"# Problem\n{problem_text(p)}", entry_point_text(p)],
                   answer_cue(p, "one ```python code block"))


def cot(p: Problem) -> list[dict]:
    head = (f"Solve the problem below in Python 3. {io_rules(p)}\nThink step by step: first explain briefly how "
            f"to solve it, then give the whole program in exactly one ```python code block.")
    return _prompt("coder", head, [f"# Problem\n{problem_text(p)}", entry_point_text(p)],
                   answer_cue(p, "the explanation, then one ```python code block"))
