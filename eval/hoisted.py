"""How many of each benchmark's asserts are decided outside the candidate's process.

    python -m eval.hoisted [--data DIR]

For every benchmark whose data is in the benchmarks directory (eval/benchmarks), over all hidden tests of every
problem: the assert statements in assert/check tests, how many of them eval/harness.py's `offload_expected`
takes out of the child (their expected value stays in the parent), the constant ones (`assert True`: nothing to
decide) and the share hoisted / (asserts - constant); call and stdio tests, whose
expected values never leave the parent, are counted apart. The asserts not taken out (loops, helpers, computed
expectations) are still decided in the child, where a program could interfere with them (eval/sandbox.py).
"""
from __future__ import annotations

import argparse
import ast

from eval.benchmarks import load, splits
from eval.harness import _literal, offload_expected


def count(problems) -> dict:
    """{'asserts', 'hoisted', 'constant', 'parent_tests'} over the problems' hidden tests."""
    n = {"asserts": 0, "hoisted": 0, "constant": 0, "parent_tests": 0}
    for p in problems:
        for t in p.hidden_tests:
            if t.kind in ("call", "stdio"):
                n["parent_tests"] += 1
                continue
            try:
                asserts = [s for s in ast.walk(ast.parse(t.code)) if isinstance(s, ast.Assert)]
            except SyntaxError:
                continue
            n["asserts"] += len(asserts)
            n["constant"] += sum(_literal(a.test)[0] for a in asserts)
            n["hoisted"] += len(offload_expected(t.code, t.kind)[1])
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="the benchmarks directory (default: ../shared/data/benchmarks)")
    args = ap.parse_args(argv)
    print(f"{'benchmark':<14} {'problems':>8} {'asserts':>8} {'constant':>8} {'hoisted':>8} {'share':>7} "
          f"{'call/stdio tests':>17}")
    for name in ("humaneval", "humaneval-wst", "mbpp", "mbpp-py", "apps", "xcodeeval"):
        split = "all" if name == "mbpp" else splits(name)[0]
        try:
            problems = load(name, args.data, split)
        except FileNotFoundError:
            continue
        n = count(problems)
        decisive = n["asserts"] - n["constant"]
        share = f"{n['hoisted'] / decisive:.1%}" if decisive else "-"
        print(f"{name:<14} {len(problems):>8} {n['asserts']:>8} {n['constant']:>8} {n['hoisted']:>8} {share:>7} "
              f"{n['parent_tests']:>17}")


if __name__ == "__main__":
    main()
