"""mcl mutate: single-line bugs in the teacher's passing programs -> debugger examples with real test reports.

    python -m pytest tests/recipes/test_mutate.py -q
"""
import ast
import json

import pytest

from engine.agents import parsers
from engine.agents import problem as P
from engine.training.data import parse_line
from recipes.build_sft import build_sft
from recipes.correct import CorrectConfig, correct
from recipes.common import read_jsonl_resumable
from recipes.distill import DistillConfig, distill
from recipes.mutate import MutateConfig, mutants, mutate, plan_steps, trajectory_mutants
from recipes.trajectory import Trajectory
from recipes_fakes import PROBLEMS, FakeTeacher, run_tests_inprocess

ROLES = ("retriever", "planner", "coder", "debugger")
PROGRAM = '''def f(xs, k):
    out = []
    for i in range(len(xs) - 1):
        if xs[i] < k and not xs[i] == 0:
            out.append(min(xs[i], k) ** 2)
    return out
'''


def test_mutants_change_one_line_and_compile():
    ms = mutants(PROGRAM)
    assert {m.operator for m in ms} == {"arithmetic", "constant", "comparison", "negation", "boolean", "min/max",
                                        "arguments"}
    orig = PROGRAM.splitlines()
    for m in ms:
        new = m.code.splitlines()
        diff = [i for i, (a, b) in enumerate(zip(orig, new)) if a != b]
        assert len(new) == len(orig) and diff == [m.line - 1], m
        assert new[m.line - 1].strip() == m.bad and orig[m.line - 1].strip() == m.good
        ast.parse(m.code)
    assert len({m.code for m in ms}) == len(ms)                      # no duplicates
    assert any(m.bad == "if xs[i] <= k and not xs[i] == 0:" for m in ms)
    assert any(m.bad == "out.append(min(xs[i], k) * 2)" for m in ms)
    assert any(m.bad == "out.append(max(xs[i], k) ** 2)" for m in ms)
    assert mutants("def f(:\n  pass") == [] and mutants("") == []
    # non-ASCII text before the site: ast offsets are bytes, the mutant must still be one clean edit
    m = mutants('def g(s):\n    return "é" + s if len(s) > 1 else s\n')
    assert any(x.bad == 'return "é" + s if len(s) >= 1 else s' for x in m)


def test_plan_steps_drop_what_follows_the_steps():
    steps = "1. Split the string.\n2. Convert each part:\n   - to int\n3. Return the max."
    assert plan_steps(steps + "\n\n# Relevant algorithm\nBrute force\n") == steps
    assert plan_steps(steps + "\n\n# Plan\n" + steps) == steps
    assert plan_steps(steps + "\n\nThis works because the input is small.") == steps
    assert plan_steps("1. One.\n\n2. Two.\n") == "1. One.\n\n2. Two."      # blank lines between steps stay
    assert plan_steps("First sort, then scan.\n# Note") == "First sort, then scan.\n# Note"   # not steps: as is


def _distill(tmp_path):
    cfg = DistillConfig(out=str(tmp_path / "d"), k=1, t=1, concurrency=2)
    distill(cfg, backend=FakeTeacher(), run_tests=run_tests_inprocess, problems=PROBLEMS, progress=False)
    return tmp_path / "d" / "trajectories.jsonl"


def _mutate(tmp_path, name="m", run_tests=run_tests_inprocess, **kw):
    cfg = MutateConfig(trajectories=str(_distill(tmp_path)), out=str(tmp_path / name), **kw)
    stats = mutate(cfg, run_tests=run_tests)
    rows = [json.loads(x) for x in (tmp_path / name / "examples.jsonl").read_text().splitlines()]
    return stats, rows


def test_examples_come_from_passing_programs_and_answer_with_them(tmp_path):
    stats, rows = _mutate(tmp_path)
    trajs = {r["id"]: r for r in read_jsonl_resumable(tmp_path / "d" / "trajectories.jsonl")}
    # add (passed at once) and sub (passed after the debugger) pass every test; mul and div do not
    assert sorted(r["source"]["problem"] for r in rows) == ["fake/add", "fake/sub"]
    assert stats["reasons"]["final program fails the problem's tests"] == 2
    assert stats["examples"] == {"debugger": 2} and stats["operators"] == {"arithmetic": 2}
    for n, r in enumerate(rows):
        role, msgs = parse_line(json.dumps(r), f"examples.jsonl:{n + 1}", ROLES)
        assert role == "debugger" and [m["role"] for m in msgs] == ["system", "user", "assistant"]
        rec = trajs[r["source"]["problem"]]
        user, answer = msgs[1]["content"], msgs[2]["content"]
        bad = "a - b" if rec["id"] == "fake/add" else "a + b"
        assert f"return {bad}" in user and "1 of 1 sample tests failed" in user and "wrong_answer" in user
        d = parsers.parse_debugger(answer, entry_point=rec["problem"]["entry_point"])
        assert d and d.code.strip() == rec["code"].strip()              # the passing program, as written
        assert answer.startswith("1. ") and "#" not in answer.split("```")[0]      # the steps, no heading
    # sub was won by the debugger: its revised plan is the plan shown and given back; add's is the planner's
    sub = next(r for r in rows if r["source"]["problem"] == "fake/sub")
    assert "# Plan\n1. Fix the operator." in sub["messages"][1]["content"]
    add = next(r for r in rows if r["source"]["problem"] == "fake/add")
    program = trajs["fake/add"]["code"].rstrip()
    assert add["messages"][2]["content"] == f"1. Compute the result of add.\n2. Return it.\n\n```python\n{program}\n```"


