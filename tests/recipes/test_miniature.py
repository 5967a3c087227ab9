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


def _speed_shard(out: Path, index: int, model: str, rates: dict[str, float]) -> None:
    arms = {name: {"model": model, "weights": "fp32" if "fp32" in name else "q4", "commit": "0123456789abcdef",
                   "problems_run": 40, "passed": 12, "wall_s": 3600 * 40 / r, "problems_per_hour": r,
                   "prefix": {"prompt_tokens": 1000, "prefill_tokens": 600, "token_hit_rate": 0.4},
                   "scheduler": {"decode_tokens": 500}} for name, r in rates.items()}
    d = out / "speed"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"shard-{index:03d}.jsonl.gz").write_bytes(gzip.compress(b""))
    (d / f"shard-{index:03d}.json").write_text(json.dumps(
        {"shard": index, "cpu_model": "Test CPU", "threads": 2, "finished": "2026-12-07T00:00:00+00:00", "arms": arms}))


def test_speed_results_and_tables_come_from_the_shard_files(tmp_path):
    from recipes.miniature import markdown, speed_results
    cfg = MiniatureConfig(out=str(tmp_path))
    _speed_shard(tmp_path, 0, "qwen2.5-coder-0.5b", {"before_fp32": 100.0, "before_q4": 200.0, "after_q4": 300.0})
    _speed_shard(tmp_path, 1, "qwen2.5-coder-1.5b", {"before_fp32": 25.0, "before_q4": 50.0, "after_q4": 80.0})
    sp = speed_results(cfg)
    assert [s["model"] for s in sp] == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert sp[0]["after_q4_vs_before_fp32"] == 3.0 and sp[0]["after_q4_vs_before_q4"] == 1.5
    assert sp[1]["after_q4_vs_before_fp32"] == 3.2 and sp[1]["after_q4_vs_before_q4"] == 1.6
    assert sp[1]["arms"]["before_q4"]["token_hit_rate"] == 0.4 and sp[1]["arms"]["after_q4"]["code"] == "0123456"
    fmt = {r: [1, 10] for r in ("retriever", "planner", "coder", "debugger")}
    tok = {r: {"prompt": 1234, "completion": 56} for r in fmt}
    result = {"pass_at_1_all": {"n": 10, "teacher": 6, "student": 3, "delta_teacher_minus_student": 0.3,
                                "ci95": [0.1, 0.5], "mcnemar_p": 0.0312},
              "teacher": {"model": "T", "format_failures": fmt, "tokens": tok},
              "student": {"model": "S", "format_failures": fmt, "tokens": tok},
              "problems_per_hour": {"T": 90.5, "S": 270.0}, "cpus": ["Test CPU"], "speed": sp}
    md = markdown(result)
    assert "| all training problems | 10 | 6 (60.0%) | 3 (30.0%) | +30.0 pts [+10.0, +50.0] | 0.031 |" in md
    assert "| planner | 1/10 | 1,234 / 56 | 1/10 | 1,234 / 56 |" in md and "teacher T 90.5, student S 270.0" in md
    assert "| qwen2.5-coder-1.5b | before_fp32 | 0123456 | fp32 | 40 | 12 | 25.0 | 0.4 | 3.2x |" in md


def test_a_stopped_speed_arm_starts_over_and_a_trajectory_arm_resumes(tmp_path, monkeypatch):
    import recipes.miniature as mini
    seen = {}

    def fake_run(cmd, cwd, env, preexec_fn):                 # the arm's child process: records what it found
        assert Path(cmd[-1]).is_absolute()                  # it runs in its own tree (cwd), not the campaign's
        spec = json.loads(Path(cmd[-1]).read_text())
        assert all(Path(spec[k]).is_absolute() for k in ("problems", "out", "result"))
        seen[spec["out"]] = _lines(Path(spec["out"]) / "trajectories.jsonl")
        Path(spec["result"]).write_text(json.dumps({"problems_run": 1, "wall_s": 1.0}))
        return subprocess.CompletedProcess(cmd, 0)

    def stop(cfg, shard, arm, work):
        seen["work"] = work
        raise KeyboardInterrupt

    monkeypatch.setattr(mini, "run_arm", stop)
    monkeypatch.chdir(tmp_path)
    cfg = MiniatureConfig(out="out", work="work")                       # relative, as in recipes/miniature.toml
    with pytest.raises(KeyboardInterrupt):
        mini.run_shard(cfg, mini.Shard("speed", 0, [], [mini.Arm("a", "m", "q4")]))
    assert seen.pop("work") == tmp_path / "work" / "speed" / "shard-000"           # absolute
    monkeypatch.undo()
    monkeypatch.setattr(mini.subprocess, "run", fake_run)
    monkeypatch.setattr(mini, "git_commit", lambda tree=None: "c0ffee")
    for stage in ("speed", "trajectories"):
        shard = mini.Shard(stage, 0, [], [mini.Arm("a", "m", "q4")])
        work = tmp_path / "work" / stage / shard.name
        (work / "a").mkdir(parents=True, exist_ok=True)
        (work / "a" / "trajectories.jsonl").write_text(json.dumps({"id": "p1"}) + "\n")
        mini.run_arm(cfg, shard, shard.arms[0], work)
        assert seen[str(work / "a")] == ([] if stage == "speed" else [{"id": "p1"}])


