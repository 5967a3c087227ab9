"""`mcl bench mapcoder`: the miniature campaign's unit of cost, MapCoder problems per hour of each model here.

    mcl bench mapcoder --out bench/results/               # Qwen2.5-Coder-0.5B and 1.5B (q4), 40 training problems
    mcl bench mapcoder --model qwen2.5-coder-0.5b --problems 8
    mcl bench mapcoder --peer                             # + bench/generate.py's prefill (512 tokens) and 16-row
                                                          #   batched-decode rows against llama.cpp, same models

Each model runs the miniature's MapCoder settings (recipes/miniature.toml: k, t, answer tokens, problems in flight,
threads, packed weights) on the campaign's first `speed_problems` problems in its seeded order: MBPP training
problems, decontaminated, the same ones the campaign's speed stage times. One fresh child process per model
(recipes/miniature_arm.py, this tree's code, its result written beside its records in a temporary directory).
A row: problems/hour over the problems' wall time (model loading excluded, reported beside), problems passed,
prompt tokens, tokens prefilled (after the prefix cache) and generated, the prefix hit rate and the scheduler's
step counters. Nothing here decides what the campaign runs; the campaign's shards record their own rates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import isa, write_result

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def arm_row(model: str, problems: list, cfg, workdir: Path) -> dict:
    """One model over the problems in a child process -> its row."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "problems.json").write_text(json.dumps([p.to_dict() for p in problems]))
    spec = {"model": model, "weights": cfg.weights, "problems": str(workdir / "problems.json"), "k": cfg.k, "t": cfg.t,
            "max_new_tokens": cfg.max_new_tokens, "concurrency": cfg.concurrency, "threads": cfg.threads,
            "out": str(workdir / "out"), "result": str(workdir / "result.json")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    rc = subprocess.run([sys.executable, str(ROOT / "recipes" / "miniature_arm.py"), str(workdir / "spec.json")],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
    if rc != 0:
        raise RuntimeError(f"bench mapcoder: {model} failed (exit {rc})")
    res = json.loads((workdir / "result.json").read_text())
    recs = [json.loads(line) for line in (workdir / "out" / "trajectories.jsonl").read_text().splitlines()]
    sched, pre = res["scheduler"], res["prefix"]
    return {"model": model, "weights": cfg.weights, "problems": res["problems_run"],
            "passed": sum(bool(r.get("passed")) for r in recs), "wall_s": res["wall_s"], "load_s": res["load_s"],
            "problems_per_hour": round(res["problems_run"] / res["wall_s"] * 3600, 1), "threads": res["threads"],
            "prompt_tokens": pre.get("prompt_tokens"), "prefill_tokens": pre.get("prefill_tokens"),
            "new_tokens": sched.get("decode_tokens"), "prefix": pre,
            "scheduler": {k: sched[k] for k in sorted(sched)}}


def main(args):
    from recipes.miniature import MiniatureConfig, select_problems

    cfg = MiniatureConfig()
    n = args.problems or (2 if args.quick else cfg.speed_problems)
    problems = select_problems(cfg)[0][:n]
    models = [args.model] if args.model else list(MODELS)
    if args.weights:
        cfg.weights = args.weights
    if args.threads:
        cfg.threads = args.threads
    result = {"bench": "mapcoder", "device": f"cpu: {isa()['cpu_model']}, {os.cpu_count()} cores", **isa(),
              "settings": {"k": cfg.k, "t": cfg.t, "max_new_tokens": cfg.max_new_tokens,
                           "concurrency": cfg.concurrency, "threads": cfg.threads, "weights": cfg.weights,
                           "problems": [p.id for p in problems]},
              "commit": _commit(), "loadavg_1m_start": os.getloadavg()[0], "rows": [], "prefill": [], "batched": [],
              "command": "mcl bench mapcoder" + "".join(f" --{k} {v}" for k, v in (
                  ("model", args.model), ("problems", args.problems), ("weights", args.weights),
                  ("threads", args.threads), ("out", args.out)) if v) + (" --peer" if args.peer else "")
              + (" --quick" if args.quick else "")}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            row = arm_row(m, problems, cfg, Path(tmp) / m)
            print(f"{m} ({cfg.weights}): {row['problems']} problems in {row['wall_s']:.0f} s = "
                  f"{row['problems_per_hour']:.1f} problems/h, {row['passed']} passed", flush=True)
            result["rows"].append(row)
            write_result(result, args.out, "mapcoder_cpu.json")
    if args.peer:
        from bench.generate import batch_row, prefill_rows
        rounds = 1 if args.quick else 3
        for m in models:
            result["prefill"] += prefill_rows(m, cfg.weights, cfg.threads, rounds)
            result["batched"].append(batch_row(m, cfg.weights, cfg.threads, rounds))
            write_result(result, args.out, "mapcoder_cpu.json")
    result["loadavg_1m_end"] = os.getloadavg()[0]
    write_result(result, args.out, "mapcoder_cpu.json")
    if args.json:
        print(json.dumps(result))
    return 0


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
