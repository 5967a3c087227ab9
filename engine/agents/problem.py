"""The agents' vocabulary: the problem and test-report types shared by the agents, the benchmarks and the sandbox.

It lives with the agents (engine/agents/), who read problems and test reports; eval/ imports it from here (the
engine never imports eval). A benchmark loader (eval/benchmarks/*.py) turns its file into `Problem`s. The agents
see only `description`, `starter_code`, `entry_point` and `sample_tests`; `hidden_tests` are for scoring.
`eval.harness.run_tests(problem, code, tests)` (sandboxed) returns a `TestReport`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

TestKind = Literal["assert", "call", "stdio", "check"]
Verdict = Literal["pass", "wrong_answer", "runtime_error", "timeout", "memory", "syntax_error", "no_code"]


@dataclass
class Test:
    """One test case.

    kind="assert": `code` is Python run after the solution (e.g. MBPP's `assert f(1) == 2`).
    kind="check":  `code` defines `check(candidate)`; it is called with the function `entry_point`.
    kind="call":   call `entry_point(*input)` and compare with `expected` (JSON values, normalised).
    kind="stdio":  feed `input` as stdin, compare stdout with `expected` (whitespace-normalised).
    `alt_input` (call only): arguments tried when calling with `input` raises TypeError/AttributeError
    (APPS data as MapCoder ships it lost the quotes of string arguments: "1234" may be a str or an int).
    """
    kind: TestKind
    input: Any = None
    expected: Any = None
    code: str = ""
    alt_input: Any = None


@dataclass
class Problem:
    id: str
    benchmark: str
    description: str                      # the text the agents read
    entry_point: str | None = None        # function name; None for stdin/stdout problems
    starter_code: str = ""                # e.g. HumanEval's signature + docstring
    sample_tests: list[Test] = field(default_factory=list)   # visible to the agents (debugger)
    hidden_tests: list[Test] = field(default_factory=list)   # for the final verdict
    setup_code: str = ""                  # run before the tests (MBPP test_setup_code, imports)
    time_limit_s: float = 5.0
    reference: str | None = None          # canonical solution when the benchmark has one
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        """The inverse of to_dict (a problem stored in a JSON record)."""
        d = dict(d)
        d["sample_tests"] = [Test(**t) for t in d.get("sample_tests", [])]
        d["hidden_tests"] = [Test(**t) for t in d.get("hidden_tests", [])]
        return cls(**d)


@dataclass
class TestResult:
    verdict: Verdict
    input: Any = None
    expected: Any = None
    got: Any = None                       # stdout / return value / assertion message
    stderr: str = ""


@dataclass
class TestReport:
    verdict: Verdict                      # "pass" only if every test passed
    results: list[TestResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def failures(self) -> list[TestResult]:
        return [r for r in self.results if r.verdict != "pass"]