@needs_data
def test_run_index_picks_one_shard_of_a_stage(tmp_path, monkeypatch):
    import recipes.miniature as mini
    ran = []
    monkeypatch.setattr(mini, "run_shard", lambda cfg, s: ran.append((s.stage, s.index)) or
                        {"arms": {"a": {"passed": 0, "problems_per_hour": 1.0}}, "cpu_model": "x"})
    cfg = MiniatureConfig(out=str(tmp_path / "out"), work=str(tmp_path / "work"))
    assert mini.run(cfg, "speed", index=1) == 1 and ran == [("speed", 1)]
    with pytest.raises(ValueError, match="shards 0..1, not 2"):
        mini.run(cfg, "speed", index=2)
    with pytest.raises(ValueError, match="needs --stage"):
        mini.run(cfg, index=0)


def test_correction_shards_take_the_students_failures_outside_the_held_out_problems(tmp_path):
    from engine.agents.problem import Problem
    from recipes.miniature import correction_shards
    problems = [Problem(id=f"p{i}", benchmark="toy", description=f"problem {i}") for i in range(8)]
    cfg = MiniatureConfig(out=str(tmp_path), held_out=2, shard_size=4)
    d = tmp_path / "trajectories"
    d.mkdir()
    passed = {"p0": False, "p1": True, "p2": False, "p3": True, "p4": False, "p5": False, "p6": True, "p7": True}
    for i in (0, 1):                                   # two finished trajectory shards
        ids = [f"p{4 * i + j}" for j in range(4)]
        recs = [{"arm": arm, "id": pid, "passed": passed[pid] if arm == "student" else True}
                for arm in ("teacher", "student") for pid in ids]
        (d / f"shard-{i:03d}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
        (d / f"shard-{i:03d}.json").write_text(json.dumps({"shard": i}))
    shards = correction_shards(cfg, problems)
    assert [(s.index, [p.id for p in s.problems]) for s in shards] == [(0, ["p2"]), (1, ["p4", "p5"])]   # p0 held out
    arm = shards[0].arms[0]
    assert (arm.task, arm.model, arm.supervisor, arm.weights) == ("correct", cfg.student, cfg.teacher, cfg.weights)
    (d / "shard-001.json").unlink()                    # an unfinished trajectory shard has no correction shard yet
    assert [s.index for s in correction_shards(cfg, problems)] == [0]


@needs_data
@pytest.mark.slow
def test_corrections_stage_runs_on_the_committed_student_records(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    common = ["student=smollm2-135m", "teacher=smollm2-135m", "shard_size=4", "held_out=2", "concurrency=2",
              "max_new_tokens=12", "threads=1", f"out={out}", f"work={work}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for stage in ("trajectories", "corrections"):
        r = subprocess.run([sys.executable, "-m", "engine.cli", "miniature", "run", "--stage", stage, "--shards", "1",
                            *common], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with gzip.open(out / "trajectories" / "shard-000.jsonl.gz", "rt") as f:
        traj = [json.loads(x) for x in f]
    meta = json.loads((out / "trajectories" / "shard-000.json").read_text())
    failed = [t["id"] for t in traj if t["arm"] == "student" and not t["passed"] and t["id"] in meta["problems"][2:]]
    with gzip.open(out / "corrections" / "shard-000.jsonl.gz", "rt") as f:
        corr = [json.loads(x) for x in f]
    cmeta = json.loads((out / "corrections" / "shard-000.json").read_text())
    assert [c["id"] for c in corr] == failed == cmeta["problems"] and failed       # 12 tokens: nothing passes
    assert all(c["arm"] == "correct" and "success" in c and "attempts" in c for c in corr)
    stats = cmeta["arms"]["correct"]["stats"]
    assert stats["trajectories"] == len(failed) and cmeta["arms"]["correct"]["problems_run"] == len(failed)
    assert cmeta["arms"]["correct"]["supervisor_scheduler"]["prompt_tokens"] > 0 or stats["attempted"] == 0


@needs_data
def test_sft_adds_the_committed_corrections_unless_asked_not_to(tmp_path):
    cfg = MiniatureConfig(out=str(tmp_path / "out"))
    problems, _ = select_problems(cfg)
    held, kept = problems[0].id, problems[60].id
    def ex(pid, text):
        return {"role": "coder", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": pid},
                                              {"role": "assistant", "content": text}],
                "source": {"origin": "correct", "problem": pid}}
    recs = [{"arm": "correct", "id": kept, "success": True, "examples": [ex(kept, "fixed"), ex(kept, "fixed")]},
            {"arm": "correct", "id": held, "success": True, "examples": [ex(held, "never trained on")]}]
    d = tmp_path / "out" / "corrections"
    d.mkdir(parents=True)
    (d / "shard-005.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    (d / "shard-005.json").write_text(json.dumps({"shard": 5}))
    stats = sft(cfg, str(tmp_path / "sft.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [e["messages"][-1]["content"] for e in lines] == ["fixed"]        # duplicates and held-out dropped
    assert stats["corrections"] == {"records": 1, "corrected": 1,
                                    "examples": {"retriever": 0, "planner": 0, "coder": 2, "debugger": 0}}
    sft(cfg, str(tmp_path / "sft0.jsonl"), corrections=False)
    assert (tmp_path / "sft0.jsonl").read_text() == ""
