"""CodeContests (DeepMind) in its public/private/generated test format. No data ships with the project:
point `path` at a JSONL file (one problem per line, the fields of the Hugging Face dataset
deepmind/code_contests), or at a directory holding codecontests/{split}.jsonl.

    from eval.benchmarks import codecontests
    problems = codecontests.load("cc_test.jsonl", limit=20)

Each line: {"name", "description", "public_tests": {"input": [...], "output": [...]}, "private_tests": ...,
"generated_tests": ..., "time_limit": {"seconds", "nanos"} (optional), "solutions": {"language": [...],
"solution": [...]} (optional), "difficulty", "cf_rating", ...}.
sample_tests = public tests; hidden_tests = public + private + generated (AlphaCode's "passes all
tests"; generated=False leaves the generated ones out). reference = the first Python 3 solution
(language id 3), if any. time_limit_s = max(5, 3 x the problem's limit), as for xCodeEval.
"""
from __future__ import annotations

import json
import os

from eval.benchmarks.data import data_dir, take
from engine.agents.problem import Problem, Test

PYTHON3 = 3   # CodeContests language ids: 1 Python 2, 2 C++, 3 Python 3, 4 Java


def load(path: str | None = None, split: str = "test", limit: int | None = None,
         generated: bool = True) -> list[Problem]:
    file = path if path and os.path.isfile(path) else os.path.join(path or data_dir(), "codecontests", f"{split}.jsonl")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"CodeContests data not found: {file}. None ships with the project: convert the "
                                f"Hugging Face deepmind/code_contests split to JSONL and pass its path.")
    problems = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                problems.append(_problem(json.loads(line), f"{file}:{lineno}", generated))
            if limit is not None and len(problems) >= limit:
                break
    return take(problems, limit)


def _tests(row: dict, key: str, where: str) -> list[Test]:
    block = row.get(key) or {"input": [], "output": []}
    ins, outs = block.get("input", []), block.get("output", [])
    if len(ins) != len(outs):
        raise ValueError(f"{where}: {key} has {len(ins)} inputs but {len(outs)} outputs")
    return [Test("stdio", input=i, expected=o) for i, o in zip(ins, outs)]


def _problem(row: dict, where: str, generated: bool) -> Problem:
    for key in ("name", "description"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    public = _tests(row, "public_tests", where)
    hidden = public + _tests(row, "private_tests", where) + (_tests(row, "generated_tests", where) if generated else [])
    if not hidden:
        raise ValueError(f"{where}: problem {row['name']!r} has no tests")
    sols = row.get("solutions") or {}
    reference = next((s for lang, s in zip(sols.get("language", []), sols.get("solution", [])) if lang == PYTHON3), None)
    tl = row.get("time_limit") or {}
    seconds = float(tl.get("seconds", 0) or 0) + float(tl.get("nanos", 0) or 0) / 1e9
    return Problem(id=f"codecontests/{row['name']}", benchmark="codecontests", description=row["description"],
                   sample_tests=public, hidden_tests=hidden, reference=reference,
                   time_limit_s=max(5.0, 3 * seconds),
                   meta={"difficulty": row.get("difficulty"), "cf_rating": row.get("cf_rating"),
                         "source": row.get("source"), "memory_limit_bytes": row.get("memory_limit_bytes")})
