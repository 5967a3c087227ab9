"""Score code against a problem's tests in the sandbox: `run_tests` -> TestReport, plus pass@k.

    from eval.harness import run_tests, evaluate, pass_at_1
    report = run_tests(problem, code)                        # hidden tests; problem.sample_tests for the debugger
    report.verdict, [r.verdict for r in report.results]
    reports = evaluate(problems, codes, workers=2)           # many problems in parallel
    pass_at_1(reports)

How tests run (eval/sandbox.py does the isolation; nothing untrusted ever runs in this process):
  assert / check / call  one subprocess per problem: `from typing import *`, setup_code, the code, then
                         every test under its own SIGALRM timer; one JSON record per test. A program that
                         exits early (os._exit(0), sys.exit() inside a test) leaves tests without a record,
                         and those are "runtime_error", never "pass".
  stdio                  one subprocess per test: the code runs as __main__ with the test's stdin.
Expected values of call and stdio tests never leave this process; the comparison is here:
  call   JSON-normalised return values: tuples == lists, int == float within 1e-6 (relative or
         absolute), dict keys compared as strings, bool == int as Python's == has it (APPS's grader
         compared with ==).
  stdio  line by line with trailing whitespace and trailing blank lines ignored; failing that,
         token by token, where a token of the expected output that is a non-integer number matches a
         number within 1e-6 (relative or absolute).
Verdict of a report: "pass" if every test passed, else the verdict of the first test that did not;
"no_code" for empty code; "pass" for an empty test list (MapCoder's rule for problems without sample
tests; the code is then not run at all).
After a test times out the remaining ones are not run (a slow solution is slow on all of them) and get
"timeout" too, with "not run" in their stderr.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from eval.problem import Problem, Test, TestReport, TestResult
from eval.sandbox import Execution, Limits, execute

TOL = 1e-6
GOT_CHARS = 4000     # how much of a program's output a TestResult keeps


# ---------------------------------------------------------------------------------------------------
# comparison (parent side)

def _is_number(x) -> bool:
    return isinstance(x, (int, float))


def _close(a: float, b: float, tol: float = TOL) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


def values_equal(got: Any, expected: Any, tol: float = TOL) -> bool:
    """Equality of JSON values as APPS call-based tests need it (see the module docstring)."""
    if _is_number(got) and _is_number(expected):
        return _close(got, expected, tol)
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(values_equal(g, e, tol) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        g = {str(k): v for k, v in got.items()}
        e = {str(k): v for k, v in expected.items()}
        return g.keys() == e.keys() and all(values_equal(g[k], e[k], tol) for k in e)
    if isinstance(got, dict) and "__repr__" in got:   # the child could not turn it into JSON
        return False
    return type(got) is type(expected) and got == expected


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _token_equal(got: str, expected: str, tol: float) -> bool:
    if got == expected:
        return True
    if not any(c in expected for c in ".eE") or expected.lower() in ("nan", "inf", "-inf"):
        return False   # integers and words must match exactly
    try:
        return _close(float(got), float(expected), tol)
    except ValueError:
        return False


def outputs_equal(got: str, expected: str, tol: float = TOL) -> bool:
    """stdout comparison for stdin/stdout problems (see the module docstring)."""
    if _lines(got) == _lines(expected):
        return True
    g, e = got.split(), expected.split()
    return len(g) == len(e) and all(_token_equal(a, b, tol) for a, b in zip(g, e))


# ---------------------------------------------------------------------------------------------------
# running

def run_tests(problem: Problem, code: str | None, tests: Sequence[Test] | None = None,
              timeout: float | None = None, stop_on_failure: bool = False) -> TestReport:
    """Run `code` on `tests` (default: problem.hidden_tests). `timeout`: seconds per test (default
    problem.time_limit_s). stop_on_failure: skip the remaining stdio tests after the first failure
    (then `results` is shorter than `tests`)."""
    tests = list(problem.hidden_tests if tests is None else tests)
    t0 = time.monotonic()
    if not code or not code.strip():
        return TestReport("no_code", [TestResult("no_code", _shown_input(t), t.expected) for t in tests], 0.0)
    per_test = float(timeout or problem.time_limit_s)
    results: list[TestResult | None] = [None] * len(tests)
    batch = [i for i, t in enumerate(tests) if t.kind != "stdio"]
    if batch:
        for i, r in zip(batch, _run_batch(problem, code, [tests[i] for i in batch], per_test)):
            results[i] = r
    stopped = None
    for i, t in enumerate(tests):
        if t.kind != "stdio":
            continue
        if stopped is not None:
            results[i] = TestResult(stopped.verdict, t.input, t.expected, None, f"not run: {stopped.stderr[:200]}")
            continue
        results[i] = r = _run_stdio(code, t, per_test)
        if r.verdict in ("syntax_error", "timeout") or (stop_on_failure and r.verdict != "pass"):
            stopped = r
            if stop_on_failure:
                break
    done = [r for r in results if r is not None]
    verdict = next((r.verdict for r in done if r.verdict != "pass"), "pass")
    return TestReport(verdict, done, time.monotonic() - t0)


def evaluate(problems: Sequence[Problem], codes: Sequence[str | None], workers: int = 2,
             sample: bool = False, timeout: float | None = None) -> list[TestReport]:
    """run_tests for many problems in parallel (threads, each driving sandbox subprocesses).
    sample=True scores on problem.sample_tests instead of the hidden tests."""
    if len(problems) != len(codes):
        raise ValueError(f"eval/harness.py evaluate: {len(problems)} problems but {len(codes)} codes")

    def one(pc):
        p, c = pc
        return run_tests(p, c, p.sample_tests if sample else p.hidden_tests, timeout)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, zip(problems, codes)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_1(reports: Iterable[TestReport]) -> float:
    """Fraction of problems whose (single) solution passed every test."""
    reports = list(reports)
    return sum(r.passed for r in reports) / len(reports) if reports else 0.0


def _shown_input(t: Test):
    return t.code if t.kind in ("assert", "check") else t.input


def _run_batch(problem: Problem, code: str, tests: list[Test], per_test: float) -> list[TestResult]:
    job = {"driver": "functions", "code": code, "setup_code": problem.setup_code,
           "entry_point": problem.entry_point,
           # no `expected` in here: the child can read everything in the job
           "tests": [{"kind": t.kind, "code": t.code, "input": t.input if t.kind == "call" else None,
                      "alt_input": getattr(t, "alt_input", None)} for t in tests]}
    limits = Limits(wall_s=per_test * (len(tests) + 1) + 1.0, test_timeout_s=per_test)
    ex = execute(job, b"", limits)
    by_index = {r["i"]: r for r in ex.records if isinstance(r.get("i"), int)}
    load = next((r for r in ex.records if "load_error" in r), None)
    timed_out_at = next((i for i in sorted(by_index) if by_index[i].get("status") == "timeout"), None)
    out = []
    for i, t in enumerate(tests):
        rec = by_index.get(i)
        if rec is not None:
            out.append(_from_record(rec, t))
        elif ex.syntax_error:
            out.append(TestResult("syntax_error", _shown_input(t), t.expected, None, ex.syntax_error))
        elif load is not None:
            verdict = {"timeout": "timeout", "memory": "memory"}.get(load.get("status"), "runtime_error")
            out.append(TestResult(verdict, _shown_input(t), t.expected, None,
                                  "error while defining the solution:\n" + load["load_error"]))
        elif timed_out_at is not None and i > timed_out_at:
            out.append(TestResult("timeout", _shown_input(t), t.expected, None, f"not run: test {timed_out_at} timed out"))
        else:   # killed, crashed or exited before this test reported
            verdict = ex.failure if ex.failure not in (None, "syntax_error") else "runtime_error"
            why = ex.stderr_excerpt() or f"the program exited (status {ex.exit_code}) before this test ran"
            out.append(TestResult(verdict, _shown_input(t), t.expected, None, why))
    return out


def _from_record(rec: dict, t: Test) -> TestResult:
    status, err = rec.get("status"), rec.get("error", "")
    shown = _shown_input(t)
    if status == "ok":
        if t.kind != "call":
            return TestResult("pass", shown, t.expected)
        got = rec.get("got")
        verdict = "pass" if values_equal(got, t.expected) else "wrong_answer"
        return TestResult(verdict, shown, t.expected, got)
    verdict = {"assert": "wrong_answer", "timeout": "timeout", "memory": "memory"}.get(status, "runtime_error")
    return TestResult(verdict, shown, t.expected, rec.get("got"), err)


def _run_stdio(code: str, t: Test, per_test: float) -> TestResult:
    stdin = t.input if isinstance(t.input, str) else "" if t.input is None else str(t.input)
    ex: Execution = execute({"driver": "program", "code": code}, stdin,
                            Limits(wall_s=per_test, cpu_s=per_test, test_timeout_s=per_test))
    got = ex.stdout[:GOT_CHARS]
    failure = ex.failure
    if failure is not None:
        return TestResult(failure, t.input, t.expected, got, ex.syntax_error or ex.stderr_excerpt())
    expected = t.expected if isinstance(t.expected, str) else str(t.expected)
    verdict = "pass" if outputs_equal(ex.stdout, expected) else "wrong_answer"
    return TestResult(verdict, t.input, t.expected, got, ex.stderr[-1000:])
