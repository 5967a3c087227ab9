"""eval/harness.py: each test kind, the comparisons, early exits, timeouts, and that expected values never
reach the program.

    python -m pytest tests/eval/test_harness.py -q
"""
import math
import time
import uuid

import pytest

import eval.harness as harness
from engine.agents import problem as P          # (not `from ... import Test`: pytest would try to collect it)
from eval.harness import evaluate, outputs_equal, pass_at_1, pass_at_k, run_tests, values_equal

Problem = P.Problem


def fn_problem(tests, entry="f", setup=""):
    return Problem(id="t/fn", benchmark="test", description="", entry_point=entry, hidden_tests=tests,
                   setup_code=setup, time_limit_s=2.0)


def stdio_problem(pairs):
    return Problem(id="t/io", benchmark="test", description="", time_limit_s=2.0,
                   hidden_tests=[P.Test("stdio", input=i, expected=o) for i, o in pairs])


# -- comparisons --------------------------------------------------------------------------------------

@pytest.mark.parametrize("got, expected, ok", [
    ([1, 2], (1, 2), True), ((1, (2, 3)), [1, [2, 3]], True), (1, 1.0, True), (0.1 + 0.2, 0.3, True),
    (1e12 + 1e-3, 1e12, True), (1.0001, 1.0, False), (2**80, 2**80 + 1, False), (True, 1, True),
    ("1", 1, False), (None, None, True), (None, 0, False), ({"1": [2]}, {1: (2,)}, True),
    ({"a": 1}, {"a": 1, "b": 2}, False), ([1, 2], [1, 2, 3], False), ({"__repr__": "{1, 2}"}, [1, 2], False),
    (float("nan"), float("nan"), True), ("abc", "abc", True), ([[]], [[]], True),
])
def test_values_equal(got, expected, ok):
    assert values_equal(got, expected) is ok