def test_deterministic_and_seeded(tmp_path):
    a = _mutate(tmp_path, "a", per_program=3)
    b = _mutate(tmp_path, "b", per_program=3)
    assert a == b
    assert (tmp_path / "a" / "examples.jsonl").read_bytes() == (tmp_path / "b" / "examples.jsonl").read_bytes()


def _fake_rec(tmp_path, code):
    _distill(tmp_path)
    rec = next(r for r in read_jsonl_resumable(tmp_path / "d" / "trajectories.jsonl") if r["id"] == "fake/add")
    return Trajectory.from_dict(dict(rec, code=code))


def test_passing_and_timing_out_mutants_are_rejected(tmp_path):
    dead = "def add(a, b):\n    unused = 7\n    return a + b\n"             # the constant's mutant still passes
    kept, why = trajectory_mutants(_fake_rec(tmp_path, dead), MutateConfig(per_program=5), run_tests_inprocess)
    assert [e["source"]["operator"] for e in kept] == ["arithmetic"] and why["mutant passes the sample tests"] == 1

    def timeout(problem, code, tests):
        return P.TestReport("timeout", [P.TestResult("timeout", "", "")])
    kept, why = trajectory_mutants(_fake_rec(tmp_path, dead), MutateConfig(per_program=5), timeout)
    assert kept == [] and why["mutant times out"] == 2
    kept, why = trajectory_mutants(_fake_rec(tmp_path, dead), MutateConfig(max_answer_chars=50), run_tests_inprocess)
    assert kept == [] and why == {"answer longer than max_answer_chars": 1}
    kept, why = trajectory_mutants(_fake_rec(tmp_path, "def add(a, b):\n    return b\n"), MutateConfig(),
                                   run_tests_inprocess)
    assert kept == [] and why == {"no mutation site": 1}


def test_real_sandbox_and_build_sft_provenance(tmp_path):
    stats, rows = _mutate(tmp_path, run_tests=None)                   # eval.harness.run_tests: the sandbox
    assert stats["examples"] == {"debugger": 2} and stats["verdicts"] == {"wrong_answer": 2}
    ccfg = CorrectConfig(trajectories=str(tmp_path / "d" / "trajectories.jsonl"), out=str(tmp_path / "c"))
    correct(ccfg, teacher=FakeTeacher(), supervisor=FakeTeacher(), run_tests=run_tests_inprocess, progress=False)
    prov = build_sft(tmp_path / "d", tmp_path / "c", tmp_path / "sft.jsonl", mutate_dir=tmp_path / "m")
    assert prov["by_origin"]["mutation"] == {"retriever": 0, "planner": 0, "coder": 0, "debugger": 2}
    assert prov["mutation"]["rule"].startswith("mutation:") and prov["mutation"]["settings"]["per_program"] == 2
    lines = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert [json.loads(x)["source"]["origin"] for x in lines][-2:] == ["mutation", "mutation"]
    assert prov["examples"]["debugger"] == 1 + 2                      # sub's real debugger call + 2 mutants


def test_student_repairs_answer_the_students_own_debugger_calls(tmp_path):
    traj = _distill(tmp_path)
    # the student's own distill run; here the same scripted model, whose debugger runs on sub and mul only
    cfg = MutateConfig(trajectories=str(traj), student_trajectories=str(traj), out=str(tmp_path / "m"))
    stats = mutate(cfg, run_tests=run_tests_inprocess)
    rows = [json.loads(x) for x in (tmp_path / "m" / "examples.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["source"]["origin"] == "student_repair"]
    assert [r["source"]["problem"] for r in student] == ["fake/sub"]        # mul: the teacher never passed it
    assert stats["student_repair"]["reasons"] == {"kept": 1, "no passing teacher program for the problem": 1,
                                                  "student made no debugger call": 2}
    assert stats["examples"] == {"debugger": 3} and stats["mutants"] == 2
    trajs = {r["id"]: r for r in read_jsonl_resumable(traj)}
    call = next(c for c in trajs["fake/sub"]["calls"] if c["role"] == "debugger")
    assert student[0]["messages"][:-1] == call["messages"]                   # the prompt the student saw, as is
    assert "return a + b" in call["messages"][-1]["content"]                 # its failing program
    answer = student[0]["messages"][-1]["content"]
    d = parsers.parse_debugger(answer, entry_point="sub")
    assert d and d.code.strip() == trajs["fake/sub"]["code"].strip() and answer.startswith("1. ")
    assert student[0]["source"]["round"] == 1

    short = mutate(MutateConfig(trajectories=str(traj), student_trajectories=str(traj), max_prompt_tokens=1,
                                out=str(tmp_path / "m1")), run_tests=run_tests_inprocess)
    assert short["student_repair"]["reasons"]["prompt longer than max_prompt_tokens"] == 1
    assert short["student_repair"]["examples"] == 0

    prov = build_sft(tmp_path / "d", None, tmp_path / "sft.jsonl", mutate_dir=tmp_path / "m")
    assert prov["by_origin"]["student_repair"] == {"retriever": 0, "planner": 0, "coder": 0, "debugger": 1}
    assert prov["student_repair"]["rule"].startswith("student_repair:")
    assert prov["student_repair"]["student_run"]["stage"] == "distill"

    with pytest.raises(FileNotFoundError, match="student trajectories not found"):
        mutate(MutateConfig(trajectories=str(traj), student_trajectories=str(tmp_path / "nope.jsonl"),
                            out=str(tmp_path / "m2")), run_tests=run_tests_inprocess)


def test_missing_trajectories_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trajectories not found"):
        mutate(MutateConfig(trajectories=str(tmp_path / "nope.jsonl"), out=str(tmp_path / "m")))
