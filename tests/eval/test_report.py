"""eval/report.py: problems.jsonl / summary.json writers and `mcl report` (table + PNG).

    python -m pytest tests/eval/test_report.py -q
"""
import json
import os

import pytest

from engine.cli import main as mcl
from engine.agents import problem as P
from eval.report import problem_record, read_summary, summarize, table, write_problems, write_summary


def records(passed: list[bool], scored_on="hidden"):
    meta = {"hidden_tests": "none"} if scored_on == "sample" else {}
    out = []
    for i, ok in enumerate(passed):
        prob = P.Problem(f"b/{i}", "bench", "desc", meta=meta)
        res = [P.TestResult("pass")] if ok else [P.TestResult("wrong_answer", "1 2\n", "3", "4", "x" * 2000)]
        out.append(problem_record(prob, P.TestReport("pass" if ok else "wrong_answer", res, 0.5), "print(4)", tokens=10))
    return out


def calls(role, n, failed=0, errors=0, completion=0):
    """n recorded calls of `role`: `failed` format failures, `errors` backend errors, the rest ok."""
    status = ["failed"] * failed + ["error"] * errors + ["ok"] * (n - failed - errors)
    return [{"role": role, "status": s, "prompt_tokens": 10, "completion_tokens": completion} for s in status]


def test_records_and_summary(tmp_path):
    recs = records([True, False, True, True])
    assert recs[1]["failures"][0]["stderr"].endswith("[1500 more chars]") and recs[1]["tokens"] == 10
    recs[0]["calls"] = calls("coder", 4, failed=2, completion=900) + calls("planner", 4, failed=1)
    recs[1]["calls"] = calls("coder", 4, errors=1) + [dict(calls("planner", 1)[0], status="repaired")]
    s = summarize(recs, benchmark="mbpp", strategy="mapcoder", model="smollm2-135m", k=2)
    assert s["n"] == 4 and s["pass_at_1"] == 0.75 and s["scored_on"] == "hidden" and s["k"] == 2
    assert s["format_failures"] == {"retriever": 0, "planner": 1, "coder": 2, "debugger": 0}
    assert s["calls"] == {"retriever": 0, "planner": 5, "coder": 8, "debugger": 0}
    assert s["format_failure_rate"] == {"retriever": 0.0, "planner": 0.2, "coder": 0.25, "debugger": 0.0}
    assert s["format_repaired"]["planner"] == 1 and s["backend_errors"] == 1
    assert s["tokens"]["coder"] == {"prompt": 80, "completion": 3600} and s["tokens"]["debugger"]["prompt"] == 0
    write_problems(str(tmp_path), recs)
    lines = (tmp_path / "problems.jsonl").read_text().splitlines()
    assert [json.loads(line)["passed"] for line in lines] == [True, False, True, True]
    write_summary(str(tmp_path), s)
    assert read_summary(str(tmp_path)) == json.loads((tmp_path / "summary.json").read_text())
    assert summarize(records([True], "sample"), benchmark="xcodeeval", strategy="direct")["scored_on"] == "sample"


def test_mcl_report_table_and_png(tmp_path, capsys):
    runs = []
    for name, passed, scored in [("base", [False, True], "hidden"), ("adapted", [True, True], "hidden"),
                                 ("xce", [True, False], "sample")]:
        d = tmp_path / "runs" / name
        recs = records(passed, scored)
        recs[0]["calls"] = calls("coder", 1, completion=1224) + calls("debugger", 1, failed=1)
        s = summarize(recs, benchmark="xcodeeval" if scored == "sample" else "humaneval", strategy="mapcoder",
                      model="tiny", wall_s=2)
        write_summary(str(d), s)
        runs.append(str(d))
    with pytest.raises(SystemExit) as e:
        mcl(["report", *runs])
    assert e.value.code == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert rows[0].split()[:6] == ["run", "benchmark", "strategy", "model", "n", "pass@1"]
    assert "50.0%" in rows[2] and "100.0%" in rows[3] and "(sample tests)" in rows[4] and "1,244" in rows[2]
    png = tmp_path / "runs" / "report.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    custom = tmp_path / "out" / "c.png"
    with pytest.raises(SystemExit):
        mcl(["report", runs[0], "--png", str(custom)])
    assert custom.exists()


def test_report_reads_the_eval_runners_nested_tokens():
    """eval/run.py writes tokens as {role: {"prompt": n, "completion": n}}: the table sums both forms."""
    s = {"benchmark": "mbpp", "strategy": "direct", "model": "m", "n": 1, "pass_at_1": 1.0,
         "tokens": {"coder": {"prompt": 100, "completion": 20}, "planner": 5}}
    assert "125" in table([("r", s)])


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        read_summary(str(tmp_path))
    (tmp_path / "summary.json").write_text('{"benchmark": "x"')
    with pytest.raises(ValueError, match="summary.json: line 1"):
        read_summary(str(tmp_path))
    (tmp_path / "summary.json").write_text('{"benchmark": "x"}')
    with pytest.raises(ValueError, match="missing field 'strategy'"):
        read_summary(str(tmp_path))
    assert not os.path.exists(tmp_path / "report.png")
