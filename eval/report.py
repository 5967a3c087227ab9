"""Eval results on disk (problems.jsonl, summary.json) and `mcl report`: a comparison table + PNG chart.

    mcl report runs/eval_base runs/eval_adapted [--png runs/compare.png]

The eval runner (eval/run.py) writes, per run directory:
    problems.jsonl   one record per problem: problem_record(problem, report, code, **extra)
    summary.json     summarize(records, **meta) + the runner's timings: {"benchmark", "strategy", "model", "n",
                     "pass_at_1", "format_failures": {role: n}, "format_failure_rate": {role: failures / calls},
                     "calls": {role: n}, "tokens": {role: {"prompt": n, "completion": n}}, "backend_errors",
                     "wall_s", "completion_tokens_per_s", "peak_mem_bytes", "scored_on": "hidden" | "sample"}
"scored_on" is "sample" when the benchmark has no hidden tests (xCodeEval here): its pass@1 is on the
statement's sample tests, and the table marks it (an older summary without the field is taken as sample-only
when its benchmark is xcodeeval). The table also reads tokens written as {role: n}.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterable

from engine.agents.problem import Problem, TestReport
from engine.roles import ROLES


def problem_record(problem: Problem, report: TestReport, code: str | None, **extra: Any) -> dict:
    """One problems.jsonl line: the verdict, per-test verdicts, the first failures (for reading), code."""
    failures = [{"verdict": r.verdict, "input": _short(r.input), "expected": _short(r.expected),
                 "got": _short(r.got), "stderr": _short(r.stderr)} for r in report.failures()[:3]]
    return {"id": problem.id, "benchmark": problem.benchmark, "verdict": report.verdict, "passed": report.passed,
            "n_tests": len(report.results), "n_passed": sum(r.verdict == "pass" for r in report.results),
            "test_wall_s": round(report.wall_s, 3),
            "scored_on": "sample" if problem.meta.get("hidden_tests") == "none" else "hidden",
            "failures": failures, "code": code, **extra}


def _short(value: Any, n: int = 500) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= n else text[:n] + f"... [{len(text) - n} more chars]"


def write_problems(path: str, records: Iterable[dict]) -> None:
    """Write problems.jsonl (a directory gets problems.jsonl appended)."""
    if os.path.isdir(path):
        path = os.path.join(path, "problems.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, default=repr) + "\n")


def summarize(records: list[dict], **meta) -> dict:
    """problems.jsonl records -> summary.json fields (meta: benchmark, strategy, model, k, t, ...; the runner adds
    wall_s, completion_tokens_per_s and peak memory). Rates per role are over that role's calls:
    format_failure_rate[role] = calls whose answer could not be parsed / calls (backend errors are counted apart,
    in backend_errors). tokens[role] = {"prompt": n, "completion": n}."""
    n = len(records)
    passed = sum(r["passed"] for r in records)
    calls, fails, repaired = Counter(), Counter(), Counter()
    tokens = {r: {"prompt": 0, "completion": 0} for r in ROLES}
    backend_errors = 0
    scored = {rec.get("scored_on", "hidden") for rec in records}   # "sample": the benchmark has no hidden tests
    for rec in records:
        for c in rec.get("calls", []):
            role = c["role"]
            calls[role] += 1
            fails[role] += c["status"] == "failed"
            repaired[role] += c["status"] == "repaired"
            backend_errors += c["status"] == "error"
            tok = tokens.setdefault(role, {"prompt": 0, "completion": 0})
            tok["prompt"] += c["prompt_tokens"]
            tok["completion"] += c["completion_tokens"]
    return {
        **meta, "n": n, "passed": passed, "pass_at_1": passed / n if n else 0.0,
        "format_failures": {r: fails[r] for r in ROLES},
        "format_failure_rate": {r: (fails[r] / calls[r] if calls[r] else 0.0) for r in ROLES},
        "format_repaired": {r: repaired[r] for r in ROLES},
        "calls": {r: calls[r] for r in ROLES},
        "tokens": tokens,
        "backend_errors": backend_errors,
        "problem_errors": sum(r.get("error") is not None for r in records),
        "verdicts": dict(Counter(r["verdict"] for r in records)),
        "solved_samples": sum(bool(r.get("solved_samples")) for r in records),
        "scored_on": "sample" if scored == {"sample"} else "hidden" if scored <= {"hidden"} else "mixed",
    }


def write_summary(out_dir: str, summary: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return path


def read_summary(run_dir: str) -> dict:
    path = run_dir if run_dir.endswith(".json") else os.path.join(run_dir, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no summary.json (is {run_dir!r} an `mcl eval --out` directory?)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
    for key in ("benchmark", "strategy", "n", "pass_at_1"):
        if key not in summary:
            raise ValueError(f"{path}: missing field {key!r}")
    return summary


def _total(tokens: dict | None) -> int:
    """Tokens per role, either {role: n} or eval/run.py's {role: {"prompt": n, "completion": n}}."""
    return sum(sum(v.values()) if isinstance(v, dict) else int(v) for v in (tokens or {}).values())


