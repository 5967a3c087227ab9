"""Check that no evaluation problem occurs in any training file, by normalised statement.

A problem's statement (its description, for HumanEval the prompt's signature and docstring) is normalised: lower case,
every run of non-alphanumeric characters one space. A training file (JSONL, optionally gzipped: SFT examples,
trajectories) is contaminated by a problem when the normalised statement occurs inside the normalised text of any one
record (all its string values joined), which also catches a statement quoted inside a longer prompt.

    python -m eval.decontaminate recipes/data/*.jsonl* --benchmark humaneval mbpp:test
    # exit 1 and one line per hit (benchmark problem id, file:line) when an evaluation problem is in the data
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

from engine.agents.problem import Problem

MIN_CHARS = 24          # statements shorter than this after normalising are too generic to match on


def normalise(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def records(path: Path):
    """(line number, normalised text of the record) for each JSON line of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                yield lineno, normalise(" ".join(_strings(row)))


def find_overlaps(train_files: list[Path], problems: list[Problem]) -> list[tuple[str, str]]:
    """[(problem id, "file:line")] for every evaluation problem found inside a training record."""
    needles = [(p.id, normalise(p.description)) for p in problems]
    too_short = [pid for pid, s in needles if len(s) < MIN_CHARS]
    if too_short:
        raise ValueError(f"statements too short to check reliably: {too_short[:5]}")
    hits = []
    for path in train_files:
        for lineno, text in records(path):
            hits += [(pid, f"{path}:{lineno}") for pid, s in needles if s in text]
    return hits


def _load(spec: str) -> list[Problem]:
    from eval.benchmarks import load
    name, _, split = spec.partition(":")
    return load(name, split=split or None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train", nargs="+", type=Path, help="training files (.jsonl or .jsonl.gz)")
    ap.add_argument("--benchmark", nargs="+", default=["humaneval", "mbpp:test"],
                    help="evaluation sets as name[:split] (default: humaneval mbpp:test)")
    args = ap.parse_args(argv)
    problems = [p for spec in args.benchmark for p in _load(spec)]
    hits = find_overlaps(args.train, problems)
    for pid, where in hits:
        print(f"contaminated: {pid} in {where}")
    print(f"checked {len(problems)} evaluation statements against {len(args.train)} training files: "
          f"{len({pid for pid, _ in hits})} found")
    return 1 if hits else 0


if __name__ == "__main__":
    sys.exit(main())
