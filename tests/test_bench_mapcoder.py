"""`mcl bench mapcoder` (bench/mapcoder.py) on SmolLM2-135M and the campaign's first problem: the row's rate is its
problems over their wall time, the problems are the campaign's, and the JSON records the CPU. Needs the benchmark
data (../shared/data/benchmarks)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.miniature import MiniatureConfig, select_problems

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "benchmarks" / "mbpp" / "MBPP.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason="benchmark data not found beside the project")
def test_bench_mapcoder_times_the_campaigns_problems(tmp_path):
    out = tmp_path / "mapcoder.json"
    run = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "mapcoder", "--model", "smollm2-135m",
                          "--problems", "1", "--threads", "1", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert res["settings"]["problems"] == [select_problems(MiniatureConfig())[0][0].id]
    assert row["model"] == "smollm2-135m" and row["problems"] == 1 and row["weights"] == "q4" and row["threads"] == 1
    assert row["problems_per_hour"] == pytest.approx(3600 / row["wall_s"], rel=0.01)
    assert row["prompt_tokens"] >= row["prefill_tokens"] > 0 and row["new_tokens"] > 0
    assert res["cpu_model"] and "avx2" in res["cpu_flags"]
    assert res["command"].startswith("mcl bench mapcoder --model smollm2-135m --problems 1")
