"""MapCoder control flow against a scripted fake backend and a fake sandbox: plans run in confidence order,
debug rounds, early stop, fallback to the best program, format failures and backend errors recorded,
the baselines, and run_eval's files and summary (problems run concurrently, roles interleave).

    python -m pytest tests/agents/test_agents_mapcoder.py -q
"""
import json
import re
import threading

import pytest

from engine.agents.mapcoder import solve
import engine.agents.problem as ev
from engine.serving.backend import Completion
from eval.report import summarize
from eval.run import run_eval
from agents_fakes import ScriptedBackend, code, example_of, fake_run_tests, retrieval, step_of


def problem(pid="p0", n_samples=2, hidden=1):
    return ev.Problem(id=pid, benchmark="toy", description=f"Problem {pid}: return the answer.", entry_point="f",
                   starter_code="def f(x):\n    \"\"\"doc\"\"\"\n",
                   sample_tests=[ev.Test("assert", code=f"assert f({i}) == {i}") for i in range(n_samples)],
                   hidden_tests=[ev.Test("assert", code="assert f(9) == 9") for _ in range(hidden)])


@pytest.fixture(autouse=True)
def _reset():
    fake_run_tests.calls = []


# --- control flow -------------------------------------------------------------------------------

def test_plans_run_in_confidence_order_with_t_debug_rounds_each():
    conf = {0: 20, 1: 90, 2: 50}

    def answer(role, step, user):
        if step == "retrieve":
            return retrieval(3)
        if step == "plan":
            return f"1. Solve it like EX{example_of(user)}."
        if step == "verify":
            return f"<root><explanation>fine</explanation><confidence>{conf[example_of(user)]}</confidence></root>"
        if step == "code":
            return code(f"plan EX{example_of(user)}")
        return "1. Try again.\n" + code(f"debugged EX{example_of(user)}")      # never passes

    b = ScriptedBackend(answer)
    sol = solve(problem(), b, "mapcoder", k=3, t=2, run_tests=fake_run_tests)
    coder_order = [example_of(u) for r, s, u in b.log if s == "code"]
    assert coder_order == [1, 2, 0]
    assert [p["plan"] for p in sorted(sol.plans, key=lambda p: p["order"])] == [1, 2, 0]
    assert [p["confidence"] for p in sorted(sol.plans, key=lambda p: p["order"])] == [90, 50, 20]
    assert [s for r, s, u in b.log].count("debug") == 3 * 2
    assert [(a.plan, a.round) for a in sol.attempts] == [(i, r) for i in (1, 2, 0) for r in range(3)]
    assert not sol.solved_samples and len(fake_run_tests.calls) == 9
    # Debugger calls see the failing test report and the previous program.
    debug_user = next(u for r, s, u in b.log if s == "debug")
    assert "Test report" in debug_user and "wrong_answer" in debug_user and "# plan EX1" in debug_user
    assert all(c.role in ("retriever", "planner", "coder", "debugger") for c in sol.calls)
    assert [c.step for c in sol.calls][:7] == ["retrieve", "plan", "verify", "plan", "verify", "plan", "verify"]


def test_stops_at_first_program_that_passes_the_sample_tests():
    def answer(role, step, user):
        if step == "retrieve":
            return retrieval(2)
        if step == "plan":
            return f"1. Plan from EX{example_of(user)}."
        if step == "verify":
            return f"<root><confidence>{80 if example_of(user) == 0 else 10}</confidence></root>"
        if step == "code":
            return code("first try")
        return "1. Fixed.\n" + code("PASS", "return x")

    b = ScriptedBackend(answer)
    sol = solve(problem(), b, "mapcoder", k=2, t=3, run_tests=fake_run_tests)
    steps = [s for r, s, u in b.log]
    assert steps == ["retrieve", "plan", "verify", "plan", "verify", "code", "debug"]
    assert sol.solved_samples and "# PASS" in sol.code
    assert [(a.plan, a.round, a.verdict) for a in sol.attempts] == [(0, 0, "wrong_answer"), (0, 1, "pass")]


def test_coder_pass_needs_no_debugger_and_ties_keep_retrieval_order():
    def answer(role, step, user):
        return {"retrieve": retrieval(2), "plan": f"1. Plan EX{example_of(user)} steps.",
                "verify": "<confidence>50</confidence>", "code": code(f"PASS EX{example_of(user)}")}[step]

    b = ScriptedBackend(answer)
    sol = solve(problem(), b, "mapcoder", k=2, t=2, run_tests=fake_run_tests)
    assert [s for r, s, u in b.log].count("debug") == 0
    assert sol.solved_samples and "# PASS EX0" in sol.code


