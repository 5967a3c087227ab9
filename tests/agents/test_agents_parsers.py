"""Parsers: the labelled answers (agent_fixtures.py) are classified right, property-based fuzzing over
malformed XML / markdown never raises (the raw functions, not only the guarded ones), and every parser is
linear: adversarial 100 kB answers (hypothesis-built repetitions of tricky atoms, and the red team's two
quadratic cases) each parse within a CPU-time bound; the rewritten regexes match what the old ones did.

    python -m pytest tests/agents/test_agents_parsers.py -q
"""
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_fixtures import CASES, CONTEXTS, GOOD_FN
from engine.agents import parsers as P


def parse(kind, text, problem, guarded=True):
    ep, sc = problem.entry_point, problem.starter_code
    fn = {"retriever": P.parse_retriever, "plan": P.parse_plan, "confidence": P.parse_confidence,
          "coder": P.parse_code, "debugger": P.parse_debugger}[kind]
    fn = fn if guarded else fn.unsafe
    if kind == "retriever":
        return fn(text, k=2)
    if kind in ("coder", "debugger"):
        return fn(text, entry_point=ep, starter_code=sc)
    return fn(text)


def check_case(name, kind, ctx, text, expected):
    problem = CONTEXTS[ctx]
    k = expected.get("k", 2) if expected else 2
    out = P.parse_retriever(text, k=k) if kind == "retriever" else parse(kind, text, problem)
    if expected is None:
        assert isinstance(out, P.FormatFailure), f"{name}: expected a format failure, got {out!r}"
        assert out.reason and not out.reason.startswith("parser error"), f"{name}: {out.reason}"
        return
    assert not isinstance(out, P.FormatFailure), f"{name}: unexpected failure {out!r}"
    if "repairs" in expected:
        assert bool(out.repairs) == expected["repairs"], f"{name}: repairs {out.repairs}"
    if kind == "retriever":
        assert len(out.examples) == expected["n_examples"], f"{name}: {out.examples}"
        for key, val in expected.items():
            m = re.fullmatch(r"(description|code|planning)(\d)_(not_)?contains", key)
            if m:
                got = getattr(out.examples[int(m.group(2))], m.group(1))
                assert (val in got) != bool(m.group(3)), f"{name}: {key} {val!r} vs {got!r}"
        if "algorithm_contains" in expected:
            assert expected["algorithm_contains"] in out.algorithm, f"{name}: {out.algorithm!r}"
        if "algorithm_not_contains" in expected:
            assert expected["algorithm_not_contains"] not in out.algorithm, f"{name}: {out.algorithm!r}"
    elif kind == "plan":
        assert expected["contains"] in out.text
        if "not_contains" in expected:
            assert expected["not_contains"] not in out.text, f"{name}: {out.text!r}"
    elif kind == "confidence":
        assert out.score == expected["score"], f"{name}: {out}"
    else:
        code = out.code
        if "defines" in expected:
            assert P._defines(code, problem.entry_point) == expected["defines"], f"{name}:\n{code}"
        if "compiles" in expected:
            assert P.compiles(code) == expected["compiles"], f"{name}:\n{code}"
        if "contains" in expected:
            assert expected["contains"] in code, f"{name}:\n{code}"
        if "not_contains" in expected:
            assert expected["not_contains"] not in code, f"{name}:\n{code}"
        if "plan_contains" in expected:
            assert expected["plan_contains"] in out.plan, f"{name}: {out.plan!r}"
        if "plan_not_contains" in expected:
            assert expected["plan_not_contains"] not in out.plan, f"{name}: {out.plan!r}"
        if "plan_equals" in expected:
            assert out.plan == expected["plan_equals"], f"{name}: {out.plan!r}"


def test_there_are_enough_labelled_cases():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert sum(c[4] is None for c in CASES) >= 8            # broken answers, not only good ones


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_labelled_answer(case):
    check_case(*case)


def test_final_code_runs_and_behaves():
    """The repaired HumanEval answers are whole programs: exec them and call the function."""
    for name, kind, ctx, text, expected in CASES:
        if kind in ("coder", "debugger") and ctx == "he" and expected and expected.get("compiles"):
            out = parse(kind, text, CONTEXTS[ctx])
            ns = {}
            exec(out.code, ns)
            assert ns["below_zero"]([1, 2, -4, 5]) is True, name
            assert ns["below_zero"]([1, 2, 3]) is False or name == "code_draft_then_final", name


def test_failures_name_role_and_keep_an_excerpt():
    f = P.parse_code("just words " * 100, role="debugger")
    assert isinstance(f, P.FormatFailure) and f.role == "debugger" and not f
    assert len(f.excerpt) < 400 and f.excerpt.startswith("just words")
    assert P.parse_confidence("nothing").role == "planner"
    assert P.parse_retriever("").role == "retriever"


def test_non_text_input_is_a_failure_not_a_crash():
    for fn in (P.parse_retriever, P.parse_plan, P.parse_confidence, P.parse_code, P.parse_debugger):
        assert isinstance(fn(None), P.FormatFailure)
        assert isinstance(fn(b"```python\nx=1\n```"), P.FormatFailure)


