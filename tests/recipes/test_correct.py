"""mcl correct: the supervisor's verdict is parsed robustly; the blamed agent regenerates with the feedback;
corrected trajectories become examples with the ORIGINAL prompts; a teacher/supervisor that answers garbage,
times out or drops the connection is counted, never fatal (distill and correct, over real HTTP).

    python -m pytest tests/recipes/test_correct.py -q
"""
import json

import pytest

from engine.serving.http_server import serve
from recipes.correct import CorrectConfig, correct, parse_verdict
from recipes.common import read_jsonl_resumable
from recipes.distill import DistillConfig, distill
from recipes_fakes import PROBLEMS, FakeTeacher, misbehaving_handler, run_tests_inprocess


@pytest.mark.parametrize("text, agent, feedback", [
    ("<root>\n<agent>coder</agent>\n<feedback>Multiply.</feedback>\n</root>", "coder", "Multiply."),
    ("```xml\n<root><agent> Planner </agent><feedback>The plan misses n = 0.", "planner", "The plan misses n = 0."),
    ("<root><faulty_agent>the coding agent</faulty_agent><feedback>off by one</feedback></root>", "coder", "off by one"),
    ("The planner is at fault: the plan sorts in the wrong order. Sort descending.", "planner", None),
    ("Agent at fault: coder\nFeedback: the loop stops one element early.", "coder", None),
    ("The mistake was made by the coder, who forgot to return the result.", "coder", None),
    ("The plan is fine. The coder forgot the edge case of an empty list.", "coder", None),
])
def test_parse_verdict(text, agent, feedback):
    v = parse_verdict(text)
    assert v and v.agent == agent, v
    if feedback is not None:
        assert v.feedback == feedback
    assert v.feedback


@pytest.mark.parametrize("text", ["", "   ", "I don't know.", "Both the planner and the coder made mistakes.",
                                  None, 42, "<root><agent>tester</agent></root>",
                                  # the 0.5B supervisor copying the output template (seen in the real run)
                                  "<root>\n<agent>planner or coder</agent>\n<feedback>the plan is wrong or incomplete, "
                                  "so a program that follows it faithfully would still fail</feedback>\n</root>",
                                  "<root><agent>coder</agent><feedback>what is wrong and how to fix it</feedback></root>",
                                  "<root><agent>coder</agent><feedback> </feedback></root>"])
def test_parse_verdict_failures_never_raise(text):
    assert not parse_verdict(text)


def distill_fake(tmp_path, backend=None, **kw):
    cfg = DistillConfig(out=str(tmp_path / "distill"), k=1, t=1, concurrency=2, **kw)
    return distill(cfg, backend=backend or FakeTeacher(), run_tests=run_tests_inprocess, problems=PROBLEMS,
                   progress=False)


def test_correction_blames_regenerates_and_keeps_original_prompts(tmp_path):
    distill_fake(tmp_path)
    teacher = FakeTeacher()
    cfg = CorrectConfig(trajectories=str(tmp_path / "distill" / "trajectories.jsonl"), out=str(tmp_path / "c"),
                        rounds=2, concurrency=2)
    s = correct(cfg, teacher=teacher, supervisor=teacher, run_tests=run_tests_inprocess, progress=False)
    assert s["failed_trajectories"] == 2 and s["attempted"] == 2          # mul (coder) and div (planner)
    assert s["blame"] == {"planner": 1, "coder": 1} and s["verdict_found_by"] == {"tag": 1, "phrase": 1}
    assert s["successes"] == 2 and s["successes_by_blame"] == {"planner": 1, "coder": 1}
    # the blamed agent saw the feedback as a follow-up turn after its own previous answer
    fb = [(r, m) for r, m in teacher.log if "A reviewer checked your answer" in m[-1]["content"]]
    assert sorted(r for r, _ in fb) == ["coder", "planner"]
    assert all(m[-2]["role"] == "assistant" and "must multiply" in m[-1]["content"] or "true division" in m[-1]["content"]
               for _, m in fb)
    exs = [json.loads(x) for x in (tmp_path / "c" / "examples.jsonl").read_text().splitlines()]
    assert s["examples"] == {"retriever": 2, "planner": 3, "coder": 2, "debugger": 0}
    for e in exs:                                       # training prompts never contain feedback or the supervisor
        assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
        assert "reviewer" not in json.dumps(e["messages"]) and e["source"]["origin"] == "correct"
    code = {e["source"]["problem"]: e["messages"][-1]["content"] for e in exs if e["role"] == "coder"}
    assert "a * b" in code["fake/mul"] and "a / b" in code["fake/div"]
    plan = [e for e in exs if e["role"] == "planner" and e["source"]["problem"] == "fake/div"]
    assert len(plan) == 1 and "true division" in plan[0]["messages"][-1]["content"]      # the regenerated plan
    assert "# Plan\n1. Use true division" in [e for e in exs if e["role"] == "coder" and
                                              e["source"]["problem"] == "fake/div"][0]["messages"][1]["content"]
    # resumable: a rerun does nothing new and writes the same examples
    s2 = correct(cfg, teacher=object(), supervisor=object(), run_tests=run_tests_inprocess, progress=False)
    assert s2 == s


