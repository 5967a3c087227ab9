"""`mcl distill`: a teacher runs MapCoder over training problems; its trajectories become role-tagged SFT data.

    mcl distill --config recipes/mini_e2e.toml                     # the [distill] table of a recipe
    mcl distill --config recipes/mini_e2e.toml n_problems=5 out=runs/d5    # key=value overrides (TOML literals)
    mcl distill teacher_url=http://127.0.0.1:8000 teacher_model=qwen2.5-coder-32b out=runs/distill_http

    from recipes.distill import DistillConfig, distill, build_examples
    stats = distill(DistillConfig(n_problems=5, out="runs/d5"), backend=..., run_tests=...)

Flow (one problem = one trajectory = one line of OUT/trajectories.jsonl):

    MBPP train split (any eval/benchmarks loader) -> seeded shuffle -> first n_problems   (deterministic order)
      -> eval.run.run_problem: MapCoder with the teacher (greedy), every agent call recorded, the final
         program scored on the problem's tests                  (many problems in flight: one mixed batch)
      -> appended to trajectories.jsonl, flushed and fsync'ed as each problem finishes
    trajectories (sorted by problem order) -> build_examples -> OUT/examples.jsonl + OUT/stats.json

What becomes a training example ({"role", "messages": [system, user, assistant], "source"}), from a
trajectory whose final program passes the problem's tests (accept="hidden": every test of the problem;
accept="samples": the sample tests only -- a weaker filter, for teachers too weak for the first):
    retriever  its call, if format-valid
    planner    the plan call and the confidence call of the plan that led to the passing program
    coder      the coder call of that plan, if its program passed as written (round 0)
    debugger   the debugger call that turned that plan's failing program into the passing one
Every other call is rejected with a reason (stats.json: rejected[role][reason]). Format-valid = the
parser accepted the answer (status ok or repaired); the assistant text is the teacher's answer as written
(parsers.clean drops chat special tokens and <think> blocks only), with one marked exception: a retriever
answer cut at the token limit inside its <algorithm> tutorial loses its unfinished last line and gets its
tags closed (close_truncated_retrieval; counted in stats.json "edited", marked in the example's source).
Retriever answers cut anywhere else, or recalling more problems than asked, are rejected.
A weaker tier, off by default and labelled per example (source.tier) and in stats.json: roles listed in
format_only_roles also keep answers that parsed cleanly (status ok, not cut) from trajectories whose
program failed -- for a role the teacher almost never gets right (the 0.5B teacher's debugger).

Resumable: a rerun with the same OUT skips the problem ids already in trajectories.jsonl (a line cut by a
kill is dropped), so nothing is duplicated; OUT/config.json pins the fields that shape trajectories
(teacher, benchmark, split, seed, k, t, max_new_tokens) and a rerun that changes one is refused.
Deterministic: greedy decoding, problem order fixed by the seed, examples built in problem order, so the
same seed gives the same examples (tests/recipes/test_distill.py checks it).
"""
from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from engine.agents.parsers import clean
from engine.agents.problem import Problem
from engine.roles import ROLES
from recipes.common import (append_jsonl, check_resume, dedup, load_config, open_backend, read_jsonl_resumable,
                            run_record, set_threads, write_examples, write_meta)
from recipes.trajectory import Trajectory, call_example, winning_attempt

TRAJECTORY_FIELDS = ("teacher", "teacher_url", "teacher_model", "weights", "benchmark", "split", "data", "seed", "k",
                     "t", "max_new_tokens")       # changing one of these makes old trajectories incomparable


