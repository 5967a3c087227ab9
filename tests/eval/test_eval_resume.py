"""A killed `mcl eval` resumes: SIGKILL a run mid-way, rerun it, and every problem has exactly one record, the same
verdicts as an uninterrupted run, with only the unfinished problems solved again; other settings are refused.

    python -m pytest tests/eval/test_eval_resume.py -q
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "agents"))

from agents_fakes import ScriptedBackend, code, fake_run_tests  # noqa: E402

import engine.agents.problem as ev  # noqa: E402
from eval.run import run_eval  # noqa: E402

N = 8
RUN = """
import sys, time
sys.path[:0] = [{repo!r}, {fakes!r}]
from test_eval_resume import problems, answer
from agents_fakes import ScriptedBackend, fake_run_tests
from eval.run import run_eval
def slow(role, step, user):
    time.sleep(0.4)
    return answer(role, step, user)
run_eval(problems(), ScriptedBackend(slow), "direct", out_dir={out!r}, concurrency=1, run_tests=fake_run_tests,
         progress=False)
"""


def problems():
    return [ev.Problem(id=f"p{i}", benchmark="toy", description=f"Problem p{i}: return x.", entry_point="f",
                       sample_tests=[ev.Test("assert", code="assert f(1) == 1")],
                       hidden_tests=[ev.Test("assert", code="assert f(9) == 9")]) for i in range(N)]


def answer(role, step, user):
    pid = int(user.split("Problem p")[1].split(":")[0])
    return code("PASS" if pid % 3 else "nope")


def _records(out):
    return [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]


def test_a_killed_eval_resumes_without_duplicates_or_losses(tmp_path):
    straight = tmp_path / "straight"
    run_eval(problems(), ScriptedBackend(answer), "direct", out_dir=straight, concurrency=2,
             run_tests=fake_run_tests, progress=False)

    out = tmp_path / "killed"
    script = RUN.format(repo=str(REPO), fakes=str(REPO / "tests" / "eval"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    partial = out / "problems.jsonl.partial"
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or len(partial.read_text().splitlines()) < 3):
        assert proc.poll() is None, "the eval to be killed ended on its own"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = partial.read_text().splitlines()
    assert 3 <= len(kept) < N
    with open(partial, "a") as f:                          # a record the kill cut in half
        f.write(kept[-1][: len(kept[-1]) // 2])

    resumed = ScriptedBackend(answer)
    s = run_eval(problems(), resumed, "direct", out_dir=out, concurrency=2, run_tests=fake_run_tests,
                 progress=False)
    done_before = {json.loads(line)["id"] for line in kept}
    solved_now = {user.split("Problem ")[1].split(":")[0] for _, _, user in resumed.log}
    assert solved_now == {f"p{i}" for i in range(N)} - done_before          # only the unfinished ones again
    recs = _records(out)
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(N)]            # each once, in order
    assert [r["passed"] for r in recs] == [r["passed"] for r in _records(straight)]
    assert s["n"] == N and s["resumed_problems"] == len(done_before)
    assert not partial.exists() and not (out / "run.json").exists()


def test_an_interrupted_eval_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"benchmark": "toy", "strategy": "direct", "model": "", "k": 3, "t": 2,
                                              "max_new_tokens": 384, "problems": [f"p{i}" for i in range(N)]}))
    (out / "problems.jsonl.partial").write_text("")
    with pytest.raises(ValueError, match=r"other settings \(k differ\)"):
        run_eval(problems(), ScriptedBackend(answer), "direct", out_dir=out, k=2, run_tests=fake_run_tests,
                 progress=False)
