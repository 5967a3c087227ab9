"""APPS, the 150-problem subset MapCoder and MapCoder-Lite report on (50 introductory, 52 interview,
48 competition): 98 call-based problems and 52 stdin/stdout ones.

    from eval.benchmarks import apps
    problems = apps.load()                 # ../shared/data/benchmarks/apps/selected150.jsonl
    [p for p in problems if p.meta["io"] == "call"]

stdin/stdout (empty `starter_code`): Test("stdio", input=stdin text, expected=output[0]).
call-based (`starter_code` holds `def name(args):`): Test("call", input=[args], expected=output[0]);
the code must define `entry_point` (tests call it; module-level input() meets an empty stdin).
How arguments are recovered: MapCoder's converter wrote each argument as str(x) on its own line, so
each line is parsed as a Python literal (ast.literal_eval), and kept as a string when it is not one
('Apple Banana'), as are digit strings with leading zeros ("0000"). When there are more lines than parameters (a multi-line string first argument,
problem 1613), the leading lines are joined back into the first argument. str() lost the quotes of
string arguments, so "1234" could have been a str: such tests carry `alt_input` with the digit-only
lines kept as strings, which the child tries if the call with numbers raises TypeError/AttributeError.
sample_tests = `sample_io` (the first two tests, as MapCoder made them; 13 problems have none).
The file repeats 22 rows verbatim (128 distinct problems; MapCoder's converter concatenated the
train split with itself). The papers' numbers are over all 150 rows, so they are kept; repeats get ids
"apps/<id>#2", "#3" and meta["duplicate_of"]; unique=True drops them instead.
Several problems accept more than one correct output (a special judge in the original); they are
compared exactly here, as MapCoder did.
"""
from __future__ import annotations

import ast
import json
import re

from eval.benchmarks.data import data_file, take
from engine.agents.problem import Problem, Test

FILE = "apps/selected150.jsonl"
DEF = re.compile(r"def\s+(\w+)\s*\(([^)]*)\)")


def load(path: str | None = None, split: str = "test", limit: int | None = None,
         unique: bool = False) -> list[Problem]:
    file = data_file(path, FILE)
    problems, seen = [], {}
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            p = _problem(json.loads(line), f"{file}:{lineno}")
            seen[p.id] = seen.get(p.id, 0) + 1
            if seen[p.id] > 1:
                if unique:
                    continue
                p.meta["duplicate_of"] = p.id
                p.id = f"{p.id}#{seen[p.id]}"
            problems.append(p)
    return take(problems, limit)


def _problem(row: dict, where: str) -> Problem:
    starter = row.get("starter_code") or ""
    m = DEF.search(starter)
    if starter.strip() and not m:
        raise ValueError(f"{where}: starter_code has no `def name(...)`: {starter[:80]!r}")
    entry, params = (m.group(1), _params(m.group(2))) if m else (None, [])

    def tests(rows, field):
        out = []
        for k, t in enumerate(rows):
            if not (isinstance(t.get("output"), list) and len(t["output"]) == 1):
                raise ValueError(f"{where}: {field}[{k}].output should be a one-element list, got {t.get('output')!r}")
            out.append(_call_test(t["input"], t["output"][0], params) if entry else
                       Test("stdio", input=t["input"], expected=t["output"][0]))
        return out
    return Problem(id=f"apps/{row['id']}", benchmark="apps", description=row["description"], entry_point=entry,
                   starter_code=starter, sample_tests=tests(row["sample_io"], "sample_io"),
                   hidden_tests=tests(row["test_list"], "test_list"),
                   meta={"difficulty": row.get("difficulty"), "io": "call" if entry else "stdio"})


def _params(text: str) -> list[tuple[str, bool]]:
    """(name, has_default) for each parameter, `self` dropped."""
    out = []
    for p in text.split(","):
        p = p.strip()
        if p and p != "self" and not p.startswith("*"):
            out.append((p.split("=")[0].split(":")[0].strip(), "=" in p))
    return out


def _literal(line: str):
    if re.fullmatch(r"-?0\d+", line.strip()):   # "0000": a string (Python has no such int literal)
        return line
    try:
        return ast.literal_eval(line.strip()) if line.strip() else line
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return line


def _call_test(text: str, expected, params: list[tuple[str, bool]]) -> Test:
    lines = text.split("\n") if (text or params) else []
    if len(lines) > len(params) >= 1:   # a multi-line string first argument
        extra = len(lines) - len(params) + 1
        lines = ["\n".join(lines[:extra])] + lines[extra:]
    args = [_literal(line) for line in lines]
    alt = [line if line.strip().lstrip("-").isdigit() else a for line, a in zip(lines, args)]
    return Test("call", input=args, expected=expected, alt_input=alt if alt != args else None)