def test_no_pass_returns_program_with_most_sample_tests_latest_on_ties():
    progs = iter([code("HALF a"), code("none b"), code("HALF c"), code("none d")])

    def answer(role, step, user):
        if step == "retrieve":
            return retrieval(2)
        if step == "plan":
            return "1. Some plan here."
        if step == "verify":
            return "<confidence>60</confidence>"
        return "1. revised\n" + next(progs) if step == "debug" else next(progs)

    sol = solve(problem(n_samples=2), ScriptedBackend(answer), "mapcoder", k=2, t=1, run_tests=fake_run_tests)
    assert not sol.solved_samples
    assert "# HALF c" in sol.code                    # 1 test passed by a and c: the later one wins
    assert [a.passed for a in sol.attempts] == [1, 0, 1, 0]


def test_format_failures_are_recorded_and_the_flow_goes_on():
    def answer(role, step, user):
        return {"retrieve": "Here are some similar problems: two sum, max subarray.",   # no XML
                "plan": "1. Loop over the input and build the answer.",
                "verify": "The plan looks right to me.",                                  # no number
                "code": "I would loop over the input and return the answer.",            # no code
                "debug": "The code is empty, so nothing can pass."}[step]                 # no code

    b = ScriptedBackend(answer)
    sol = solve(problem(), b, "mapcoder", k=2, t=2, run_tests=fake_run_tests)
    status = [(c.role, c.step, c.status) for c in sol.calls]
    assert status == [("retriever", "retrieve", "failed"), ("planner", "plan", "ok"),
                      ("planner", "verify", "failed"), ("coder", "code", "failed"),
                      ("debugger", "debug", "failed")]      # a debugger answer without code ends that plan
    assert sol.plans == [{"plan": 0, "confidence": 0, "order": 0}]
    assert sol.code == "" and fake_run_tests.calls == []    # empty program: never sent to the sandbox
    assert sol.attempts[0].verdict == "no_code"
    plan_prompt = next(u for r, s, u in b.log if s == "plan")
    assert "A similar problem" not in plan_prompt          # retrieval failed: planned without an example
    assert all(c.reason for c in sol.calls if c.status == "failed")
    rec = {"passed": False, "verdict": "no_code", "calls": [vars(c) for c in sol.calls]}
    s = summarize([rec])
    assert s["format_failures"] == {"retriever": 1, "planner": 1, "coder": 1, "debugger": 1}
    assert s["format_failure_rate"]["planner"] == 0.5 and s["calls"]["planner"] == 2


def test_unparsed_plan_is_skipped_and_no_plan_means_coding_from_the_problem():
    def answer(role, step, user):
        return {"retrieve": retrieval(2), "plan": "", "code": code("PASS")}[step]

    b = ScriptedBackend(answer)
    sol = solve(problem(), b, "mapcoder", k=2, t=1, run_tests=fake_run_tests)
    assert [s for r, s, u in b.log] == ["retrieve", "plan", "plan", "code"]
    assert "(no plan: solve the problem directly)" in b.log[-1][2]
    assert sol.solved_samples and sol.plans == []


def test_backend_errors_are_not_format_failures():
    def answer(role, step, user):
        if step == "retrieve":
            return Completion("", 0, 0, 0.1, "error", error="ConnectionResetError talking to teacher")
        return {"plan": "1. A plan with steps.", "verify": "<confidence>70</confidence>", "code": code("PASS")}[step]

    sol = solve(problem(), ScriptedBackend(answer), "mapcoder", k=2, t=1, run_tests=fake_run_tests)
    assert sol.calls[0].status == "error" and "ConnectionReset" in sol.calls[0].reason
    s = summarize([{"passed": True, "verdict": "pass", "calls": [vars(c) for c in sol.calls]}])
    assert s["format_failures"]["retriever"] == 0 and s["backend_errors"] == 1
    assert sol.solved_samples


def test_problem_without_sample_tests_takes_the_first_program():
    def answer(role, step, user):
        return {"retrieve": retrieval(1), "plan": "1. Do the thing.", "verify": "<confidence>1</confidence>",
                "code": code("untested")}[step]

    sol = solve(problem(n_samples=0), ScriptedBackend(answer), "mapcoder", k=1, t=3, run_tests=fake_run_tests)
    assert "# untested" in sol.code and fake_run_tests.calls == [] and sol.attempts == []


@pytest.mark.parametrize("strategy", ["direct", "cot"])
def test_baselines_make_one_coder_call(strategy):
    b = ScriptedBackend(lambda role, step, user: "Reasoning first.\n" + code("PASS"))
    sol = solve(problem(), b, strategy, run_tests=fake_run_tests)
    assert [(r, s) for r, s, u in b.log] == [("coder", strategy)]
    assert "# PASS" in sol.code and sol.calls[0].status == "ok"
    assert fake_run_tests.calls == []                       # baselines never see the sample tests' results


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        solve(problem(), ScriptedBackend(lambda *a: ""), "reflexion")


# --- run_eval -------------------------------------------------------------------------------------

