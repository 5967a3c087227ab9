"""`mcl eval`: run a strategy over a benchmark, score each final program on the hidden tests, and write
DIR/problems.jsonl (one line per problem: every agent call, sample-test attempts, the final verdict) and
DIR/summary.json (pass@1, format failures per role, tokens per role, wall time, peak memory: CUDA's peak allocation,
or on the CPU the process's peak RSS from the run's start, model included; `peak_mem_kind` says which).

    mcl eval --benchmark humaneval --strategy mapcoder -k 2 -t 2 --limit 10 --out runs/eval_base
    mcl eval --benchmark mbpp --adapters runs/main/adapters --out runs/eval_adapted
    mcl eval --backend http --url http://127.0.0.1:8000 --model qwen2.5-coder-32b --benchmark apps --out runs/t
      (with --backend http, --adapters means "the server exposes one model per role, named after it")

    from eval.run import run_eval                    # recipes call this directly
    summary = run_eval(problems, backend, "mapcoder", k=2, t=2, out_dir="runs/x", concurrency=16)

Problems run concurrently on `concurrency` threads. Each thread blocks on one backend call at a time, so
with the local engine the scheduler batches calls of every role from many problems into one decode batch.
pass@1 is greedy pass@1: one final program per problem, passed = every hidden test passed.

Resuming: records stream to DIR/problems.jsonl.partial as problems finish, beside DIR/run.json (the run's settings
and problem ids). Rerunning the same command after a kill keeps every complete record, drops a line torn by the kill,
and solves only the problems without one; a rerun with other settings into the same DIR is refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from engine.agents.mapcoder import solve
from engine.agents.problem import Problem, TestReport
from engine.roles import ROLES
from eval.report import problem_record, summarize, write_problems, write_summary


def load_benchmark(name: str, data: str | None = None, limit: int | None = None) -> list[Problem]:
    """eval.benchmarks.load by `mcl eval --benchmark` name; ValueError for an unknown one."""
    from eval.benchmarks import load
    return load(name, path=data, limit=limit)


def _reset_peak_rss() -> bool:
    """Linux: set the process's peak RSS (VmHWM) to its current RSS, so that the peak read at the end of a run is
    the run's and not, say, a training step's earlier in the same process. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mem(since_reset: bool) -> tuple[int, str]:
    """(bytes, kind): CUDA's peak allocation; else the process's peak RSS since _reset_peak_rss (shared by runs
    going on at once in the process), or since the process began where it could not be reset."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    if since_reset:
        with open("/proc/self/status") as f:
            kb = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
        if kb is not None:
            return kb * 1024, "process_peak_rss_since_eval_start"
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_max_rss"


def _score(problem: Problem, code: str, run_tests) -> tuple[TestReport, str | None]:
    if not problem.hidden_tests:
        return TestReport("no_code"), f"problem {problem.id} has no hidden tests"
    if not code.strip():
        return TestReport("no_code"), None
    return run_tests(problem, code, problem.hidden_tests), None


def run_problem(problem: Problem, backend, strategy: str, k: int, t: int, run_tests, max_new_tokens: int,
                index: int = 0) -> dict:
    """Solve one problem and score it -> its problems.jsonl record (eval.report.problem_record plus the
    agent trace). Any exception becomes the record's `error` (the run goes on)."""
    t0 = time.perf_counter()
    try:
        sol = solve(problem, backend, strategy, k, t, run_tests, max_new_tokens)
        report, err = _score(problem, sol.code, run_tests)
        rec = problem_record(problem, report, sol.code, index=index, strategy=strategy, error=err,
                             solved_samples=sol.solved_samples,
                             sample_attempts=[dataclasses.asdict(a) for a in sol.attempts],
                             plans=sol.plans, algorithm=sol.algorithm,
                             calls=[dataclasses.asdict(c) for c in sol.calls])
    except Exception as e:                                   # noqa: BLE001 -- one problem, not the run
        rec = problem_record(problem, TestReport("no_code"), None, index=index, strategy=strategy,
                             error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(), calls=[])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def _resume(out: Path, settings: dict) -> list[dict]:
    """The complete records of an interrupted run with the same settings (a line torn by the kill is dropped);
    [] for a fresh run, which records its settings in out/run.json. ValueError if out holds another run."""
    run_json, partial = out / "run.json", out / "problems.jsonl.partial"
    if run_json.exists() and partial.exists():
        before = json.loads(run_json.read_text())
        if before != settings:
            diff = sorted(k for k in settings if before.get(k) != settings[k])
            raise ValueError(f"{out}: holds an interrupted eval with other settings ({', '.join(diff)} differ); "
                             f"rerun it as it was, or pick another --out")
        records, todo = [], set(settings["problems"])
        for line in partial.read_text().split("\n"):    # (not splitlines: U+2028 and kin can be in values)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue                                   # the line the kill cut short: that problem runs again
            if rec.get("id") in todo:
                todo.discard(rec["id"])
                records.append(rec)
        partial.write_text("".join(json.dumps(r, default=repr) + "\n" for r in records))
        return records
    partial.unlink(missing_ok=True)
    run_json.write_text(json.dumps(settings))
    return []


