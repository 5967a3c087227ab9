"""mcl distill: which calls become examples, resume after a kill, same seed -> same examples, config errors.

    python -m pytest tests/recipes/test_distill.py -q
"""
import json
import os
from pathlib import Path

import pytest

from engine.training.data import parse_line
from recipes.common import load_config, read_jsonl_resumable
from recipes.distill import DistillConfig, build_examples, distill, load_problems, trajectory_examples
from recipes.trajectory import Trajectory
from recipes_fakes import PROBLEMS, FakeTeacher, run_tests_inprocess, tiny_local_backend

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"


def run(tmp_path, name="d", problems=PROBLEMS, backend=None, **kw):
    cfg = DistillConfig(out=str(tmp_path / name), k=1, t=1, concurrency=kw.pop("concurrency", 2), **kw)
    stats = distill(cfg, backend=backend or FakeTeacher(), run_tests=run_tests_inprocess, problems=problems,
                    progress=False)
    lines = (tmp_path / name / "examples.jsonl").read_text().splitlines()
    return stats, [json.loads(x) for x in lines], cfg


def call(**kw):
    """A recorded agent call (engine.agents.mapcoder.Call as distill writes it): kw over neutral defaults."""
    return {"role": "coder", "step": "code", "prompt_tokens": 0, "completion_tokens": 0, "wall_s": 0.0,
            "status": "ok", "reason": "", "repairs": [], "finish_reason": "stop", "plan": None, "round": None,
            "messages": [], "response": "", **kw}


def by(examples, pid):
    return sorted((e["role"], e["source"]["step"]) for e in examples if e["source"]["problem"] == pid)


def test_which_calls_become_examples(tmp_path):
    stats, exs, _ = run(tmp_path)
    # add: right at once -> retriever, plan, confidence, coder
    assert by(exs, "fake/add") == [("coder", "code"), ("planner", "plan"), ("planner", "verify"), ("retriever", "retrieve")]
    # sub: the debugger fixed it -> the debugger call, not the coder's failing program
    assert by(exs, "fake/sub") == [("debugger", "debug"), ("planner", "plan"), ("planner", "verify"),
                                   ("retriever", "retrieve")]
    # mul fails everywhere, div passes the sample test but not the problem's tests -> nothing
    assert by(exs, "fake/mul") == [] and by(exs, "fake/div") == []
    assert stats["examples"] == {"retriever": 2, "planner": 4, "coder": 1, "debugger": 1}
    assert stats["passed_hidden"] == 2 and stats["solved_samples"] == 3
    assert stats["rejected"]["coder"]["program failed the sample tests (debugged later)"] == 1
    assert stats["rejected"]["coder"]["final program fails the problem's tests"] == 2
    for n, line in enumerate((tmp_path / "d" / "examples.jsonl").read_text().splitlines()):
        role, msgs = parse_line(line, f"examples.jsonl:{n + 1}", ("retriever", "planner", "coder", "debugger"))
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[-1]["content"].strip()
    # accept="samples": div's trajectory (sample tests pass) now counts
    stats_s, exs_s, _ = run(tmp_path, "s", accept="samples")
    assert by(exs_s, "fake/div") == [("coder", "code"), ("planner", "plan"), ("planner", "verify"),
                                     ("retriever", "retrieve")]


def test_format_failures_and_backend_errors_are_rejected():
    rec = {"id": "p", "passed": True, "solved_samples": True, "error": None, "code": "x",
           "sample_attempts": [{"plan": 1, "round": 0, "verdict": "pass", "passed": 1, "total": 1}],
           "calls": [
               call(role="retriever", step="retrieve", status="repaired",
                    messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], response="r"),
               call(role="planner", step="plan", status="failed", plan=0),
               call(role="planner", step="plan", status="ok", plan=1, messages=[{"role": "user", "content": "u"}],
                    response="1. do it<|im_end|>"),
               call(role="coder", step="code", status="error", plan=1),
           ]}
    kept, rej = trajectory_examples(Trajectory.from_dict(rec))
    assert [(e["role"], e["messages"][-1]["content"]) for e in kept] == [("retriever", "r"), ("planner", "1. do it")]
    assert rej == {("planner", "format failure"): 1, ("coder", "backend error"): 1}
    rec["error"] = "boom"
    kept, rej = trajectory_examples(Trajectory.from_dict(rec))
    assert kept == [] and sum(rej.values()) == 4