@dataclass
class DistillConfig:
    teacher: str = "qwen2.5-coder-0.5b"  # run by our engine: embedded name, HF directory or .gguf
    teacher_url: str = ""                # set: an OpenAI-compatible endpoint is the teacher instead
    teacher_model: str = ""              # the model name sent to that endpoint
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the endpoint's key (if any)
    timeout_s: float = 300.0             # per HTTP call; a timeout is a counted backend error
    retries: int = 2                     # further HTTP tries per call
    device: str = ""                     # local teacher: "" = cuda when available
    dtype: str = ""                      # local teacher: "" = bf16 on cuda, fp32 on cpu
    weights: str = "fp32"                # local teacher: fp32 | bf16 | q4 (the GGUF's own blocks, engine/loading/packed_model.py)
    benchmark: str = "mbpp"              # an eval/benchmarks/<name>.py loader
    split: str = "train"                 # mbpp: train (task ids 601-974) | validation | test | prompt | all;
                                         # "" = the loader's default (eval/benchmarks: splits(name) lists them)
    data: str = ""                       # benchmark data path ("" = the loader's default)
    n_problems: int = 0                  # 0 = every problem of the split
    seed: int = 0                        # shuffles the split before taking n_problems; decoding is greedy
    k: int = 1                           # recalled examples = plans
    t: int = 1                           # debug rounds per plan
    max_new_tokens: int = 256            # per call (the retriever gets (k + 1) times this)
    concurrency: int = 8                 # problems in flight (= scheduler slots for a local teacher)
    threads: int = 0                     # torch CPU threads: 0 = auto (1 on a busy machine), -1 = torch default
    accept: str = "hidden"               # hidden: final program passes all the problem's tests | samples
    format_only_roles: list = field(default_factory=list)   # roles that also keep clean-format answers of
                                         # failed trajectories (labelled tier; for roles the teacher rarely solves)
    out: str = "runs/distill"


# --- teacher ----------------------------------------------------------------------------------------------

def teacher_name(cfg) -> str:
    return f"{cfg.teacher_model or cfg.teacher} @ {cfg.teacher_url}" if cfg.teacher_url else f"{cfg.teacher} (local engine)"


# --- problems ----------------------------------------------------------------------------------------------

def load_problems(benchmark: str, split: str = "", data: str = "", n: int = 0, seed: int = 0) -> list[Problem]:
    """The split's problems in loader order (split "" = the loader's default), shuffled by `seed` (seed < 0: no
    shuffle), first n (0 = all). A larger n extends a smaller one's selection (same permutation). A benchmark
    without that split (mbpp-py and humaneval-wst have only "test") is a ValueError naming its splits."""
    from eval.benchmarks import load
    problems = load(benchmark, data or None, split=split or None)
    if not problems:
        raise ValueError(f"benchmark {benchmark!r} split {split!r} loaded no problems (data: {data or 'default'})")
    problems = list(problems)
    if seed >= 0:
        random.Random(seed).shuffle(problems)
    return problems[:n] if n else problems


# --- the run -----------------------------------------------------------------------------------------------

def distill(cfg: DistillConfig, backend=None, run_tests=None, problems: list[Problem] | None = None,
            progress: bool = True) -> dict:
    """Run (or resume) the teacher over the problems, then build OUT/examples.jsonl and OUT/stats.json.
    `backend`/`run_tests`/`problems` default to the teacher in cfg, eval.harness.run_tests, the split in cfg."""
    from tqdm import tqdm

    from eval.run import run_problem
    if cfg.accept not in ("hidden", "samples"):
        raise ValueError(f"accept={cfg.accept!r}: expected 'hidden' or 'samples'")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = check_resume(out, cfg, TRAJECTORY_FIELDS, "distill")
    if problems is None:
        problems = load_problems(cfg.benchmark, cfg.split, cfg.data, cfg.n_problems, cfg.seed)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.benchmark}: duplicate problem ids in the selection")
    traj_path = out / "trajectories.jsonl"
    done = {r["id"] for r in read_jsonl_resumable(traj_path)}
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    if run_tests is None:
        from eval.harness import run_tests

    set_threads(cfg.threads)
    t0, own_backend, n_new = time.perf_counter(), backend is None, 0
    meta["runs"].append(run_record(teacher=teacher_name(cfg), todo=len(todo)))
    write_meta(out, meta, cfg)                                     # pinned before the first trajectory is written
    if todo:
        if own_backend:
            backend = open_backend(cfg.teacher, cfg.teacher_url, cfg.teacher_model, cfg.api_key_env, cfg.timeout_s,
                                   cfg.retries, cfg.device, cfg.dtype, n_slots=cfg.concurrency, weights=cfg.weights)
        try:
            with open(traj_path, "a") as f, ThreadPoolExecutor(max(1, cfg.concurrency)) as pool, \
                    tqdm(total=len(problems), initial=len(problems) - len(todo), desc="distill", disable=not progress,
                         dynamic_ncols=True) as bar:
                futs = {pool.submit(run_problem, p, backend, "mapcoder", cfg.k, cfg.t, run_tests, cfg.max_new_tokens,
                                    i): p for i, p in todo}
                passed = 0
                for fut in as_completed(futs):
                    rec = fut.result()                           # run_problem turns exceptions into rec["error"]
                    rec["problem"] = futs[fut].to_dict()
                    append_jsonl(f, rec)
                    n_new += 1
                    passed += rec["passed"]
                    bar.update(1)
                    bar.set_postfix(passed=f"{passed}/{n_new}")
        finally:
            if own_backend and hasattr(backend, "close"):
                backend.close()
    meta["runs"][-1].update(new_trajectories=n_new, wall_s=round(time.perf_counter() - t0, 1))
    write_meta(out, meta, cfg)
    return build(out, ids, cfg.accept, cfg.format_only_roles)


