"""MBPP (original, 974 problems, asserts) and mbpp-py (MultiPL-E's 397-problem rewording of the test split).

    from eval.benchmarks import mbpp
    problems = mbpp.load(split="test")    # ../shared/data/benchmarks/mbpp/MBPP.jsonl, task_ids 11-510
    problems = mbpp.load_py()             # ../shared/data/benchmarks/mbpp/mbpp-py.jsonl

MBPP: standard splits by task_id: prompt 1-10 (few-shot), test 11-510, validation 511-600, train 601-974
("all" for every row). description = the task text; the function name is only known from the tests, so
the agents must show `sample_tests` (the first assert, as in the MBPP paper's prompt). hidden_tests =
all three asserts (challenge_test_list is not used), setup_code = test_setup_code, reference = `code`
with its `\\r\\n` line ends normalised.
mbpp-py: description/starter_code = the typed prompt (signature + docstring); sample_tests = its
`sample_io` asserts that are one of the hidden asserts (394 of 397 are; the other three are broken:
a syntax error in mbpp_297, a wrong sample in mbpp_277, a cut-off one in mbpp_391; meta
["dropped_samples"] counts them); hidden tests = the asserts of its `check(candidate)`, one "assert" test each
with `candidate` renamed to the entry point (as MBPP's own asserts), so that eval/harness.py keeps their expected
values out of the candidate's process (`python -m eval.hoisted` counts them); a `test` of another shape than
`def check(candidate): <asserts>` + `test_check()` becomes one "check" test (check() without the test_check
wrapper). No reference solutions ship with it.
"""
from __future__ import annotations

import ast
import json

from eval.benchmarks.data import data_file, take
from engine.agents.problem import Problem, Test

FILE = "mbpp/MBPP.jsonl"
PY_FILE = "mbpp/mbpp-py.jsonl"
SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974), "all": (1, 974)}


def load(path: str | None = None, split: str = "test", limit: int | None = None) -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"mbpp split {split!r}: expected one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    file = data_file(path, FILE)
    problems = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if lo <= row["task_id"] <= hi:
                problems.append(_problem(row, f"{file}:{lineno}"))
    return take(problems, limit)


def _problem(row: dict, where: str) -> Problem:
    code = row["code"].replace("\r\n", "\n")
    asserts = [a.replace("\r\n", "\n") for a in row["test_list"]]
    if not asserts:
        raise ValueError(f"{where}: task {row['task_id']} has an empty test_list")
    return Problem(id=f"mbpp/{row['task_id']}", benchmark="mbpp", description=row["text"],
                   entry_point=entry_point(code, asserts[0]),
                   sample_tests=[Test("assert", code=asserts[0])],
                   hidden_tests=[Test("assert", code=a) for a in asserts],
                   setup_code=row.get("test_setup_code", "").replace("\r\n", "\n"), reference=code,
                   meta={"task_id": row["task_id"]})


def entry_point(code: str, first_assert: str) -> str | None:
    """The function under test: the first function called in the assert that the reference defines
    (falls back to the first called name)."""
    try:
        defined = {n.name for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    except SyntaxError:
        defined = set()
    called = [n.func.id for n in ast.walk(ast.parse(first_assert))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return next((c for c in called if c in defined), called[0] if called else None)


def load_py(path: str | None = None, split: str = "test", limit: int | None = None) -> list[Problem]:
    problems = []
    file = data_file(path, PY_FILE)
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            hidden = split_check(row["test"], row["entry_point"], f"{file}:{lineno}")
            normal = {_normal(t.code) for t in hidden if t.kind == "assert"} - {None}
            samples = [a for a in row["sample_io"] if _normal(a) in normal]
            problems.append(Problem(
                id=row["name"], benchmark="mbpp-py", description=row["prompt"], entry_point=row["entry_point"],
                starter_code=row["prompt"], sample_tests=[Test("assert", code=a) for a in samples],
                hidden_tests=hidden, meta={"dropped_samples": len(row["sample_io"]) - len(samples)}))
    return take(problems, limit)


def split_check(test: str, entry_point: str, where: str) -> list[Test]:
    """MultiPL-E's `def check(candidate): assert ...` + `def test_check(): check(f)` + `test_check()` -> one
    "assert" test per assert, `candidate` renamed to entry_point; another shape -> one "check" test holding the
    source without test_check (the harness calls check(entry_point) itself). ValueError naming `where` if the
    source does not parse or defines no check()."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: field 'test' does not parse: {e}") from None
    body = [st for st in tree.body if not _is_test_check(st)]
    checks = [st for st in body if isinstance(st, ast.FunctionDef) and st.name == "check"]
    if not checks:
        raise ValueError(f"{where}: field 'test' defines no check(candidate)")
    check = checks[0]
    args = [a.arg for a in check.args.args]
    if len(body) == 1 and len(args) == 1 and check.body and all(isinstance(st, ast.Assert) for st in check.body):
        tests = []
        for st in check.body:
            for node in ast.walk(st):
                if isinstance(node, ast.Name) and node.id == args[0]:
                    node.id = entry_point
            tests.append(Test("assert", code=ast.unparse(st)))
        return tests
    tree.body = body
    return [Test("check", code=ast.unparse(tree))]


def _is_test_check(st: ast.stmt) -> bool:
    """`def test_check(): ...` or the bare call `test_check()`."""
    if isinstance(st, ast.FunctionDef):
        return st.name == "test_check"
    return (isinstance(st, ast.Expr) and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Name)
            and st.value.func.id == "test_check")


def _normal(code: str) -> str | None:
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError):
        return None
