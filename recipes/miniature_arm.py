"""One arm of a miniature shard: one model runs MapCoder over a list of problems, with the code of the tree it is
run in. recipes/miniature.py starts it as a child process, so that an arm can run this project's code at another
commit (the speed stage's "before" arms) with the same measurement around it:

    PYTHONPATH=<code tree> python recipes/miniature_arm.py SPEC.json

SPEC.json: {"model", "weights", "problems" (a JSON file of Problem.to_dict() records), "k", "t", "max_new_tokens",
"concurrency", "threads", "out" (distill's resumable output directory), "result" (where this arm writes its
measurement), "task"}. Task "mapcoder" (the default) is `recipes.distill.distill` with a local backend; task
"correct" is `recipes.correct.correct` over SPEC["trajectories"], "model" regenerating first and "supervisor"
judging and regenerating after it, both local, "rounds" per failure. Either way a killed arm resumes from OUT
without losing or repeating a finished problem. Result: {"problems_run", "wall_s" (the problems, model loading
excluded), "load_s", "prefix" (the scheduler's prefix-cache counters), "scheduler" (its step counters); correct:
"stats" (recipes.correct's) and the supervisor's counters as "supervisor_prefix" / "supervisor_scheduler"}.

Only APIs that the older commits measured here also have are used (Problem.from_dict, open_local(weights=...),
DistillConfig, distill(cfg, backend=, problems=), Scheduler.prefix_summary); the one module that moved is looked up
in the tree's files.
"""
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import engine
from engine.agents.problem import Problem
from recipes.common import set_threads
from recipes.distill import DistillConfig, distill

# open_local's module moved (engine/agents/backends.py -> engine/serving/backend.py); import the one of the tree on
# PYTHONPATH by its files, since an editable install of another tree would otherwise answer for a missing module.
if (Path(engine.__file__).parent / "serving" / "backend.py").is_file():
    from engine.serving.backend import open_local
else:
    from engine.agents.backends import open_local


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    if spec.get("task", "mapcoder") == "correct":
        return correct_arm(spec)
    with open(spec["problems"]) as f:
        problems = [Problem.from_dict(d) for d in json.load(f)]
    threads = set_threads(spec["threads"])
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = DistillConfig(teacher=spec["model"], benchmark=problems[0].benchmark, split="", seed=-1, k=spec["k"],
                        t=spec["t"], max_new_tokens=spec["max_new_tokens"], concurrency=spec["concurrency"],
                        threads=spec["threads"], out=spec["out"],
                        **({"weights": spec["weights"]} if "weights" in fields else {}))
    t0 = time.perf_counter()
    backend = open_local(spec["model"], None, None, None, n_slots=spec["concurrency"], weights=spec["weights"])
    load_s = time.perf_counter() - t0
    try:
        done_before = _count_lines(f"{spec['out']}/trajectories.jsonl")
        t1 = time.perf_counter()
        distill(cfg, backend=backend, problems=problems, progress=False)
        wall = time.perf_counter() - t1
        run = _count_lines(f"{spec['out']}/trajectories.jsonl") - done_before
        sched = backend.scheduler
        result = {"problems_run": run, "wall_s": round(wall, 2), "load_s": round(load_s, 2), "threads": threads,
                  "prefix": sched.prefix_summary(), "scheduler": {k: v for k, v in sched.stats.items()
                                                                   if isinstance(v, (int, float))}}
    finally:
        backend.close()
    _write_result(spec["result"], result)
    return 0


def correct_arm(spec: dict) -> int:
    """Task "correct": the supervisor-guided correction of SPEC["trajectories"] (see the module's docstring)."""
    from recipes.correct import CorrectConfig, correct
    threads = set_threads(spec["threads"])
    cfg = CorrectConfig(trajectories=spec["trajectories"], teacher=spec["model"], supervisor=spec["supervisor"],
                        fallback=spec["supervisor"], weights=spec["weights"], rounds=spec["rounds"],
                        max_new_tokens=spec["max_new_tokens"], concurrency=spec["concurrency"],
                        threads=spec["threads"], out=spec["out"])
    from engine.serving.scheduler import TurnLock
    turns = TurnLock()                             # the two models' steps take turns on the cores
    t0 = time.perf_counter()
    first = open_local(spec["model"], None, None, None, n_slots=spec["concurrency"], weights=spec["weights"],
                       step_lock=turns)
    judge = open_local(spec["supervisor"], None, None, None, n_slots=spec["concurrency"], weights=spec["weights"],
                       step_lock=turns)
    load_s = time.perf_counter() - t0
    try:
        done_before = _count_lines(f"{spec['out']}/corrections.jsonl")
        t1 = time.perf_counter()
        stats = correct(cfg, teacher=first, supervisor=judge, fallback=judge, progress=False)
        wall = time.perf_counter() - t1
        result = {"problems_run": _count_lines(f"{spec['out']}/corrections.jsonl") - done_before,
                  "wall_s": round(wall, 2), "load_s": round(load_s, 2), "threads": threads, "stats": stats}
        for key, b in (("", first), ("supervisor_", judge)):
            result[key + "prefix"] = b.scheduler.prefix_summary()
            result[key + "scheduler"] = {k: v for k, v in b.scheduler.stats.items() if isinstance(v, (int, float))}
    finally:
        first.close()
        judge.close()
    _write_result(spec["result"], result)
    return 0


def _write_result(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