def run_eval(problems: list[Problem], backend, strategy: str = "mapcoder", k: int = 2, t: int = 2,
             out_dir: str | os.PathLike = "runs/eval", concurrency: int = 16, max_new_tokens: int = 384,
             run_tests=None, model: str = "", benchmark: str | None = None, progress: bool = True) -> dict:
    """Run `strategy` over `problems` on `concurrency` threads; write problems.jsonl + summary.json in
    out_dir; return the summary."""
    from tqdm import tqdm
    if run_tests is None:
        from eval.harness import run_tests
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    rss_reset = _reset_peak_rss()
    benchmark = benchmark or (problems[0].benchmark if problems else "")
    settings = {"benchmark": benchmark, "strategy": strategy, "model": model, "k": k, "t": t,
                "max_new_tokens": max_new_tokens, "problems": [p.id for p in problems]}
    records = _resume(out, settings)
    done = {r["id"] for r in records}
    t0 = time.perf_counter()
    partial = out / "problems.jsonl.partial"                # streamed as problems finish; sorted at the end
    with open(partial, "a") as f, ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="mcl-eval") as pool, \
            tqdm(total=len(problems), initial=len(done), desc=f"{strategy} {benchmark}", disable=not progress,
                 dynamic_ncols=True) as bar:
        futs = [pool.submit(run_problem, p, backend, strategy, k, t, run_tests, max_new_tokens, i)
                for i, p in enumerate(problems) if p.id not in done]
        for fut in as_completed(futs):
            rec = fut.result()
            records.append(rec)
            f.write(json.dumps(rec, default=repr) + "\n")
            f.flush()
            bar.update(1)
            bar.set_postfix(passed=f"{sum(r['passed'] for r in records)}/{len(records)}")
    records.sort(key=lambda r: r["index"])
    write_problems(str(out / "problems.jsonl"), records)
    partial.unlink()
    (out / "run.json").unlink()
    wall = time.perf_counter() - t0
    peak, peak_kind = _peak_mem(rss_reset)
    summary = summarize(records, benchmark=benchmark, strategy=strategy, model=model, k=k, t=t,
                        concurrency=concurrency, max_new_tokens=max_new_tokens)
    completion = sum(v["completion"] for v in summary["tokens"].values())
    summary.update({"wall_s": wall, "completion_tokens_per_s": completion / wall if wall > 0 else 0.0,
                    "peak_mem_bytes": peak, "peak_mem_kind": peak_kind, "resumed_problems": len(done)})
    write_summary(str(out), summary)
    first_error = next((r for r in records if r.get("traceback")), None)
    if first_error is not None:
        print(f"mcl eval: {summary['problem_errors']} problems raised; first ({first_error['id']}):\n"
              f"{first_error['traceback']}", file=sys.stderr)
    return summary


def cli_eval(benchmark: str, out: str, model: str = "smollm2-135m", device: str | None = None,
             dtype: str | None = None, weights: str = "fp32", strategy: str = "mapcoder", adapters: str | None = None,
             backend_kind: str = "local", url: str | None = None, limit: int | None = None, k: int = 2, t: int = 2,
             data: str | None = None, concurrency: int = 16, max_new_tokens: int = 384) -> int:
    """`mcl eval`: one strategy over one benchmark with a local engine or an HTTP endpoint (engine/cli.py)."""
    from engine.agents.backends import HTTPBackend
    from engine.serving.backend import open_local
    problems = load_benchmark(benchmark, data, limit)
    if not problems:
        raise ValueError(f"benchmark {benchmark!r} loaded no problems (data: {data or 'default'})")
    if backend_kind == "http":
        if not url:
            raise ValueError("--backend http needs --url (e.g. http://127.0.0.1:8000)")
        # One hour per call: a CPU engine behind the URL (engine/serving/http_server.py) can take over five
        # minutes for the retriever's (k+1) * max_new_tokens answer in a full batch, and a timed-out call keeps
        # running on the server, so a retry only doubles its work (seen: 300 s timed out every retriever call).
        backend = HTTPBackend(url, model=model, api_key=os.environ.get("OPENAI_API_KEY"),
                              role_models={r: r for r in ROLES} if adapters else None, timeout=3600.0)
    else:
        backend = open_local(model, device, dtype, adapters, n_slots=concurrency, weights=weights)
    try:
        s = run_eval(problems, backend, strategy, k, t, out, concurrency, max_new_tokens, benchmark=benchmark,
                     model=model if weights == "fp32" else f"{model} ({weights})")
    finally:
        if hasattr(backend, "close"):
            backend.close()
    fails = ", ".join(f"{r} {s['format_failures'][r]}/{s['calls'][r]}" for r in ROLES if s["calls"][r])
    print(f"{s['benchmark']} {s['strategy']}: pass@1 {s['pass_at_1']:.3f} ({s['passed']}/{s['n']}); "
          f"format failures {fails or 'none'}; {s['wall_s']:.1f}s -> {out}")
    return 0