def build(out: Path, ids: list[str], accept: str, format_only_roles=()) -> dict:
    """trajectories.jsonl (restricted to `ids`, in that order) -> examples.jsonl + stats.json; returns stats."""
    order = {pid: n for n, pid in enumerate(ids)}
    path = out / "trajectories.jsonl"
    trajs = [Trajectory.from_dict(r, str(path)) for r in read_jsonl_resumable(path) if r["id"] in order]
    trajs.sort(key=lambda t: order[t.id])
    examples, stats = build_examples(trajs, accept, format_only_roles)
    write_examples(out / "examples.jsonl", examples)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# --- trajectories -> examples ------------------------------------------------------------------------------

CLOSED_EDIT = "cut at the token limit inside <algorithm>: unfinished last line dropped, open tags closed"
_RETRIEVER_TAG = re.compile(r"<(/?)(root|problem|description|code|planning|algorithm)\s*>", re.I)


def close_truncated_retrieval(text: str) -> str | None:
    """A retriever answer cut at the token limit while writing its <algorithm> tutorial (the 0.5B teacher
    tends to tutor every algorithm the prompt names until the budget ends) -> the same text without the
    unfinished last line, with </algorithm> and </root> closed. None when the cut is anywhere else (a recalled
    problem would be incomplete) or nothing of the tutorial is left. The example is marked (source.edit)."""
    text = clean(text)
    stack = []
    for m in _RETRIEVER_TAG.finditer(text):
        tag = m.group(2).lower()
        if not m.group(1):
            stack.append(tag)
        elif tag in stack:
            del stack[len(stack) - 1 - stack[::-1].index(tag):]
    if stack not in (["root", "algorithm"], ["algorithm"]):
        return None
    head, _, _ = text.rpartition("\n")                               # drop the unfinished last line
    start = head.lower().rfind("<algorithm>")
    if start < 0 or not head[start + len("<algorithm>"):].strip():
        return None
    return head.rstrip() + "\n</algorithm>" + ("\n</root>" if stack[0] == "root" else "")


FORMAT_ONLY = "format-only: the answer parsed cleanly (no repair, not cut) but its trajectory's program failed"
_TEST_REASONS = ("final program fails the problem's tests", "no program passed the sample tests",
                 "plan not on the passing path", "program failed the sample tests (debugged later)",
                 "program still failed the sample tests")


