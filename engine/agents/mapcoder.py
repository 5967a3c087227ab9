"""The MapCoder control flow for one problem, and the Direct / chain-of-thought baselines.

    from engine.agents.mapcoder import solve
    sol = solve(problem, backend, "mapcoder", k=2, t=2, run_tests=run_tests)   # blocking; many threads at once

`run_tests(problem, code, tests) -> TestReport` is passed in by the caller (eval.harness.run_tests runs the tests
in the sandbox; tests pass a fake): the agents never import eval, which sits above them.
    sol.code, sol.solved_samples, sol.calls, sol.attempts, sol.plans

MapCoder (Islam et al., 2024), as run here:

    retriever:  recall k similar problems (description, code, plan) + the algorithm       1 call
    planner:    per example, a plan for our problem, then a confidence 0-100 (XML)        2 calls each
    order the plans by confidence, highest first (ties keep retrieval order), then for each plan:
      coder:    one program from the plan
      sample tests (run_tests on problem.sample_tests) -> pass: stop, done
      debugger: up to t rounds: failing tests -> revised plan + program -> sample tests -> pass: stop
    no plan passed: the program that passed the most sample tests (the latest among equals)

Deliberate differences from the reference code, each to survive small-model answers instead of crashing:
a retriever answer with no usable example -> one plan written without an example; a plan that is not
parsed -> skipped (no confidence call); a confidence that is not parsed -> 0; no plan at all -> the coder
works from the problem alone; a coder answer without code -> the debugger gets an empty program; a
debugger answer without code -> stop debugging that plan (greedy decoding would repeat it); a problem
without sample tests -> the first program is the answer. The reference also leaves the last debugger
round's program untested; here every program is tested. The final program is scored on the hidden tests
by the caller (eval/run.py), never here.

Every backend call is recorded as a `Call` (role, step, token counts, wall time, parse status, repairs,
the messages and the answer); every sample-test run as an `Attempt`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from engine.agents import parsers, prompts
from engine.agents.parsers import FormatFailure
from engine.agents.problem import Problem, TestReport

STRATEGIES = ("mapcoder", "direct", "cot")


def _from_dict(cls, d: dict, where: str):
    """cls(**d) for a record read back from JSON; an unknown or missing field is a ValueError naming it."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {', '.join(unknown)}; known: {', '.join(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"{where}: {cls.__name__}: {e}") from None


@dataclass
class Call:
    role: str                           # retriever | planner | coder | debugger (the adapter it runs on)
    step: str                           # retrieve | plan | verify | code | debug | direct | cot
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    status: str                         # ok | repaired | failed (format failure) | error (backend error)
    reason: str = ""                    # why it failed / the backend error
    repairs: list[str] = field(default_factory=list)
    finish_reason: str = ""
    plan: int | None = None             # which recalled example / plan this call belongs to
    round: int | None = None            # debug round (1..t)
    messages: list[dict] = field(default_factory=list)
    response: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "call") -> "Call":
        return _from_dict(cls, d, where)


@dataclass
class Attempt:
    """One run of a program on the sample tests."""
    plan: int
    round: int                          # 0 = the coder's program, r = after debug round r
    verdict: str
    passed: int
    total: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "attempt") -> "Attempt":
        return _from_dict(cls, d, where)


@dataclass
class Solution:
    problem_id: str
    strategy: str
    code: str                           # the final program ("" when no call produced code)
    solved_samples: bool = False        # some program passed every sample test
    calls: list[Call] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    plans: list[dict] = field(default_factory=list)    # {"plan", "confidence", "order"} per parsed plan
    algorithm: str = ""
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "solution") -> "Solution":
        d = dict(d)
        d["calls"] = [Call.from_dict(c, where) for c in d.get("calls", [])]
        d["attempts"] = [Attempt.from_dict(a, where) for a in d.get("attempts", [])]
        return _from_dict(cls, d, where)


def budgets(max_new_tokens: int, k: int) -> dict[str, int]:
    """New-token budget per step: max_new_tokens for one piece of work; the retriever writes k examples (code,
    plan) plus a tutorial; the debugger a revised plan and a whole program, like CoT's reasoning + program."""
    return {"retrieve": (k + 1) * max_new_tokens, "plan": max_new_tokens, "verify": max_new_tokens,
            "code": max_new_tokens, "debug": 2 * max_new_tokens, "direct": max_new_tokens,
            "cot": 2 * max_new_tokens}


def _ask(backend, sol: Solution, role: str, step: str, messages: list[dict], max_new_tokens: int, parse,
         temperature: float = 0.0, **where):
    """One role-tagged backend call, parsed and recorded. Returns the parsed value or a FormatFailure."""
    c = backend.chat(role, messages, max_new_tokens=max_new_tokens, temperature=temperature)
    if c.error:
        out = FormatFailure(role, f"backend error: {c.error}")
        status, reason, repairs = "error", c.error, []
    else:
        out = parse(c.text)
        if isinstance(out, FormatFailure):
            status, reason, repairs = "failed", out.reason, []
        else:
            status, reason, repairs = ("repaired" if out.repairs else "ok"), "", list(out.repairs)
    sol.calls.append(Call(role, step, c.prompt_tokens, c.completion_tokens, c.wall_s, status, reason, repairs,
                          c.finish_reason, messages=messages, response=c.text, **where))
    return out