def test_resume_after_kill_gives_the_same_examples_without_duplicates(tmp_path):
    _, full, _ = run(tmp_path, "full")
    # a run killed after one problem, in the middle of writing the second
    _, _, cfg = run(tmp_path, "killed", problems=PROBLEMS[:2])
    traj = tmp_path / "killed" / "trajectories.jsonl"
    lines = traj.read_text().splitlines(keepends=True)
    traj.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    teacher = FakeTeacher()
    _, resumed, _ = run(tmp_path, "killed", backend=teacher)
    ids = [r["id"] for r in read_jsonl_resumable(traj)]
    assert sorted(ids) == sorted(p.id for p in PROBLEMS) and len(ids) == len(set(ids))
    assert not any(PROBLEMS[0].entry_point + "(a, b)" in m[-1]["content"] for _, m in teacher.log), "redid a done problem"
    assert resumed == full
    # a rerun with nothing left to do calls no teacher at all and changes nothing
    _, again, _ = run(tmp_path, "killed", backend=object())
    assert again == full


def test_rerun_with_other_settings_is_refused(tmp_path):
    run(tmp_path, "x", problems=PROBLEMS[:1])
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        run(tmp_path, "x", problems=PROBLEMS[:1], max_new_tokens=99)


def test_same_seed_same_examples_real_engine_tiny_model(tmp_path):
    """The local engine path (LocalBackend -> Scheduler -> tiny random model, greedy): two runs, one with 1
    problem in flight and one with 4, record identical trajectories and examples."""
    outs = []
    for name, conc in (("a", 1), ("b", 4)):
        backend = tiny_local_backend(n_slots=conc)
        try:
            stats, exs, _ = run(tmp_path, name, backend=backend, concurrency=conc, max_new_tokens=12)
        finally:
            backend.close()
        trajs = sorted(read_jsonl_resumable(tmp_path / name / "trajectories.jsonl"), key=lambda r: r["index"])
        outs.append(([[(c["role"], c["response"]) for c in r["calls"]] for r in trajs], exs, stats["examples"]))
    assert outs[0][0] and all(calls for calls in outs[0][0])
    assert any(resp for calls in outs[0][0] for _, resp in calls), "the tiny model said nothing"
    assert outs[0] == outs[1]
    # random weights fail every format: no examples, and the rejections say why
    assert outs[0][2] == {"retriever": 0, "planner": 0, "coder": 0, "debugger": 0}


def test_build_examples_is_pure_and_deduplicates(tmp_path):
    run(tmp_path)
    trajs = sorted(map(Trajectory.from_dict, read_jsonl_resumable(tmp_path / "d" / "trajectories.jsonl")),
                   key=lambda t: t.index)
    a, sa = build_examples(trajs)
    b, sb = build_examples(trajs + trajs)                  # the same trajectories twice: duplicates dropped
    assert a == b and sa["examples"] == sb["examples"]
    assert sb["rejected"]["retriever"]["duplicate"] == 2