@pytest.mark.parametrize("got, expected, ok", [
    ("1 2\n", "1 2", True), ("1 2   \n\n\n", "1 2\n", True), ("a\r\nb\r\n", "a\nb", True),
    ("1  2\n", "1 2\n", True),                       # token-wise
    ("0.3333333\n", "0.33333333", True), ("0.34\n", "0.33333333", False),
    ("1.0\n", "1", False),                           # an integer answer must match exactly
    ("YES", "yes", False), ("1 2", "1 2 3", False), ("", "", True), ("", "0", False),
])
def test_outputs_equal(got, expected, ok):
    assert outputs_equal(got, expected) is ok


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert math.isclose(pass_at_k(10, 3, 1), 0.3)
    assert math.isclose(pass_at_k(5, 2, 2), 1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_1([P.TestReport("pass"), P.TestReport("wrong_answer"), P.TestReport("pass"), P.TestReport("timeout")]) == 0.5


# -- test kinds ---------------------------------------------------------------------------------------

def test_assert_tests_and_the_failing_value():
    p = fn_problem([P.Test("assert", code="assert f(2) == 4"), P.Test("assert", code="assert f(3) == 10")])
    r = run_tests(p, "def f(x):\n    return x * x")
    assert [x.verdict for x in r.results] == ["pass", "wrong_answer"] and r.verdict == "wrong_answer"
    assert r.results[1].got == "9" and r.results[1].input == "assert f(3) == 10"
    r = run_tests(p, "def f(x):\n    return 1 // 0")
    assert [x.verdict for x in r.results] == ["runtime_error"] * 2 and "ZeroDivisionError" in r.results[0].stderr


def test_check_tests_and_typing_names():
    check = "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"
    p = fn_problem([P.Test("check", code=check)], entry="total")
    assert run_tests(p, "def total(xs: List[int]) -> int:\n    return sum(xs)").passed   # `from typing import *`
    assert run_tests(p, "def total(xs):\n    return len(xs)").verdict == "wrong_answer"
    assert run_tests(p, "def other(xs):\n    return 0").verdict == "runtime_error"      # entry point missing


def test_call_tests_normalise_json_values():
    p = fn_problem([P.Test("call", input=[3], expected=[1, 2, 3]), P.Test("call", input=[2], expected=1.5),
                    P.Test("call", input=[1], expected={"1": True})])
    code = "def f(n):\n    return {3: (1, 2, 3), 2: 3 / 2 + 1e-9, 1: {1: 1}}[n]"
    assert run_tests(p, code).passed
    r = run_tests(p, "def f(n):\n    return {1, 2}")
    assert r.verdict == "wrong_answer" and r.results[0].got == {"__repr__": "{1, 2}"}


def test_call_tests_find_a_solution_class_and_try_alt_input():
    p = fn_problem([P.Test("call", input=[1234], expected=True, alt_input=["1234"])], entry="valid")
    assert run_tests(p, "class Solution:\n    def valid(self, pin):\n        return pin.isdigit()").passed
    assert run_tests(p, "def valid(pin):\n    return len(str(pin)) == 4").passed


def test_setup_code_runs_after_the_solution():
    p = fn_problem([P.Test("assert", code="assert f(root) == 5")], setup="root = Node(5)")
    assert run_tests(p, "class Node:\n    def __init__(self, v):\n        self.v = v\ndef f(n):\n    return n.v").passed


def test_module_level_input_does_not_break_function_tests():
    p = fn_problem([P.Test("assert", code="assert f(1) == 2")])
    assert run_tests(p, "def f(x):\n    return x + 1\nn = int(input())\nprint(f(n))").passed


def test_stdio_tests():
    p = stdio_problem([("1 2\n", "3\n"), ("5 5\n", "10"), ("0 0\n", "0\n")])
    r = run_tests(p, "a, b = map(int, input().split())\nprint(a + b, '  ')\n")
    assert r.passed and r.results[0].got.startswith("3")
    r = run_tests(p, "a, b = map(int, input().split())\nprint(a * b)")
    assert [x.verdict for x in r.results] == ["wrong_answer", "wrong_answer", "pass"]
    r = run_tests(p, "print(undefined)")
    assert r.verdict == "runtime_error" and "NameError" in r.results[0].stderr


def test_syntax_error_and_no_code():
    p = stdio_problem([("1\n", "1")] * 3)
    t0 = time.monotonic()
    r = run_tests(p, "print(1")
    assert [x.verdict for x in r.results] == ["syntax_error"] * 3 and "not run" in r.results[2].stderr
    assert run_tests(fn_problem([P.Test("assert", code="assert f()")]), "def f(:").verdict == "syntax_error"
    assert run_tests(p, "").verdict == "no_code" and run_tests(p, None).results[0].verdict == "no_code"
    assert time.monotonic() - t0 < 30


def test_a_timeout_stops_the_batch():
    p = fn_problem([P.Test("assert", code="assert f(1) == 1"), P.Test("assert", code="assert f(0) == 0"),
                    P.Test("assert", code="assert f(2) == 2")])
    t0 = time.monotonic()
    r = run_tests(p, "def f(x):\n    while x == 0:\n        pass\n    return x", timeout=1.0)
    assert [x.verdict for x in r.results] == ["pass", "timeout", "timeout"]
    assert "not run" in r.results[2].stderr and time.monotonic() - t0 < 15
    tb = r.results[1].stderr                       # the program's frame, not the sandbox's alarm handler
    assert "TestTimeout" in tb and "line 2, in f" in tb and "sandbox_child" not in tb, tb


def test_timeout_even_when_the_program_swallows_it():
    p = fn_problem([P.Test("assert", code="assert f() == 1"), P.Test("assert", code="assert f() == 1")])
    code = "def f():\n    while True:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass"
    r = run_tests(p, code, timeout=0.5)
    assert [x.verdict for x in r.results] == ["timeout", "timeout"]


def test_memory_verdict_in_a_batch():
    p = fn_problem([P.Test("assert", code="assert f() == 1")])
    assert run_tests(p, "def f():\n    return len(bytearray(10 * 2**30))").verdict == "memory"


@pytest.mark.parametrize("code", [
    "import os\ndef f(x):\n    return x\nos._exit(0)",                   # exits 0 before any test ran
    "import os\ndef f(x):\n    os._exit(0)",                              # exits 0 inside the first test
    "import sys\ndef f(x):\n    sys.exit(0)",                             # SystemExit inside a test
    "import os, signal\ndef f(x):\n    os.kill(os.getpid(), signal.SIGKILL)",
])
def test_exiting_early_never_passes(code):
    p = fn_problem([P.Test("assert", code="assert f(1) == 2"), P.Test("call", input=[1], expected=2)])
    r = run_tests(p, code)
    assert r.verdict == "runtime_error" and all(x.verdict == "runtime_error" for x in r.results), r


def test_expected_values_never_reach_the_child(monkeypatch):
    secret = f"SECRET-{uuid.uuid4().hex}"
    seen = []
    real = harness.execute

    def spy(job, stdin=b"", limits=None):
        seen.append(repr(job) + repr(stdin))
        return real(job, stdin, limits)
    monkeypatch.setattr(harness, "execute", spy)
    # a program hunting for the expected output everywhere it can look
    hunter = ("import os, sys\nfound = []\n"
              "def scan(path):\n    try:\n        data = open(path, 'rb').read(1 << 20)\n    except Exception:\n        return\n"
              f"    if b'{secret[:7]}' in data:\n        found.append(data.decode(errors='replace'))\n"
              "budget = [3000]   # files: bounded, so the hunt ends well within the time limit in any mode\n"
              "for top in ['.', '/tmp', os.environ.get('HOME', '.')]:\n"
              "    for dirpath, dirs, files in os.walk(top):\n        for name in files[:max(0, budget[0])]:\n"
              "            budget[0] -= 1\n            scan(os.path.join(dirpath, name))\n"
              "for name in os.listdir('..'):\n    scan(os.path.join('..', name))\n"
              "for pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
              "        for what in ('cmdline', 'environ'):\n            scan(f'/proc/{pid}/{what}')\n"
              f"found += [v for v in list(os.environ.values()) + sys.argv if '{secret[:7]}' in v]\n"
              "print(found[0] if found else 'nothing')\n")
    stdio = stdio_problem([("", secret)])
    r = run_tests(stdio, hunter, timeout=5)
    assert r.verdict == "wrong_answer" and secret not in (r.results[0].got or ""), r
    call = fn_problem([P.Test("call", input=[1], expected=secret)])
    assert run_tests(call, "def f(x):\n    return 'nothing'").verdict == "wrong_answer"
    asserts = fn_problem([P.Test("assert", code=f"assert f(1) == {secret!r}"),
                          P.Test("check", code=f"def check(candidate):\n    assert candidate(1) == {secret!r}\n")])
    r = run_tests(asserts, "def f(x):\n    return 'nothing'")   # expected literals of asserts too
    assert [x.verdict for x in r.results] == ["wrong_answer"] * 2, r
    assert seen and not any(secret in s for s in seen)


def test_evaluate_runs_problems_in_parallel_and_keeps_order():
    probs = [fn_problem([P.Test("assert", code=f"assert f() == {i}")]) for i in range(6)]
    codes = [f"def f():\n    return {i}" for i in range(5)] + ["while True:\n    pass"]
    reports = evaluate(probs, codes, workers=2, timeout=1.0)
    assert [r.verdict for r in reports] == ["pass"] * 5 + ["timeout"]
    with pytest.raises(ValueError, match="2 codes"):
        evaluate(probs[:3], codes[:2])


# -- expected values of asserts stay in the parent ----------------------------------------------------

def test_offload_takes_literals_out_of_simple_asserts_only():
    check = ("def check(candidate):\n    assert candidate(1) == [1, 2], 'msg'\n    for i in range(3):\n"
             "        assert candidate(i) == i\n    assert not candidate(0)\n    assert 7 == candidate(7)\n"
             "    assert candidate(2) is True\n    assert abs(candidate(3) - 0.5) < 1e-6\n    assert True\n")
    code, expects = harness.offload_expected(check, "check")
    assert [(op, v) for op, v, _ in expects] == [("eq", [1, 2]), ("falsy", None), ("eq", 7), ("is", True),
                                                 ("close", (0.5, 1e-6, True))]
    assert "[1, 2]" not in code and "msg" not in code and "7 ==" not in code and "is True" not in code
    assert "assert candidate(i) == i" in code and "0.5" not in code   # in a loop: left in the child
    computed = "assert f(1) == g(2)\nassert f(1) == (3 + 5, 3 * 5)\nassert tuple(f(2)) == tuple([2, 6])\n"
    code, expects = harness.offload_expected(computed, "assert")
    assert [v for _, v, _ in expects] == [(8, 15), (2, 6)] and "assert f(1) == g(2)" in code
    with_return = "def check(candidate):\n    assert candidate(1) == 2\n    return\n"
    assert harness.offload_expected(with_return, "check") == (with_return, [])
    helper = "def helper():\n    assert f(1) == 2\nhelper()\n"
    assert harness.offload_expected(helper, "assert")[1] == []          # only top-level asserts of an assert test


@pytest.mark.parametrize("body, verdict", [
    ("return [1, 2]", "pass"), ("return (1, 2)", "wrong_answer"),        # Python's ==: a tuple is not a list
    ("return [1.0, 2]", "pass"), ("return [True, 2]", "pass"),          # 1 == 1.0 == True
    ("return [1, 2, 3]", "wrong_answer"), ("return None", "wrong_answer"),
    ("class L(list):\n        def __eq__(self, o):\n            return True\n    return L([0])", "wrong_answer"),
])
def test_offloaded_asserts_compare_with_pythons_eq(body, verdict):
    p = fn_problem([P.Test("assert", code="assert f() == [1, 2]")])
    assert run_tests(p, f"def f():\n    {body}").verdict == verdict


def test_tolerance_and_constant_expression_asserts_are_decided_here():
    """`abs(X - C) < tol` and `X == (3 + 5, 3 * 5)` decided in the child let an object whose __sub__/__abs__/__eq__
    lie pass; they are decided in the parent now."""
    liar = ("class L:\n    __sub__ = __rsub__ = lambda s, o: s\n    __abs__ = lambda s: 0\n"
            "    __eq__ = lambda s, o: True\n    __hash__ = object.__hash__\n")
    p = fn_problem([P.Test("assert", code="assert abs(f() - 2.0 / 3.0) < 1e-6")])
    assert run_tests(p, "def f():\n    return 2 / 3").passed
    assert run_tests(p, liar + "def f():\n    return L()").verdict == "wrong_answer"
    p = fn_problem([P.Test("assert", code="assert f() == (3 + 5, 3 * 5)")])
    assert run_tests(p, "def f():\n    return (8, 15)").passed
    assert run_tests(p, liar + "def f():\n    return L()").verdict == "wrong_answer"


def test_offloaded_values_of_every_kind_roundtrip():
    expected = {"a": (1, {2, 3}), 4: [b"x", 1 + 2j, None, -0.5, "\ud800", {(1, 2): "t"}]}
    p = fn_problem([P.Test("assert", code=f"assert f() == {expected!r}"),
                    P.Test("check", code="def check(candidate):\n    assert candidate()\n    assert not candidate() == 1\n")])
    assert run_tests(p, f"def f():\n    return {expected!r}").passed
    r = run_tests(p, "def f():\n    return {'a': (1, {2, 4})}")
    assert r.results[0].verdict == "wrong_answer" and "the value was {'a': (1, frozenset({2, 4}))}" in r.results[0].stderr


def test_a_check_runs_on_after_a_wrong_value_and_reports_the_first():
    check = "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 5\n    assert candidate(3) == 3\n"
    p = fn_problem([P.Test("check", code=check)], entry="f")
    r = run_tests(p, "def f(x):\n    if x == 3:\n        raise ValueError\n    return x")
    assert r.verdict == "wrong_answer" and r.results[0].got == "2", r
    assert "assert candidate(2) == 5" in r.results[0].stderr


def test_a_test_whose_values_were_not_reported_does_not_pass():
    p = fn_problem([P.Test("assert", code="assert f(1) == 2\nassert f(2) == 3")])
    code = ("def f(x):\n    globals()['__mcl_expect__'] = lambda k, v: None   # silence the reporter\n"
            "    return 2\n")
    r = run_tests(p, code)
    assert r.verdict == "runtime_error" and "asserts [1] of the test reported no value" in r.results[0].stderr, r