def _code_parser(problem: Problem, role: str):
    if role == "debugger":
        return lambda text: parsers.parse_debugger(text, entry_point=problem.entry_point,
                                                   starter_code=problem.starter_code)
    return lambda text: parsers.parse_code(text, role=role, entry_point=problem.entry_point,
                                           starter_code=problem.starter_code)


def _sample_test(run_tests, problem: Problem, code: str) -> TestReport:
    if not code.strip():
        return TestReport("no_code")
    return run_tests(problem, code, problem.sample_tests)


def mapcoder(problem: Problem, backend, k: int = 2, t: int = 2, run_tests=None, max_new_tokens: int = 384,
             temperature: float = 0.0) -> Solution:
    if run_tests is None:
        raise TypeError("mapcoder needs run_tests(problem, code, tests) -> TestReport for the sample tests "
                        "(eval.harness.run_tests runs them in the sandbox)")
    t0, budget = time.perf_counter(), budgets(max_new_tokens, k)
    sol = Solution(problem.id, "mapcoder", "")

    def ask(role, step, messages, parse, **where):
        return _ask(backend, sol, role, step, messages, budget[step], parse, temperature, **where)

    # 1. Retriever: k recalled examples and the algorithm.
    r = ask("retriever", "retrieve", prompts.retriever(problem, k), lambda x: parsers.parse_retriever(x, k=k))
    examples, sol.algorithm = (r.examples, r.algorithm) if r else ([None], "")

    # 2. Planner: one plan per example, each scored by a second call.
    plans = []                                                   # (confidence, example index, plan text)
    for i, ex in enumerate(examples):
        p = ask("planner", "plan", prompts.planner(problem, ex, sol.algorithm), parsers.parse_plan, plan=i)
        if not p:
            continue
        c = ask("planner", "verify", prompts.verifier(problem, p.text), parsers.parse_confidence, plan=i)
        plans.append((c.score if c else 0, i, p.text))
    plans.sort(key=lambda x: -x[0])                              # stable: ties keep retrieval order
    sol.plans = [{"plan": i, "confidence": conf, "order": n} for n, (conf, i, _) in enumerate(plans)]
    if not plans:
        plans = [(0, -1, "")]                                    # the coder works from the problem alone

    # 3. Coder + debugger, best plan first; stop at the first program that passes the sample tests.
    best = None                                                  # (sample tests passed, program)
    for _, i, plan in plans:
        c = ask("coder", "code", prompts.coder(problem, plan, sol.algorithm), _code_parser(problem, "coder"), plan=i)
        code = c.code if c else ""
        if not problem.sample_tests:
            if code:
                sol.code = code
                break
            continue
        for rnd in range(t + 1):
            if rnd:
                d = ask("debugger", "debug", prompts.debugger(problem, plan, code, report, sol.algorithm),
                        _code_parser(problem, "debugger"), plan=i, round=rnd)
                if not d:
                    break
                code, plan = d.code, d.plan or plan
            report = _sample_test(run_tests, problem, code)
            n_pass = sum(res.verdict == "pass" for res in report.results)
            sol.attempts.append(Attempt(i, rnd, report.verdict, n_pass, len(problem.sample_tests)))
            if code and (best is None or n_pass >= best[0]):
                best = (n_pass, code)
            if report.passed:
                sol.code, sol.solved_samples = code, True
                break
        if sol.solved_samples:
            break
    if not sol.code and best is not None:
        sol.code = best[1]
    sol.wall_s = time.perf_counter() - t0
    return sol


def single_call(problem: Problem, backend, strategy: str, max_new_tokens: int = 384,
                temperature: float = 0.0) -> Solution:
    """The baselines: Direct (answer with code) or CoT (reason, then code). One coder-tagged call."""
    t0 = time.perf_counter()
    sol = Solution(problem.id, strategy, "")
    msgs = prompts.direct(problem) if strategy == "direct" else prompts.cot(problem)
    c = _ask(backend, sol, "coder", strategy, msgs, budgets(max_new_tokens, 0)[strategy],
             _code_parser(problem, "coder"), temperature)
    sol.code = c.code if c else ""
    sol.wall_s = time.perf_counter() - t0
    return sol


def solve(problem: Problem, backend, strategy: str = "mapcoder", k: int = 2, t: int = 2, run_tests=None,
          max_new_tokens: int = 384, temperature: float = 0.0) -> Solution:
    if strategy == "mapcoder":
        return mapcoder(problem, backend, k, t, run_tests, max_new_tokens, temperature)
    if strategy in ("direct", "cot"):
        return single_call(problem, backend, strategy, max_new_tokens, temperature)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