def trajectory_examples(t: Trajectory, accept: str = "hidden", format_only_roles=()) -> tuple[list[dict], Counter]:
    """One trajectory -> (kept examples, Counter of (role, rejection reason)). Roles in `format_only_roles`
    also keep calls rejected only for the tests' verdict when their answer parsed cleanly (status ok,
    finished by itself): a weaker, labelled tier (source.tier) for roles the teacher rarely gets right."""
    kept, rejected = [], Counter()
    if t.error:
        for c in t.calls:
            rejected[c.role, "problem raised"] += 1
        return kept, rejected
    good = t.passed if accept == "hidden" else t.solved_samples
    win = winning_attempt(t)
    for c in t.calls:
        role, text, why = c.role, None, None
        if c.status == "error":
            why = "backend error"
        elif c.status == "failed":
            why = "format failure"
        elif not good or win is None:
            why = _TEST_REASONS[0] if accept == "hidden" else _TEST_REASONS[1]
        elif role == "retriever":
            if any("problems recalled" in r for r in c.repairs):
                why = "recalled more problems than asked"
            elif c.finish_reason == "length":
                text = close_truncated_retrieval(c.response)
                why = "cut at the token limit outside <algorithm>" if text is None else None
        elif c.plan != win[0]:
            why = "plan not on the passing path"
        elif role == "coder" and win[1] != 0:
            why = "program failed the sample tests (debugged later)"
        elif role == "debugger" and c.round != win[1]:
            why = "program still failed the sample tests"
        elif role not in ROLES:
            why = "unknown role"
        if why is None:
            ex = call_example(c, t.id, "distill", text)
            if text is not None:
                ex["source"]["edit"] = CLOSED_EDIT
            kept.append(ex)
        elif why in _TEST_REASONS and role in format_only_roles and c.status == "ok" and \
                c.finish_reason == "stop":
            ex = call_example(c, t.id, "distill")
            ex["source"]["tier"] = FORMAT_ONLY
            kept.append(ex)
        else:
            rejected[role, why] += 1
    return kept, rejected


def build_examples(trajectories: list[Trajectory], accept: str = "hidden",
                   format_only_roles=()) -> tuple[list[dict], dict]:
    """Trajectories (in problem order) -> (examples, stats). Pure: same trajectories, same output."""
    examples, rejected, calls = [], Counter(), Counter()
    for t in trajectories:
        kept, rej = trajectory_examples(t, accept, format_only_roles)
        examples += kept
        rejected.update(rej)
        calls.update(c.role for c in t.calls)
    examples = dedup(examples, rejected)
    per_role = Counter(ex["role"] for ex in examples)
    all_calls = [c for t in trajectories for c in t.calls]
    stats = {
        "accept": accept,
        "problems": len(trajectories),
        "passed_hidden": sum(t.passed for t in trajectories),
        "solved_samples": sum(t.solved_samples for t in trajectories),
        "problem_errors": sum(bool(t.error) for t in trajectories),
        "backend_errors": sum(c.status == "error" for c in all_calls),
        "teacher_tokens": {"prompt": sum(c.prompt_tokens for c in all_calls),
                           "completion": sum(c.completion_tokens for c in all_calls)},
        "calls": {r: calls[r] for r in ROLES},
        "examples": {r: per_role[r] for r in ROLES},
        "examples_total": len(examples),
        "edited": {r: sum(1 for e in examples if e["role"] == r and e["source"].get("edit")) for r in ROLES},
        "edit_rule": CLOSED_EDIT,
        "format_only": {r: sum(1 for e in examples if e["role"] == r and e["source"].get("tier")) for r in ROLES},
        "format_only_rule": FORMAT_ONLY if format_only_roles else "",
        "rejected": {r: dict(sorted((why, n) for (role, why), n in rejected.items() if role == r)) for r in ROLES},
    }
    return examples, stats


def print_stats(stats: dict, out) -> None:
    ex = ", ".join(f"{r} {stats['examples'][r]}" for r in ROLES)
    print(f"distill: {stats['problems']} trajectories, {stats['passed_hidden']} pass the problem's tests, "
          f"{stats['solved_samples']} the sample tests, {stats['backend_errors']} backend errors; "
          f"examples: {ex} -> {out}/examples.jsonl")


def cli_distill(config: str | None, overrides: list[str]) -> int:
    """`mcl distill [--config RECIPE.toml] [key=value ...]`: the [distill] table of the recipe, then the overrides."""
    cfg = load_config(DistillConfig, config, "distill", overrides)
    stats = distill(cfg)
    print_stats(stats, cfg.out)
    return 0