def test_garbage_supervisor_and_teacher_are_counted(tmp_path):
    distill_fake(tmp_path)
    cfg = CorrectConfig(trajectories=str(tmp_path / "distill" / "trajectories.jsonl"), out=str(tmp_path / "c"))
    s = correct(cfg, teacher=FakeTeacher(), supervisor=FakeTeacher(bad_roles={"supervisor"}),
                run_tests=run_tests_inprocess, progress=False)
    assert s["successes"] == 0 and s["failures"] == {"supervisor verdict not parsed": 2}
    cfg.out = str(tmp_path / "c2")
    s = correct(cfg, teacher=FakeTeacher(bad_roles={"coder", "planner"}), supervisor=FakeTeacher(),
                run_tests=run_tests_inprocess, progress=False)
    assert s["successes"] == 0 and sum(s["blame"].values()) == 2
    assert s["failures"] == {"regenerated plan: format failure": 1, "regenerated program: format failure": 1}


def test_a_teacher_that_misbehaves_over_http_never_crashes_a_recipe(tmp_path):
    """Every kind of misbehaviour, cycling; distill then correct against it, over real sockets."""
    modes = ["ok", "garbage", "ok", "timeout", "ok", "drop", "nojson", "ok", "500", "ok"]
    server = serve(None, handler=misbehaving_handler(modes, good=FakeTeacher(), sleep_s=1.0))
    try:
        url = dict(teacher_url=server.url, teacher_model="teacher", timeout_s=0.3, retries=0)
        s = distill(DistillConfig(out=str(tmp_path / "d"), k=1, t=1, concurrency=1, **url),
                    run_tests=run_tests_inprocess, problems=PROBLEMS, progress=False)
        assert s["problems"] == 4 and s["problem_errors"] == 0 and s["backend_errors"] >= 4
        trajs = read_jsonl_resumable(tmp_path / "d" / "trajectories.jsonl")
        reasons = " ".join(c["reason"] for r in trajs for c in r["calls"] if c["status"] == "error")
        assert "timed out" in reasons and "bad response body" in reasons and "HTTP 500" in reasons
        for sup in ("", server.url):                    # the same endpoint as teacher and as supervisor
            c = correct(CorrectConfig(trajectories=str(tmp_path / "d" / "trajectories.jsonl"),
                                      out=str(tmp_path / f"c{len(sup)}"), supervisor_url=sup, rounds=2,
                                      concurrency=2, **url), run_tests=run_tests_inprocess, progress=False)
            assert c["trajectories"] == c["failed_trajectories"] >= 1
            assert not any(k.startswith("exception") for k in c["failures"])
        # an endpoint that always answers garbage: every call is a counted error, the run completes
        bad = serve(None, handler=misbehaving_handler(["garbage", "drop", "500"]))
        try:
            s = distill(DistillConfig(out=str(tmp_path / "bad"), k=1, t=1, concurrency=2, teacher_url=bad.url,
                                      timeout_s=0.3, retries=0), run_tests=run_tests_inprocess, problems=PROBLEMS,
                        progress=False)
            assert s["examples_total"] == 0 and s["backend_errors"] == sum(s["calls"].values()) > 0
        finally:
            bad.shutdown()
            bad.server_close()
    finally:
        server.shutdown()
        server.server_close()


def test_the_fallback_regenerates_where_the_first_regenerator_fails(tmp_path):
    """The paper's order: the student answers the feedback first; where its program still fails, the stronger
    model answers the same feedback from the same point. The record says who corrected each trajectory."""
    distill_fake(tmp_path)
    src = str(tmp_path / "distill" / "trajectories.jsonl")
    weak, strong = FakeTeacher(bad_roles={"coder", "planner"}), FakeTeacher()
    cfg = CorrectConfig(trajectories=src, out=str(tmp_path / "c"), teacher="student-model", fallback="teacher-model")
    s = correct(cfg, teacher=weak, supervisor=strong, fallback=strong, run_tests=run_tests_inprocess, progress=False)
    assert s["successes"] == 2 and s["successes_by_regenerator"] == {"teacher-model": 2}
    assert s["examples"]["coder"] == 2 and not s["failures"]
    assert {r for r, _ in weak.log} == {"coder", "planner"}                 # the student was asked first
    recs = {r["id"]: r for r in read_jsonl_resumable(tmp_path / "c" / "corrections.jsonl")}
    assert {r["corrected_by"] for r in recs.values()} == {"teacher-model"}
    div = recs["fake/div"]["attempts"][0]["regenerated"]                   # planner blamed: plan (+ coder) each
    assert [(g["by"], g["role"], g["status"]) for g in div] == [("student-model", "planner", "failed"),
                                                                ("teacher-model", "planner", "ok"),
                                                                ("teacher-model", "coder", "ok")]
    good = CorrectConfig(trajectories=src, out=str(tmp_path / "c2"), teacher="student-model", fallback="teacher-model")
    s = correct(good, teacher=FakeTeacher(), supervisor=strong, fallback=weak, run_tests=run_tests_inprocess,
                progress=False)
    assert s["successes_by_regenerator"] == {"student-model": 2}             # no fallback needed