def _sample_only(s: dict) -> bool:
    return s.get("scored_on") == "sample" or (s.get("scored_on") is None and s.get("benchmark") == "xcodeeval")


def table(runs: list[tuple[str, dict]]) -> str:
    """The comparison table, one row per run."""
    head = ["run", "benchmark", "strategy", "model", "n", "pass@1", "fmt fail", "tokens", "wall s", "peak mem"]
    rows = []
    for name, s in runs:
        rate = s.get("format_failure_rate") or {}
        fmt = sum((s.get("format_failures") or {}).values())
        pass1 = f"{100 * s['pass_at_1']:.1f}%" + (" (sample tests)" if _sample_only(s) else "")
        rows.append([name, s["benchmark"], s["strategy"], str(s.get("model", "")), str(s["n"]), pass1,
                     f"{fmt} ({100 * max(rate.values(), default=0):.1f}% max)",
                     f"{_total(s.get('tokens')):,}", f"{s.get('wall_s', 0):.0f}",
                     f"{s.get('peak_mem_bytes', 0) / 2**30:.2f} GiB"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(runs: list[tuple[str, dict]], png: str) -> str:
    """Two panels: pass@1 per run, and format-failure rate per role per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(runs) + 4), 4.2))
    bars = ax1.bar(range(len(runs)), [100 * s["pass_at_1"] for _, s in runs], color="#4C72B0")
    for b, (_, s) in zip(bars, runs):
        label = f"{100 * s['pass_at_1']:.1f}" + ("*" if _sample_only(s) else "")
        ax1.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(runs)), [f"{n}\n{s['benchmark']}/{s['strategy']}" for n, s in runs], fontsize=8)
    ax1.set_ylabel("pass@1 (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title("pass@1" + ("  (* = sample tests only)" if any(_sample_only(s) for _, s in runs) else ""))
    width = 0.8 / len(ROLES)
    for k, role in enumerate(ROLES):
        ax2.bar([i + (k - 1.5) * width for i in range(len(runs))],
                [100 * (s.get("format_failure_rate") or {}).get(role, 0) for _, s in runs], width, label=role)
    ax2.set_xticks(range(len(runs)), names, fontsize=8)
    ax2.set_ylabel("format failures (%)")
    ax2.set_title("format-failure rate by role")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def cli_report(runs: list[str], png: str | None = None) -> int:
    """`mcl report DIR... [--png PATH]`: print the table, write the chart (default: next to the runs)."""
    dirs = runs
    runs = [(os.path.basename(os.path.normpath(d)) or d, read_summary(d)) for d in dirs]
    print(table(runs))
    png = png or os.path.join(os.path.commonpath([os.path.abspath(d) for d in dirs]) if len(dirs) > 1
                              else os.path.abspath(dirs[0]), "report.png")
    print(f"chart: {plot(runs, png)}")
    return 0