def test_config_toml_and_overrides(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[distill]\nn_problems = 40\nteacher = "qwen2.5-coder-0.5b"\ntimeout_s = 5\n[train]\nsteps = 3\n')
    cfg = load_config(DistillConfig, str(toml), "distill", ["k=2", "distill.out=runs/x", "split=validation"])
    assert (cfg.n_problems, cfg.k, cfg.out, cfg.split, cfg.timeout_s) == (40, 2, "runs/x", "validation", 5.0)
    with pytest.raises(ValueError, match="unknown key 'kk'"):
        load_config(DistillConfig, str(toml), "distill", ["kk=2"])
    with pytest.raises(ValueError, match="expected int"):
        load_config(DistillConfig, None, "distill", ["k=two"])


@pytest.mark.skipif(not (DATA / "mbpp" / "MBPP.jsonl").is_file(), reason="needs ../shared/data")
def test_mbpp_train_split_selection_is_seeded():
    pytest.importorskip("eval.benchmarks.mbpp")
    a = load_problems("mbpp", "train", "", n=5, seed=0)
    b = load_problems("mbpp", "train", "", n=8, seed=0)
    c = load_problems("mbpp", "train", "", n=5, seed=1)
    assert [p.id for p in a] == [p.id for p in b[:5]] and [p.id for p in a] != [p.id for p in c]
    assert len(load_problems("mbpp", "train", "", seed=-1)) == 374


@pytest.mark.parametrize("name", ["mbpp-py", "humaneval-wst", "humaneval"])
def test_a_split_the_benchmark_lacks_is_a_clear_error(name):
    """distill's default split is "train": for a benchmark with only a test split that is a ValueError naming the
    splits (it was a ModuleNotFoundError for the hyphenated names), before any data is read."""
    with pytest.raises(ValueError, match=rf"benchmark '{name}' has no split 'train'; its splits: test"):
        load_problems(name, "train")


@pytest.mark.skipif(not (DATA / "humaneval").is_dir(), reason="needs ../shared/data")
def test_hyphenated_benchmarks_load_with_their_own_split():
    assert len(load_problems("humaneval-wst", "test", n=3)) == 3
    assert len(load_problems("mbpp-py", "", n=3)) == 3


def test_truncated_retriever_answers_are_closed_or_rejected():
    from engine.agents.parsers import parse_retriever
    from recipes.distill import close_truncated_retrieval
    head = "<root>\n<problem>\n<description>d</description>\n<code>x = 1</code>\n<planning>1. a</planning>\n</problem>\n"
    cut = head + "<algorithm>\nGreedy\nTake the best item first.\nBinary sea"
    closed = close_truncated_retrieval(cut)
    assert closed == head + "<algorithm>\nGreedy\nTake the best item first.\n</algorithm>\n</root>"
    r = parse_retriever(closed, k=1)
    assert r and r.repairs == [] and r.algorithm.startswith("Greedy")
    assert close_truncated_retrieval(head.replace("</problem>\n", "") + "<pla") is None          # cut in a problem
    assert close_truncated_retrieval(head + "<algorithm>Greed") is None                          # nothing left
    ret = call(role="retriever", step="retrieve", status="repaired", finish_reason="length",
               repairs=["unclosed <algorithm>"], messages=[{"role": "user", "content": "u"}], response=cut)
    rec = {"id": "p", "passed": True, "solved_samples": True, "error": None, "code": "x",
           "sample_attempts": [{"plan": 0, "round": 0, "verdict": "pass", "passed": 1, "total": 1}],
           "calls": [ret, dict(ret, response=head + "<pla"),
                     dict(ret, finish_reason="stop", repairs=["3 problems recalled, 1 asked"])]}
    kept, rej = trajectory_examples(Trajectory.from_dict(rec))
    assert [e["messages"][-1]["content"] for e in kept] == [closed] and kept[0]["source"]["edit"]
    assert rej == {("retriever", "cut at the token limit outside <algorithm>"): 1,
                   ("retriever", "recalled more problems than asked"): 1}


def test_format_only_tier_is_labelled(tmp_path):
    stats, exs, _ = run(tmp_path, "f", format_only_roles=["debugger"])
    dbg = [e for e in exs if e["role"] == "debugger"]
    assert [(e["source"]["problem"], "tier" in e["source"]) for e in dbg] == [("fake/sub", False), ("fake/mul", True)]
    assert stats["format_only"] == {"retriever": 0, "planner": 0, "coder": 0, "debugger": 1}
    assert stats["examples"]["coder"] == 1                 # other roles unchanged


def test_command_line_is_recorded_as_typed(monkeypatch):
    import recipes.common as d
    root = Path(d.__file__).resolve().parents[1]
    monkeypatch.setattr("sys.argv", [str(root / "recipes" / "build_sft.py"), "--note", "a b"])
    assert d.command_line() == "python -m recipes.build_sft --note 'a b'"
    monkeypatch.setattr("sys.argv", ["/usr/bin/mcl", "distill", "n_problems=5"])
    assert d.command_line() == "mcl distill n_problems=5"