def test_guard_turns_a_parser_bug_into_a_failure(monkeypatch):
    monkeypatch.setattr(P, "code_blocks", lambda text: 1 / 0)
    out = P.parse_plan("1. do it properly")
    assert isinstance(out, P.FormatFailure) and out.reason.startswith("parser error: ZeroDivisionError")


def test_code_picks_entry_point_block_over_longer_helper_block():
    text = ("```python\nimport sys\n\ndef read():\n    return sys.stdin.read()\n\n\ndef unused_long_helper(x):\n"
            "    y = x\n    y = y + 1\n    y = y * 2\n    return y\n```\n\n```python\n" + GOOD_FN + "\n```")
    out = P.parse_code(text, entry_point="below_zero", starter_code=CONTEXTS["he"].starter_code)
    assert "def below_zero" in out.code and "unused_long_helper" not in out.code


def test_starter_helpers_are_put_back():
    starter = ('def encode_cyclic(s: str):\n    """encode"""\n    return s[::-1]\n\n\n'
               'def decode_cyclic(s: str):\n    """decode"""\n')
    out = P.parse_code("```python\ndef decode_cyclic(s):\n    return encode_cyclic(s)\n```",
                       entry_point="decode_cyclic", starter_code=starter)
    ns = {}
    exec(out.code, ns)
    assert ns["decode_cyclic"]("abc") == "cba"


# --- fuzzing ------------------------------------------------------------------------------------

TOKENS = ["<root>", "</root>", "<problem>", "</problem>", "<problem2>", "<description>", "</description>",
          "<code>", "</code>", "<planning>", "</planning>", "<algorithm>", "</algorithm>", "<explanation>",
          "</explanation>", "<confidence>", "</confidence>", "<![CDATA[", "]]>", "```", "```python", "```xml",
          "```py\n", "~~~", "\n", "\n\n", "    ", "\t", "def below_zero(operations):", "def f(x):", "return x",
          "return", "print(input())", "if a < b:", "&lt;", "&amp;", "&#0;", "&#99999999;", "<think>", "</think>",
          "<|im_end|>", "</s>", "85", "0.5", "1e309", "99999999999999999999", "Confidence:", "confidence score of",
          "%", "/100", "\x00", "\r", "\u2028", "é", "🙂", "<", ">", "/", "[", "]", "<!--", "-->", "<a b='c'>",
          "import os", "from typing import List", "@decorator", "class A:", "## Planning:", "1. step",
          "(" * 50, "[" * 120, "x = " + "(" * 300]


def _noise():
    return st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=12)), max_size=60).map("".join)


def _mutated_case():
    """A labelled answer with a slice deleted, a token inserted, or the tail cut off."""
    return st.tuples(st.sampled_from([c[3] for c in CASES]), st.integers(0, 4000), st.integers(0, 400),
                     st.sampled_from(TOKENS), st.sampled_from(["cut", "delete", "insert"])).map(_mutate)


def _mutate(args):
    text, at, n, tok, how = args
    at = at % (len(text) + 1)
    if how == "cut":
        return text[:at]
    if how == "delete":
        return text[:at] + text[at + n:]
    return text[:at] + tok + text[at:]


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(_noise(), _mutated_case()), st.sampled_from(["he", "io"]))
def test_fuzz_raw_parsers_never_raise(text, ctx):
    problem = CONTEXTS[ctx]
    for kind in ("retriever", "plan", "confidence", "coder", "debugger"):
        out = parse(kind, text, problem, guarded=False)
        assert isinstance(out, (P.FormatFailure, P.Retrieval, P.Plan, P.Confidence, P.Code)), kind
        if isinstance(out, P.Confidence):
            assert 0 <= out.score <= 100
        if isinstance(out, P.Retrieval):
            assert 1 <= len(out.examples) <= 2 and all(e.description for e in out.examples)
        if isinstance(out, P.Code):
            assert out.code.strip()


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_arbitrary_unicode_never_raises(text):
    for kind in ("retriever", "plan", "confidence", "coder", "debugger"):
        out = parse(kind, text, CONTEXTS["he"], guarded=False)
        assert out is not None


# --- linear time ------------------------------------------------------------------------------------
# The target is <= 50 ms per parser on any 100 kB answer (measured: bench figures in the issue report).
# The bound asserted here is 5x that, in CPU time of this process, so a loaded shared machine does not
# flake it; the quadratic regexes it guards against took 7 s ("<think>" x 14k) and 78 s (a 100 kB line of
# spaces with an entry point) on 100 kB.
CPU_BOUND_S = 0.25
SIZE = 100_000

ATOMS = ["<think>", "</think>", " ", "  ", "\n", " \n", "\t", "\n\n", "```", "```python\n", "~~~", "`", "<", ">",
         "< ", "<code ", "<problem ", "<problem", "<description>", "<algorithm>", "</", "a", "a ", "a,", " ,", "1",
         "0.", "def f(", "def below_zero(", "async ", "x = ", "x =", "=", "(", "[", "#", "# plan", "plan ",
         "planning:", "confidence ", "confidence: ", "%", "&lt;", "&", "<![CDATA[", "]]>", "word ", "Note: a b",
         "return", "import ", "from a import b\n", "@", "    ", "\\", ":", "é", "\x00", "\r", "\u2028"]


