"""The miniature campaign (recipes/miniature.py): the problem selection, the shard plan, and a kill in the middle of
a shard followed by a resume that neither loses nor repeats a finished problem. Needs the benchmark data
(../shared/data/benchmarks); the kill test also runs SmolLM2-135M (slow).

    python -m pytest tests/recipes/test_miniature.py -q
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.miniature import MiniatureConfig, gate, plan, select_problems, sft

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "benchmarks" / "mbpp" / "MBPP.jsonl"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason="benchmark data not found beside the project")


@needs_data
def test_selection_drops_overlaps_and_is_seeded():
    cfg = MiniatureConfig()
    problems, dropped = select_problems(cfg)
    ids = [p.id for p in problems]
    assert len(ids) == len(set(ids))
    assert len(ids) + len(dropped) == 464                               # MBPP train 374 + validation 90
    assert "mbpp/821" in {d["id"] for d in dropped}                    # its statement contains test problem 263's
    assert all(d["overlaps"] for d in dropped) and not set(ids) & {d["id"] for d in dropped}
    again, _ = select_problems(MiniatureConfig())
    other, _ = select_problems(MiniatureConfig(seed=1))
    assert [p.id for p in again] == ids and [p.id for p in other] != ids


@needs_data
def test_plan_covers_every_problem_once_with_both_arms():
    cfg = MiniatureConfig()
    problems, _ = select_problems(cfg)
    shards = plan(cfg, problems)
    seen = [p.id for s in shards["trajectories"] for p in s.problems]
    assert seen == [p.id for p in problems]
    assert all([a.name for a in s.arms] == ["teacher", "student"] for s in shards["trajectories"])
    assert {a.model for s in shards["trajectories"] for a in s.arms} == {cfg.teacher, cfg.student}
    for s in shards["speed"]:
        assert [p.id for p in s.problems] == [p.id for p in problems[:cfg.speed_problems]]
        assert [(a.weights, a.tree) for a in s.arms] == [("fp32", cfg.speed_base), ("q4", cfg.speed_base), ("q4", "")]


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@needs_data
@pytest.mark.slow
def test_killed_mid_shard_resumes_without_lost_or_repeated_problems(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = [sys.executable, "-m", "engine.cli", "miniature", "run", "--shards", "1", "student=smollm2-135m",
            "teacher=smollm2-135m", "shard_size=4", "concurrency=1", "max_new_tokens=12", "threads=1",
            f"out={out}", f"work={work}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    teacher_file = work / "trajectories" / "shard-000" / "teacher" / "trajectories.jsonl"
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while len(_lines(teacher_file)) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"the campaign ended before the kill: {proc.stdout.read().decode()[-2000:]}"
    proc.kill()                                                          # SIGKILL: no cleanup of any kind
    proc.wait()
    time.sleep(2.0)                                                      # the arm dies with it (PR_SET_PDEATHSIG)
    before = _lines(teacher_file)
    time.sleep(1.0)
    assert _lines(teacher_file) == before, "the arm kept running after the campaign was killed"
    assert 1 <= len(before) < 4
    assert not (out / "trajectories" / "shard-000.json").exists()

    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    with gzip.open(out / "trajectories" / "shard-000.jsonl.gz", "rt") as f:
        records = [json.loads(x) for x in f]
    meta = json.loads((out / "trajectories" / "shard-000.json").read_text())
    for arm in ("teacher", "student"):
        ids = [r["id"] for r in records if r["arm"] == arm]
        assert ids == meta["problems"], f"{arm}: {ids} vs {meta['problems']}"          # each once, in order
    kept = {r["id"]: r for r in records if r["arm"] == "teacher"}
    for r in before:                                                     # finished before the kill: kept as written
        assert kept[r["id"]]["code"] == r["code"] and kept[r["id"]]["wall_s"] == r["wall_s"]
    assert meta["cpu_model"] and meta["commit"] and meta["threads"] == 1 and "cpu_flags" in meta
    assert meta["arms"]["teacher"]["problems_run"] == 4 - len(before)   # the resumed process ran only the rest

    cfg = MiniatureConfig(student="smollm2-135m", teacher="smollm2-135m", shard_size=4, held_out=2, out=str(out),
                          work=str(work))
    g = gate(cfg, str(tmp_path / "gate.json"))
    assert g["pass_at_1_all"]["n"] == 4
    assert g["pass_at_1_all"]["teacher"] == sum(r["passed"] for r in records if r["arm"] == "teacher")
    assert g["pass_at_1_held_out"]["n"] == 2
    stats = sft(cfg, str(tmp_path / "sft.jsonl"))                       # no model runs: the committed records only
    assert stats["problems"] == 2                                        # the 2 problems that are not held out
    assert stats["passed_hidden"] == sum(r["passed"] for r in records if r["arm"] == "teacher"
                                         and r["id"] in meta["problems"][2:])