def test_run_eval_runs_problems_concurrently_and_writes_files(tmp_path):
    n, conc = 6, 3
    barrier = threading.Barrier(conc, timeout=20)     # the first `conc` retriever calls meet: truly concurrent
    seen = {"first": 0}

    def answer(role, step, user):
        if step == "retrieve":
            with b.lock:
                seen["first"] += 1
                first_wave = seen["first"] <= conc
            if first_wave:
                barrier.wait()
            return retrieval(2)
        if step == "plan":
            return "1. A plan."
        if step == "verify":
            return "<confidence>40</confidence>"
        pid = re.search(r"Problem (p\d+)", user).group(1)
        good = int(pid[1:]) % 2 == 0                       # even problems are solved
        return code("PASS" if good else "nope") if step == "code" else "1. again\n" + code("nope")

    b = ScriptedBackend(answer)
    probs = [problem(f"p{i}") for i in range(n)]
    s = run_eval(probs, b, "mapcoder", k=2, t=1, out_dir=tmp_path, concurrency=conc, run_tests=fake_run_tests,
                 model="fake", progress=False)
    assert s["n"] == n and s["passed"] == 3 and s["pass_at_1"] == 0.5
    assert s["benchmark"] == "toy" and s["strategy"] == "mapcoder" and s["model"] == "fake"
    assert set(s["format_failures"]) == {"retriever", "planner", "coder", "debugger"}
    assert s["tokens"]["planner"]["prompt"] > 0 and s["tokens"]["coder"]["completion"] > 0
    assert s["peak_mem_bytes"] > 0 and s["wall_s"] > 0
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    recs = [json.loads(l) for l in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(n)]          # sorted back into input order
    assert not (tmp_path / "problems.jsonl.partial").exists()
    r0, r1 = recs[0], recs[1]
    assert r0["passed"] and r0["verdict"] == "pass" and r0["solved_samples"]
    assert not r1["passed"] and r1["sample_attempts"][-1]["verdict"] == "wrong_answer"
    call = r1["calls"][0]
    assert {"role", "step", "prompt_tokens", "completion_tokens", "status", "wall_s", "messages", "response"} <= set(call)
    # Roles of different problems interleave: later problems retrieve after earlier ones planned.
    roles = [r for r, s_, u in b.log]
    assert roles.index("planner") < max(i for i, r in enumerate(roles) if r == "retriever")


def test_run_eval_peak_memory_is_the_runs_not_the_process_lifetimes(tmp_path):
    """A peak earlier in the process (the main job trains before it evaluates) is not the evaluation's."""
    import numpy as np
    big = np.ones(60_000_000)                               # 480 MB touched, then freed before the run
    del big
    answers = {"retrieve": retrieval(1), "plan": "1. A plan.", "verify": "<confidence>90</confidence>"}
    b = ScriptedBackend(lambda role, step, user: code("PASS") if step == "code" else answers[step])
    s = run_eval([problem("p0")], b, "mapcoder", k=1, t=1, out_dir=tmp_path, concurrency=1,
                 run_tests=fake_run_tests, progress=False)
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this system cannot reset a process's peak RSS (/proc/self/clear_refs)")
    assert s["peak_mem_kind"] == "process_peak_rss_since_eval_start"
    assert 0 < s["peak_mem_bytes"] < 400e6 + _rss_bytes()


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_run_eval_records_a_crashing_problem_and_goes_on(tmp_path, capsys):
    def answer(role, step, user):
        if "Problem bad" in user:
            raise RuntimeError("scheduler exploded")
        return {"direct": code("PASS")}[step]

    probs = [problem("ok1"), problem("bad"), problem("ok2")]
    s = run_eval(probs, ScriptedBackend(answer), "direct", out_dir=tmp_path, concurrency=2,
                 run_tests=fake_run_tests, progress=False)
    assert s["passed"] == 2 and s["problem_errors"] == 1
    recs = [json.loads(l) for l in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert recs[1]["error"] == "RuntimeError: scheduler exploded" and "Traceback" in recs[1]["traceback"]
    assert "scheduler exploded" in capsys.readouterr().err


def test_budgets_per_step():
    """One piece of work gets max_new_tokens; the retriever k examples + a tutorial; the debugger a plan and a
    whole program (like CoT)."""
    seen = []

    class Recording(ScriptedBackend):
        def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
            seen.append((step_of(role, messages[-1]["content"]), max_new_tokens))
            return super().chat(role, messages, max_new_tokens, temperature, stop)

    def answer(role, step, user):
        return {"retrieve": retrieval(2), "plan": f"1. Plan EX{example_of(user)} steps.",
                "verify": "<confidence>50</confidence>", "code": code("first try"),
                "debug": "1. Fixed.\n" + code("PASS", "return x")}[step]

    solve(problem(), Recording(answer), "mapcoder", k=2, t=1, run_tests=fake_run_tests, max_new_tokens=100)
    assert dict(seen) == {"retrieve": 300, "plan": 100, "verify": 100, "code": 100, "debug": 200}