def _adversarial():
    """prefix + unit * (100 kB / len(unit)) + suffix, the unit one to three tricky atoms (or a bit of text)."""
    unit = st.lists(st.one_of(st.sampled_from(ATOMS), st.text(min_size=1, max_size=4)), min_size=1,
                    max_size=3).map("".join)
    edge = st.one_of(st.just(""), st.sampled_from(ATOMS + ["```python\ndef below_zero(operations):\n"]))
    return st.tuples(edge, unit, edge).map(lambda t: t[0] + t[1] * (SIZE // len(t[1])) + t[2])


def _slowest(text):
    """(seconds, parser) of the slowest parser on `text` (process CPU time; the compile cache emptied first)."""
    worst = (0.0, "")
    for kind in ("retriever", "plan", "confidence", "coder", "debugger"):
        P._compiled.clear()
        t0 = time.process_time()
        parse(kind, text, CONTEXTS["he"])
        worst = max(worst, (time.process_time() - t0, kind))
    return worst


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(_adversarial())
def test_every_parser_is_linear_on_adversarial_100kb(text):
    took, kind = _slowest(text)
    assert took <= CPU_BOUND_S, f"{kind}: {took * 1000:.0f} ms CPU on {len(text)} chars starting {text[:40]!r}"


@pytest.mark.parametrize("name, text", [
    ("unclosed <think> repeated", "<think>" * (SIZE // 7)),
    ("a line of spaces, entry point given", "a" + " " * (SIZE - 2) + "b"),
    ("a looping model's answer of spaces", "```python\ndef below_zero(operations):\n" + " " * SIZE),
    ("blank lines", "x = 1" + "\n" * SIZE + "def below_zero(x):\n    return 1"),
], ids=["think", "spaces", "looping", "blank-lines"])
def test_red_team_quadratic_cases_are_linear(name, text):
    took, kind = _slowest(text)
    assert took <= CPU_BOUND_S, f"{name}: {kind} took {took * 1000:.0f} ms CPU"


def test_a_candidate_too_long_to_compile_is_still_taken():
    body = "".join(f"    x{i} = {i}\n" for i in range(3000))               # ~40 kB > MAX_COMPILE
    text = f"```python\ndef below_zero(operations):\n{body}    return False\n```"
    assert len(text) > P.MAX_COMPILE
    out = P.parse_code(text, entry_point="below_zero", starter_code=CONTEXTS["he"].starter_code)
    assert isinstance(out, P.Code) and "x2999 = 2999" in out.code
    assert P.compiles(out.code)                                        # outside a parse call: no limit


def test_a_retriever_looping_on_problems_is_read_up_to_the_cap():
    one = "<problem><description>D{i}</description><code>x = {i}</code></problem>\n"
    text = "".join(one.format(i=i) for i in range(P.MAX_PROBLEMS + 30)) + "<algorithm>Greedy</algorithm>"
    out = P.parse_retriever(text, k=2)
    assert [e.description for e in out.examples] == ["D0", "D1"] and out.algorithm == "Greedy"
    assert f"more than {P.MAX_PROBLEMS} <problem> elements: the rest not read" in out.repairs
    assert f"{P.MAX_PROBLEMS} problems recalled, 2 asked" in out.repairs


# The rewritten regexes against the old ones, on short strings where the old ones are fast.
_OLD_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_OLD_CODE_LINE = re.compile(r"^(def |class |import |from \w|@\w|async def |if __name__|for |while |with |try:|"
                            r"print\(|return\b|[A-Za-z_][\w, \[\]]*\s*[+\-*/]?=[^=])")
_SMALL = st.lists(st.sampled_from(["<think>", "</THINK>", "a", " ", "\t", "\n", "=", "+=", "==", ",", "[", "]",
                                   "x", "def", " f(", "async", "é", "\u2028", "\x0b"]), max_size=14).map("".join)


@FUZZ
@given(_SMALL)
def test_linear_rewrites_match_the_old_regexes(text):
    assert P._drop_think(text) == _OLD_THINK.sub("", text)
    assert bool(P._CODE_LINE.match(text)) == bool(_OLD_CODE_LINE.match(text))
    old_defines = re.search(r"^\s*(?:async\s+)?def\s+f\s*\(", text, re.M) is not None
    assert P._defines(text, "f") == old_defines
    for line in text.split("\n"):
        old_start = re.match(r"(def |class |import |from [\w.]+ import|@\w|async def |"
                             r"[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*\s*=[^=])", line)
        assert bool(P._REGION_START.match(line)) == bool(old_start), line
    heading = text.replace("x", "plan").replace("a", "#").replace("é", ":").replace("=", "revised ")
    old_heading = re.sub(r"^\s*#*\s*(modified |revised )?plan(ning)?\s*:?\s*\n", "", heading, flags=re.I)
    assert P._PLAN_HEADING.sub("", heading) == old_heading
