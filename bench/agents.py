"""`mcl bench agents`: MapCoder over N problems orchestrated concurrently vs problem by problem.

    mcl bench agents --json --threads 1           # SmolLM2-135M, 16 HumanEval problems, CPU
    mcl bench agents --json --threads 1 --out bench/results/    # -> agents_smollm2-135m_cpu.json
    mcl bench agents --weights q4 ...             # packed 4-bit weights in both modes (engine/loading/packed_model.py)

Both runs use one loaded model and one scheduler (16 KV-cache slots), the same problems, greedy decoding,
k=1 plan and t=1 debug round with a bounded answer length. "sequential" runs one problem at a time
(concurrency=1: one request in flight, batch of one); "concurrent" runs all problems on 16 threads, so
the scheduler batches the agent calls of many problems -- of different roles -- into one decode step.
The scheduler's batch log says how many decode steps mixed roles. Both modes use the same engine,
automatic prefix caching included (engine/serving/scheduler.py); each row reports its prompt tokens, the tokens
actually prefilled and the prefix hit rates.
Last line: {"device", "model", "problems", "rows": [{"mode", "wall_s", "new_tokens", "prompt_tokens",
"prefill_tokens", "prefix": {...}, "decode_s", "prefill_s"}], "speedup", "mixed_role_steps", "decode_steps",
"mean_batch"}.
"""
from __future__ import annotations

import json
import tempfile
import time

import torch

from bench.common import device_name, isa, write_result


def main(args):
    from engine.loading.hub import load_model
    from engine.lora import add_adapters
    from engine.roles import ROLES
    from engine.serving.backend import LocalBackend
    from engine.serving.scheduler import Scheduler
    from eval.run import load_benchmark, run_eval

    name = args.model or "smollm2-135m"
    device = args.device or "cpu"
    n = 4 if args.quick else 16
    max_new = 48 if args.quick else 96
    weights = args.weights
    model, tok = load_model(name, device=device, **({"weights": weights} if weights else {}))
    roles = list(ROLES)
    add_adapters(model, roles, rank=32, alpha=64)             # B = 0: outputs equal the base, cost is real
    problems = load_benchmark("humaneval", limit=n)
    rows, logs = [], {}
    for mode, conc in (("concurrent", n), ("sequential", 1)):
        sched = Scheduler(model, tok, n_slots=16, max_len=4096, log_batches=True)
        timed = _time_phases(sched)
        sched.start()
        backend = LocalBackend(sched, tok, adapters=roles)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            summary = run_eval(problems, backend, strategy="mapcoder", k=1, t=1, out_dir=d, concurrency=conc,
                               max_new_tokens=max_new, model=name, benchmark="humaneval", progress=False)
        wall = time.perf_counter() - t0
        sched.stop()
        toks = sched.stats["decode_tokens"] + sched.stats["prefill_tokens"]
        logs[mode] = sched.batch_log
        pre = sched.prefix_summary()
        rows.append({"mode": mode, "wall_s": round(wall, 2), "new_tokens": sched.stats["decode_tokens"],
                     "prompt_tokens": pre["prompt_tokens"], "prefill_tokens": pre["prefill_tokens"],
                     "tokens": toks, "prefix": pre, "prefill_s": round(timed["prefill"], 2),
                     "decode_s": round(timed["decode"], 2), "pass_at_1": summary.get("pass_at_1")})
        print(f"{mode:>10}: {wall:.1f} s (prefill {timed['prefill']:.1f} s, decode {timed['decode']:.1f} s), "
              f"{sched.stats['decode_tokens']} decode tokens in {len(sched.batch_log)} steps, "
              f"{pre['prompt_tokens']} prompt tokens of which {pre['prefill_tokens']} prefilled "
              f"(prefix hit rate {pre['token_hit_rate']:.0%} of tokens, {pre['request_hit_rate']:.0%} of requests)",
              flush=True)
    steps = logs["concurrent"]
    mixed = sum(1 for b in steps if len(b["adapters"]) > 1)
    result = {"device": device_name(device), **isa(), "model": name, "problems": n, "max_new_tokens": max_new,
              "strategy": "mapcoder k=1 t=1", "rows": rows,
              "speedup": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3),
              "decode_steps": len(steps), "mixed_role_steps": mixed,
              "mean_batch": round(sum(b["size"] for b in steps) / max(1, len(steps)), 2),
              "example_mixed_steps": [b for b in steps if len(b["adapters"]) > 1][:5],
              "torch": torch.__version__,
              "weights": weights or "fp32",
              "command": "mcl bench agents --json" + (" --quick" if args.quick else "")
              + (f" --threads {args.threads}" if args.threads else "")
              + (f" --weights {weights}" if weights else "")}
    write_result(result, args.out, f"agents_{name.replace('/', '_')}_{device}.json")
    print(json.dumps(result))


def _time_phases(sched) -> dict:
    """Wrap the scheduler's prefill and decode steps to add up the seconds each takes (the rest of a run's
    wall time is the agents' own work -- templating, parsing, the sandbox -- and idle waiting)."""
    timed = {"prefill": 0.0, "decode": 0.0}
    for phase in timed:
        inner = getattr(sched, f"_{phase}_step")

        def wrapped(inner=inner, phase=phase):
            t0 = time.perf_counter()
            inner()
            timed[phase] += time.perf_counter() - t0
        setattr(sched, f"_{phase}_step", wrapped)
    return timed
