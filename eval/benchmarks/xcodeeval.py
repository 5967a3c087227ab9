"""xCodeEval program synthesis, the 106-problem validation subset MapCoder reports on (Codeforces,
stdin/stdout).

    from eval.benchmarks import xcodeeval
    problems = xcodeeval.load()    # ../shared/data/benchmarks/xcodeeval/prog_syn_val.jsonl

Only the statement's sample tests are public here (xCodeEval's hidden unittest_db.json is not), so
hidden_tests are the sample tests too and every problem carries meta["hidden_tests"] = "none": a pass@1
on this benchmark is a pass@1 on sample tests, and eval/report.py says so.
description = statement + input spec + output spec + note. time_limit_s = max(5, 3 x the Codeforces
limit): the limits are set for C++, and this is Python in a sandbox. The memory limit is kept in meta
only (the sandbox applies its own address-space limit). Problems with several correct outputs need a
checker this harness does not have: they are compared exactly (token-wise, floats within 1e-6).
"""
from __future__ import annotations

import json
import re

from eval.benchmarks.data import data_file, take
from engine.agents.problem import Problem, Test

FILE = "xcodeeval/prog_syn_val.jsonl"


def load(path: str | None = None, split: str = "validation", limit: int | None = None) -> list[Problem]:
    file = data_file(path, FILE)
    problems = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                problems.append(_problem(json.loads(line), f"{file}:{lineno}"))
    return take(problems, limit)


def _seconds(text: str, where: str) -> float:
    m = re.match(r"\s*([\d.]+)\s*seconds?", text or "")
    if not m:
        raise ValueError(f"{where}: time_limit {text!r} is not 'N seconds'")
    return float(m.group(1))


def _problem(row: dict, where: str) -> Problem:
    ins, outs = row["sample_inputs"], row["sample_outputs"]
    if len(ins) != len(outs) or not ins:
        raise ValueError(f"{where}: {len(ins)} sample_inputs but {len(outs)} sample_outputs")
    tests = [Test("stdio", input=i if i.endswith("\n") else i + "\n", expected=o) for i, o in zip(ins, outs)]
    parts = [row["description"], "Input\n" + (row.get("input_spec") or ""), "Output\n" + (row.get("output_spec") or "")]
    if row.get("notes"):
        parts.append(row["notes"])
    return Problem(id=f"xcodeeval/{row['src_uid']}", benchmark="xcodeeval", description="\n\n".join(parts),
                   sample_tests=tests, hidden_tests=list(tests),
                   time_limit_s=max(5.0, 3 * _seconds(row.get("time_limit", ""), where)),
                   meta={"hidden_tests": "none", "src_uid": row["src_uid"], "tags": row.get("tags"),
                         "difficulty": row.get("difficulty"), "time_limit": row.get("time_limit"),
                         "memory_limit": row.get("memory_limit")})
