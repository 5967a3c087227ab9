"""`mcl miniature`: the miniature experiment as a campaign of resumable shards (recipes/miniature.toml).

    mcl miniature status                      # each stage's done/total, problems/hour per model, hours left
    mcl miniature run                         # the next unfinished shard of the next unfinished stage, then on
    mcl miniature run --shards 1 --commit     # one shard, its files committed to git as it finishes
    mcl miniature run --stage speed           # only that stage (--index 1: only its shard 1)
    mcl miniature run --stage corrections     # part 2: the supervisor-guided corrections of the student's failures
    mcl miniature gate                        # teacher vs student (and the speed stage) -> gate.json + tables
    mcl miniature sft --out runs/miniature/sft.jsonl     # SFT inputs rebuilt from the committed records (teacher
                                                         # trajectories + corrections; --no-corrections: without)
    (each takes --config FILE and key=value overrides of its [campaign] table)

The problems: MBPP train + validation, minus every problem whose normalised statement overlaps (either inside
the other) a statement of HumanEval or the MBPP test split (eval.decontaminate.normalise), in an order shuffled
by `seed`; the first `held_out` of that order are the held-out training problems on which every tuning decision
is taken (never trained on). Nothing of an evaluation benchmark is read beyond its statements.

Stages, in order; a stage is a list of shards, a shard a fixed list of problems and a list of arms:
  trajectories  shard i = problems [i*shard_size, (i+1)*shard_size): arm "teacher" then arm "student", both MapCoder
                (k, t, max_new_tokens, greedy) on the packed weights, by this commit's code. Both arms of a pair
                sit in one shard, so a change of code or machine between shards cannot bias the comparison.
  speed         the first `speed_problems` problems, one shard per model: arms "before_fp32" and "before_q4" run
                the code of `speed_base` (before the prompt layout and the packed teacher), "after_q4" this
                commit's: problems/hour and prefix-cache hit rate of each.
  corrections   (part 2) shard i = the student's failed trajectories of trajectory shard i, held-out problems
                left out: the teacher as supervisor blames the planner or the coder and writes feedback, the
                student regenerates, the teacher regenerates where the student's program still fails
                (recipes/correct.py); `correct_rounds` rounds per failure.

A shard runs its arms one after another, each a child process (recipes/miniature_arm.py) that appends each
finished problem to runs/miniature/<stage>/shard-NNN/<arm>/trajectories.jsonl (corrections.jsonl; fsync'ed): a
kill loses at most the problems in flight, and the rerun continues the same shard, at the same commit on the same
CPU model (else the shard restarts whole); a speed arm, being one measurement, restarts whole (its finished arms
are kept). When every arm is done, the shard's records go to OUT/<stage>/shard-NNN.jsonl.gz (one line per problem
and arm, "arm" added) and its provenance to OUT/<stage>/shard-NNN.json: commit, CPU model and ISA flags, threads,
load average, dates, and per arm the wall time, problems/hour and prefix-cache counters (corrections: the stats).
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.agents.problem import Problem
from engine.roles import ROLES
from kernels.cpu_info import cpu_model, isa
from recipes.common import git_commit, load_config, read_jsonl_resumable

CODE = Path(__file__).resolve().parents[1]         # the code tree this command runs from
STAGES = ("trajectories", "speed", "corrections")
PART = {"trajectories": 1, "speed": 1, "corrections": 2}
RECORDS = {"mapcoder": "trajectories.jsonl", "correct": "corrections.jsonl"}    # an arm's output, by task


@dataclass
class MiniatureConfig:
    student: str = "qwen2.5-coder-0.5b"
    teacher: str = "qwen2.5-coder-1.5b"           # also the supervisor of the correction stage
    weights: str = "q4"                            # the GGUF's own blocks (engine/loading/packed_model.py)
    benchmark: str = "mbpp"
    splits: list = field(default_factory=lambda: ["train", "validation"])
    data: str = ""                                 # benchmark data path ("" = the loader's default)
    decontaminate: list = field(default_factory=lambda: ["humaneval", "mbpp:test"])
    seed: int = 0                                  # shuffles the problems; decoding is greedy
    held_out: int = 50                             # the first held_out problems of the order: tuning only
    shard_size: int = 16
    k: int = 1
    t: int = 1
    max_new_tokens: int = 256
    concurrency: int = 16                          # problems in flight = scheduler slots
    threads: int = 2
    speed_problems: int = 40
    speed_base: str = "3a45b18"                    # the code before the prompt layout change and the packed teacher
    correct_rounds: int = 1                        # corrections: supervisor -> regenerate -> test, per failure
    out: str = "recipes/data/miniature"
    work: str = "runs/miniature"


@dataclass
class Arm:
    name: str
    model: str                                     # mapcoder: the agents' model; correct: the first regenerator
    weights: str
    tree: str = ""                                 # "" = this code tree, else a commit to check out
    task: str = "mapcoder"                         # mapcoder (recipes.distill) | correct (recipes.correct)
    supervisor: str = ""                           # correct: the supervisor, also the fallback regenerator


@dataclass
class Shard:
    stage: str
    index: int
    problems: list[Problem]
    arms: list[Arm]

    @property
    def name(self) -> str:
        return f"shard-{self.index:03d}"


# --- the problems ------------------------------------------------------------------------------------------

def select_problems(cfg: MiniatureConfig) -> tuple[list[Problem], list[dict]]:
    """(the campaign's problems in their seeded order, the dropped ones as {"id", "overlaps"})."""
    import random

    from eval.benchmarks import load
    from eval.decontaminate import MIN_CHARS, normalise
    problems = [p for split in cfg.splits for p in load(cfg.benchmark, cfg.data or None, split=split)]
    evals = []
    for spec in cfg.decontaminate:
        name, _, split = spec.partition(":")
        evals += [(p.id, normalise(p.description)) for p in load(name, split=split or None)]
    kept, dropped = [], []
    for p in problems:
        s = normalise(p.description)
        hits = [eid for eid, e in evals if (len(e) >= MIN_CHARS and e in s) or (len(s) >= MIN_CHARS and s in e)]
        (dropped.append({"id": p.id, "overlaps": hits}) if hits else kept.append(p))
    random.Random(cfg.seed).shuffle(kept)
    return kept, dropped


def plan(cfg: MiniatureConfig, problems: list[Problem]) -> dict[str, list[Shard]]:
    n = cfg.shard_size
    traj = [Shard("trajectories", i, problems[i * n:(i + 1) * n],
                  [Arm("teacher", cfg.teacher, cfg.weights), Arm("student", cfg.student, cfg.weights)])
            for i in range((len(problems) + n - 1) // n)]
    speed = [Shard("speed", i, problems[:cfg.speed_problems],
                   [Arm("before_fp32", model, "fp32", cfg.speed_base), Arm("before_q4", model, "q4", cfg.speed_base),
                    Arm("after_q4", model, "q4")])
             for i, model in enumerate((cfg.student, cfg.teacher))]
    return {"trajectories": traj, "speed": speed, "corrections": correction_shards(cfg, problems)}


def correction_shards(cfg: MiniatureConfig, problems: list[Problem]) -> list[Shard]:
    """Shard i: the student's failed trajectories of finished trajectory shard i, held-out problems left out (they
    are never trained on). One arm: the supervisor (the teacher) blames and gives feedback, the student regenerates,
    the teacher regenerates where the student's program still fails (recipes.correct). A trajectory shard not yet
    finished has no correction shard yet."""
    held = {p.id for p in problems[:cfg.held_out]}
    by_id = {p.id: p for p in problems}
    out = []
    for meta, recs in finished(cfg, "trajectories"):
        failed = [by_id[r["id"]] for r in recs
                  if r["arm"] == "student" and not r["passed"] and r["id"] not in held and r["id"] in by_id]
        if failed:
            out.append(Shard("corrections", meta["shard"], failed,
                             [Arm("correct", cfg.student, cfg.weights, task="correct", supervisor=cfg.teacher)]))
    return out


# --- files -------------------------------------------------------------------------------------------------

def shard_files(cfg: MiniatureConfig, shard: Shard) -> tuple[Path, Path]:
    d = Path(cfg.out) / shard.stage
    return d / f"{shard.name}.jsonl.gz", d / f"{shard.name}.json"


def is_done(cfg: MiniatureConfig, shard: Shard) -> bool:
    return all(p.is_file() for p in shard_files(cfg, shard))


def read_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(cfg: MiniatureConfig, stage: str) -> list[tuple[dict, list[dict]]]:
    """(provenance, records) of every finished shard of `stage`, in shard order."""
    d = Path(cfg.out) / stage
    out = []
    for meta_path in sorted(d.glob("shard-*.json")):
        data = meta_path.with_name(meta_path.stem + ".jsonl.gz")
        if data.is_file():
            out.append((json.loads(meta_path.read_text()), read_records(data)))
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- running a shard ---------------------------------------------------------------------------------------

def _tree(cfg: MiniatureConfig, arm: Arm) -> Path:
    """The code an arm runs: this tree, or a detached git worktree of `arm.tree` under the work directory."""
    if not arm.tree:
        return CODE
    sha = subprocess.run(["git", "rev-parse", arm.tree], cwd=CODE, capture_output=True, text=True, check=True).stdout.strip()
    path = Path(cfg.work).resolve() / "trees" / sha[:12]
    if not (path / "engine").is_dir():
        subprocess.run(["git", "worktree", "add", "-f", "--detach", str(path), sha], cwd=CODE, check=True,
                       capture_output=True)
    return path


def _die_with_parent():                              # a killed campaign takes its running arm with it
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


def run_arm(cfg: MiniatureConfig, shard: Shard, arm: Arm, work: Path) -> dict:
    """Run (or resume) one arm in a child process; its result dict (recipes/miniature_arm.py). A speed-stage arm is
    a measurement of all its problems in one process, so a killed one starts over rather than resuming."""
    result = work / arm.name / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    if shard.stage == "speed" and (work / arm.name).is_dir():
        print(f"miniature: {shard.stage} {shard.name} arm {arm.name} was stopped mid-measurement: starting it over",
              flush=True)
        shutil.rmtree(work / arm.name)
    tree = _tree(cfg, arm)
    (work / arm.name).mkdir(parents=True, exist_ok=True)
    spec = {"model": arm.model, "weights": arm.weights, "problems": str(work / "problems.json"), "k": cfg.k,
            "t": cfg.t, "max_new_tokens": cfg.max_new_tokens, "concurrency": cfg.concurrency,
            "threads": cfg.threads, "out": str(work / arm.name), "result": str(result), "task": arm.task}
    if arm.task == "correct":                      # its input: the student's trajectories of those problems
        ids = {p.id for p in shard.problems}
        src = shard_files(cfg, Shard("trajectories", shard.index, [], []))[0]
        trajs = [{k: v for k, v in r.items() if k not in ("arm", "model", "weights")} for r in read_records(src)
                 if r["arm"] == "student" and r["id"] in ids]
        inp = work / arm.name / "input.jsonl"
        inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in trajs))
        spec.update(trajectories=str(inp), supervisor=arm.supervisor, rounds=cfg.correct_rounds)
    (work / arm.name / "spec.json").write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"miniature: {shard.stage} {shard.name} arm {arm.name}: {arm.model} ({arm.weights}) on "
          f"{len(shard.problems)} problems, code {arm.tree or 'this tree'}", flush=True)
    t0 = time.time()
    rc = subprocess.run([sys.executable, str(CODE / "recipes" / "miniature_arm.py"), str(work / arm.name / "spec.json")],
                        cwd=tree, env=env, preexec_fn=_die_with_parent).returncode
    if rc != 0 or not result.is_file():
        raise RuntimeError(f"miniature: {shard.stage} {shard.name} arm {arm.name} failed (exit {rc}); its finished "
                           f"problems are kept in {work / arm.name}, rerun to continue")
    res = json.loads(result.read_text())
    res.update(commit=git_commit(tree), started=datetime.datetime.fromtimestamp(t0, datetime.timezone.utc)
               .isoformat(timespec="seconds"))
    result.write_text(json.dumps(res, indent=1))
    return res


def _dirty(tree: Path) -> bool:
    """Whether the code tree has uncommitted changes to tracked files (its commit then does not name its code)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True,
                         text=True)
    return bool(out.stdout.strip())


def run_shard(cfg: MiniatureConfig, shard: Shard) -> dict:
    work = Path(cfg.work).resolve() / shard.stage / shard.name      # absolute: an arm runs in its own tree
    machine = {"commit": git_commit(), "dirty": _dirty(CODE), **isa(), "logical_cpus": os.cpu_count(), "threads": cfg.threads}
    marker = work / "started.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if {k: before.get(k) for k in ("commit", "cpu_model")} != {k: machine[k] for k in ("commit", "cpu_model")}:
            print(f"miniature: {work} was started at another commit or on another CPU: restarting the shard whole",
                  flush=True)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        marker.write_text(json.dumps({**machine, "date": _now()}))
    (work / "problems.json").write_text(json.dumps([p.to_dict() for p in shard.problems]))
    started, load0, t0 = json.loads(marker.read_text())["date"], os.getloadavg()[0], time.perf_counter()
    arms = {a.name: run_arm(cfg, shard, a, work) for a in shard.arms}
    order = {p.id: i for i, p in enumerate(shard.problems)}
    records = []
    for a in shard.arms:
        recs = {r["id"]: r for r in read_jsonl_resumable(work / a.name / RECORDS[a.task]) if r["id"] in order}
        ok = "passed" if a.task == "mapcoder" else "success"             # solved / corrected
        if len(recs) != len(order):
            raise RuntimeError(f"miniature: {shard.name} arm {a.name} holds {len(recs)} of {len(order)} problems")
        records += [{"arm": a.name, "model": a.model, "weights": a.weights, **recs[pid]} for pid in order]
        wall = arms[a.name]["wall_s"]
        arms[a.name].update(model=a.model, weights=a.weights, code=a.tree or "this commit",
                            problems_per_hour=round(3600 * arms[a.name]["problems_run"] / wall, 1) if wall else None,
                            passed=sum(bool(recs[p][ok]) for p in order))
    meta = {"stage": shard.stage, "shard": shard.index, "problems": list(order), **machine,
            "settings": {k: getattr(cfg, k) for k in ("k", "t", "max_new_tokens", "concurrency", "seed")},
            "started": started, "finished": _now(), "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "wall_s_this_process": round(time.perf_counter() - t0, 1), "arms": arms}
    data, prov = shard_files(cfg, shard)
    lines = "".join(json.dumps(r, ensure_ascii=False, default=repr) + "\n" for r in records).encode()
    _write_atomic(data, gzip.compress(lines, mtime=0))
    _write_atomic(prov, (json.dumps(meta, indent=1) + "\n").encode())       # written last: the shard is done
    shutil.rmtree(work)
    return meta


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit_files(paths: list[Path], message: str) -> None:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=paths[0].parent, capture_output=True,
                          text=True, check=True).stdout.strip()
    rel = [str(p.resolve().relative_to(root)) for p in paths]
    for _ in range(5):                                   # another git command may hold the index lock for a moment
        add = subprocess.run(["git", "add", "--", *rel], cwd=root, capture_output=True, text=True)
        done = add.returncode == 0 and subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=root,
                                                      capture_output=True, text=True).returncode == 0
        if done:
            return
        time.sleep(3)
    print(f"miniature: could not commit {', '.join(rel)} (git busy?); the files are in place, commit them by hand",
          flush=True)


def run(cfg: MiniatureConfig, stage: str = "", shards: int = 0, hours: float = 0.0, commit: bool = False,
        index: int = -1) -> int:
    """Run unfinished shards in stage order (only `stage` if given, only shard `index` if >= 0): at most `shards`
    (0 = all), starting no new shard after `hours` (0 = no limit). With `commit`, each finished shard's two files
    are committed to git."""
    if stage and stage not in STAGES:
        raise ValueError(f"miniature: stage {stage!r}: expected one of {', '.join(STAGES)}")
    if index >= 0 and not stage:
        raise ValueError("miniature: --index needs --stage (shard numbers count within a stage)")
    problems, _ = select_problems(cfg)
    planned = plan(cfg, problems)
    have = [s.index for s in planned.get(stage, [])]
    if index >= 0 and index not in have:
        span = f"shards {have[0]}..{have[-1]}" if have else "no shards yet"
        raise ValueError(f"miniature: stage {stage} has {span}, not {index}")
    todo = [s for st in STAGES if not stage or st == stage for s in planned[st]
            if not is_done(cfg, s) and index in (-1, s.index)]
    t0, ran = time.time(), 0
    for s in todo:
        if (shards and ran >= shards) or (hours and time.time() - t0 > hours * 3600):
            break
        meta = run_shard(cfg, s)
        ran += 1
        rates = ", ".join(f"{a} {m['passed']}/{len(s.problems)} passed, {m['problems_per_hour']}/h"
                          for a, m in meta["arms"].items())
        print(f"miniature: {s.stage} {s.name} done ({rates})", flush=True)
        if commit:
            _git_commit_files(list(shard_files(cfg, s)),
                              f"miniature: {s.stage} {s.name} ({rates}; {meta['cpu_model']}, {cfg.threads} threads)")
    return ran


# --- status ------------------------------------------------------------------------------------------------

def rates(cfg: MiniatureConfig, cpu: str = "", stage: str = "trajectories") -> dict[str, float]:
    """Measured problems/hour of each model (an arm's first model) over the finished shards of `stage` (problems
    run / wall), only those run on CPU model `cpu` when given."""
    n, w = {}, {}
    for meta, _ in finished(cfg, stage):
        if cpu and meta.get("cpu_model") != cpu:
            continue
        for a in meta["arms"].values():
            n[a["model"]] = n.get(a["model"], 0) + a["problems_run"]
            w[a["model"]] = w.get(a["model"], 0.0) + a["wall_s"]
    return {m: 3600 * n[m] / w[m] for m in n if w[m] > 0}


def status(cfg: MiniatureConfig) -> dict:
    problems, dropped = select_problems(cfg)
    here = cpu_model()
    per_hour = rates(cfg, here) or rates(cfg)               # this machine's rate where it has run a shard
    corr_hour = rates(cfg, here, "corrections") or rates(cfg, stage="corrections")
    out = {"problems": len(problems), "dropped_by_decontamination": dropped, "held_out": cfg.held_out,
           "problems_per_hour": {m: round(r, 1) for m, r in per_hour.items()},
           "corrections_per_hour": {m: round(r, 1) for m, r in corr_hour.items()}, "stages": {}}
    print(f"miniature: {len(problems)} problems ({cfg.benchmark} {'+'.join(cfg.splits)}; "
          f"{len(dropped)} dropped as overlapping {', '.join(cfg.decontaminate)}: "
          f"{', '.join(d['id'] + '~' + '/'.join(d['overlaps']) for d in dropped)}), first {cfg.held_out} held out")
    for st, shards in plan(cfg, problems).items():
        done = [s for s in shards if is_done(cfg, s)]
        left = [s for s in shards if not is_done(cfg, s)]
        hours, unknown = 0.0, set()
        for s in left:
            for a in s.arms:
                r = (corr_hour if a.task == "correct" else per_hour).get(a.model)
                if r:
                    hours += len(s.problems) / r * (1.0 if a.weights == cfg.weights else 2.0)   # fp32 ~2x slower
                else:
                    unknown.add(a.model if a.task == "mapcoder" else f"{a.task} ({a.model})")
        n_done = sum(len(s.problems) for s in done)
        n_all = sum(len(s.problems) for s in shards)
        out["stages"][st] = {"part": PART[st], "shards_done": len(done), "shards": len(shards), "problems_done": n_done,
                             "problems": n_all, "hours_left": round(hours, 1), "unmeasured": sorted(unknown)}
        eta = f"{hours:.1f} h left" + (f" (+ unmeasured: {', '.join(sorted(unknown))})" if unknown else "")
        print(f"  {st:<13} {len(done):>3}/{len(shards)} shards, {n_done}/{n_all} problems, {eta}")
    rate_txt = ", ".join(f"{m} {r:.1f}" for m, r in per_hour.items()) or "not measured yet"
    where = f"on this CPU ({here})" if rates(cfg, here) else "on other CPUs (none run here yet)"
    parts = []
    for part in sorted(set(PART.values())):
        sts = [v for st, v in out["stages"].items() if PART[st] == part]
        complete = all(v["shards_done"] == v["shards"] for v in sts) and (part == 1 or out["stages"]["trajectories"][
            "shards_done"] == out["stages"]["trajectories"]["shards"])          # part 2's shards follow part 1's
        hours = sum(v["hours_left"] for v in sts)
        out[f"part{part}"] = {"complete": complete, "hours_left": round(hours, 1)}
        parts.append(f"part {part} " + ("complete" if complete else f"open, {hours:.1f} h left"
                                        + (" + unmeasured" if any(v["unmeasured"] for v in sts) else "")))
    print(f"  problems/hour {where}: {rate_txt}; {'; '.join(parts)}")
    out["complete"], out["hours_left"] = out["part1"]["complete"], out["part1"]["hours_left"]
    return out


# --- the gate ----------------------------------------------------------------------------------------------

def gate(cfg: MiniatureConfig, out_json: str = "bench/results/miniature/gate.json") -> dict:
    """Teacher vs student on the finished trajectory shards: paired pass@1, format failures and tokens per role,
    problems/hour; written to `out_json` and printed as a table."""
    from eval.stats import paired
    shards = finished(cfg, "trajectories")
    by_arm: dict[str, dict[str, dict]] = {"teacher": {}, "student": {}}
    for _, recs in shards:
        for r in recs:
            by_arm[r["arm"]][r["id"]] = r
    if not by_arm["teacher"]:
        raise ValueError(f"miniature gate: no finished trajectory shard under {cfg.out}/trajectories")
    problems, _ = select_problems(cfg)
    held = {p.id for p in problems[:cfg.held_out]}
    result = {"command": "mcl miniature gate", "date": _now(), "commit": git_commit(), "shards": len(shards),
              "records": f"{cfg.out}/trajectories/shard-*.jsonl.gz",
              "settings": {k: getattr(cfg, k) for k in ("teacher", "student", "weights", "k", "t", "max_new_tokens")},
              "problems_per_hour": {m: round(r, 1) for m, r in rates(cfg).items()},
              "cpus": sorted({m["cpu_model"] for m, _ in shards})}
    ids = sorted(by_arm["teacher"])
    for name, sel in (("all", ids), ("held_out", [i for i in ids if i in held])):
        if sel:
            p = paired({i: by_arm["student"][i]["passed"] for i in sel}, {i: by_arm["teacher"][i]["passed"] for i in sel})
            result[f"pass_at_1_{name}"] = {"n": p["n"], "student": p["base"], "teacher": p["adapted"],
                                           "delta_teacher_minus_student": p["delta"], "ci95": p["ci95"],
                                           "mcnemar_p": p["mcnemar_p"], "teacher_only": p["c"], "student_only": p["b"]}
    for arm, recs in by_arm.items():
        calls = [c for r in recs.values() for c in r.get("calls", [])]
        result[arm] = {
            "model": cfg.teacher if arm == "teacher" else cfg.student,
            "format_failures": {role: [sum(c["status"] == "failed" for c in calls if c["role"] == role),
                                       sum(c["role"] == role for c in calls)] for role in ROLES},
            "tokens": {role: {"prompt": sum(c["prompt_tokens"] for c in calls if c["role"] == role),
                              "completion": sum(c["completion_tokens"] for c in calls if c["role"] == role)}
                       for role in ROLES},
            "problem_errors": sum(bool(r.get("error")) for r in recs.values()),
        }
    result["speed"] = speed_results(cfg)
    _write_atomic(Path(out_json), (json.dumps(result, indent=1) + "\n").encode())
    a = result["pass_at_1_all"]
    print(f"gate on {a['n']} problems ({len(shards)} shards): teacher {a['teacher']}/{a['n']}, student "
          f"{a['student']}/{a['n']}, delta {a['delta_teacher_minus_student']:+.3f} ci95 {a['ci95']} "
          f"McNemar p {a['mcnemar_p']:.3g} -> {out_json}\n")
    print(markdown(result))
    return result


def speed_results(cfg: MiniatureConfig) -> list[dict]:
    """Each finished speed shard (one model, its arms side by side on the same problems and machine): per arm
    problems/hour, passed, prompt / prefilled / decoded tokens and the prefix-cache token hit rate; and the ratios
    of "after_q4"'s problems/hour to each "before" arm's."""
    out = []
    for meta, _ in finished(cfg, "speed"):
        arms = {}
        for name, a in meta["arms"].items():
            pre, sch = a.get("prefix", {}), a.get("scheduler", {})
            arms[name] = {"weights": a["weights"], "code": a.get("commit", "")[:7], "problems": a["problems_run"],
                          "passed": a["passed"], "wall_s": a["wall_s"], "problems_per_hour": a["problems_per_hour"],
                          "prompt_tokens": pre.get("prompt_tokens"), "prefill_tokens": pre.get("prefill_tokens"),
                          "decode_tokens": sch.get("decode_tokens"), "token_hit_rate": pre.get("token_hit_rate")}
        after = arms.get("after_q4", {}).get("problems_per_hour")
        ratios = {f"after_q4_vs_{n}": round(after / a["problems_per_hour"], 2) for n, a in arms.items()
                  if n != "after_q4" and after and a["problems_per_hour"]}
        out.append({"shard": meta["shard"], "model": next(iter(meta["arms"].values()))["model"],
                    "cpu_model": meta["cpu_model"], "threads": meta["threads"], "finished": meta["finished"],
                    "arms": arms, **ratios})
    return out


def markdown(result: dict) -> str:
    """The gate (and the speed stage, when run) as markdown tables, every figure from `result` (gate.json)."""
    lines = ["| problems | n | teacher passed | student passed | teacher - student (ci95) | McNemar p |",
             "|---|---|---|---|---|---|"]
    for name, label in (("all", "all training problems"), ("held_out", "held-out subset")):
        a = result.get(f"pass_at_1_{name}")
        if a:
            lines.append(f"| {label} | {a['n']} | {a['teacher']} ({a['teacher'] / a['n']:.1%}) | {a['student']} "
                         f"({a['student'] / a['n']:.1%}) | {100 * a['delta_teacher_minus_student']:+.1f} pts "
                         f"[{100 * a['ci95'][0]:+.1f}, {100 * a['ci95'][1]:+.1f}] | {a['mcnemar_p']:.2g} |")
    t, st = result["teacher"], result["student"]
    lines += ["", f"| role | teacher format failures | teacher prompt / new tokens | student format failures "
                  f"| student prompt / new tokens |", "|---|---|---|---|---|"]
    for k in ROLES:
        lines.append(f"| {k} | " + " | ".join(f"{r['format_failures'][k][0]}/{r['format_failures'][k][1]} | "
                                             f"{r['tokens'][k]['prompt']:,} / {r['tokens'][k]['completion']:,}"
                                             for r in (t, st)) + " |")
    rate = result["problems_per_hour"]
    lines += ["", f"Problems/hour over the trajectory shards ({', '.join(result['cpus'])}): teacher {t['model']} "
                  f"{rate.get(t['model'], '?')}, student {st['model']} {rate.get(st['model'], '?')}."]
    if result.get("speed"):
        lines += ["", "| model | arm | code | weights | problems | passed | problems/hour "
                      "| prefix-cache token hit rate | after_q4 / this |", "|---|---|---|---|---|---|---|---|---|"]
        for sh in result["speed"]:
            for name, a in sh["arms"].items():
                ratio = sh.get(f"after_q4_vs_{name}", "")
                lines.append(f"| {sh['model']} | {name} | {a['code']} | {a['weights']} | {a['problems']} "
                             f"| {a['passed']} | {a['problems_per_hour']} | {a['token_hit_rate']} "
                             f"| {f'{ratio}x' if ratio else ''} |")
    return "\n".join(lines)


# --- SFT inputs from the committed records -----------------------------------------------------------------

def sft(cfg: MiniatureConfig, out: str, arm: str = "teacher", corrections: bool = True) -> dict:
    """The arm's trajectories on the non-held-out problems -> distill's examples (recipes.distill.build_examples),
    then (with `corrections`) the examples of every finished corrections shard (the corrected trajectories, their
    original prompts), exact duplicates dropped; written to `out`. No model runs. Returns distill's stats with
    "corrections": records, corrected, examples per role."""
    from recipes.common import dedup, write_examples
    from recipes.distill import build_examples
    from recipes.trajectory import Trajectory
    problems, _ = select_problems(cfg)
    held = {p.id for p in problems[:cfg.held_out]}
    order = {p.id: i for i, p in enumerate(problems)}
    trajs = [Trajectory.from_dict({k: v for k, v in r.items() if k not in ("arm", "model", "weights")}, "miniature")
             for _, recs in finished(cfg, "trajectories") for r in recs
             if r["arm"] == arm and r["id"] not in held]
    trajs.sort(key=lambda t: order[t.id])
    examples, stats = build_examples(trajs)
    fixed = [r for _, recs in finished(cfg, "corrections") for r in recs if r["id"] not in held] if corrections else []
    extra = [e for r in fixed for e in r.get("examples", [])]
    examples = dedup(examples + extra)
    stats["corrections"] = {"records": len(fixed), "corrected": sum(bool(r.get("success")) for r in fixed),
                            "examples": {role: sum(e["role"] == role for e in extra) for role in ROLES}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_examples(Path(out), examples)
    print(f"miniature sft: {len(trajs)} {arm} trajectories (held-out excluded) -> {stats['examples']}; "
          f"{stats['corrections']['corrected']} of {len(fixed)} corrections -> {stats['corrections']['examples']}; "
          f"{len(examples)} examples after dropping duplicates -> {out}")
    return stats


# --- command line ------------------------------------------------------------------------------------------

def cli_miniature(action: str, argv: list[str]) -> int:
    """`mcl miniature ACTION [flags] [key=value ...]` (flags and overrides in any order)."""
    import argparse
    ap = argparse.ArgumentParser(prog=f"mcl miniature {action}")
    ap.add_argument("--config", default=None, help="campaign TOML with a [campaign] table (default recipes/miniature.toml)")
    ap.add_argument("--stage", default="", help="run: only this stage (trajectories | speed)")
    ap.add_argument("--shards", type=int, default=0, help="run: at most this many shards (0 = all)")
    ap.add_argument("--index", type=int, default=-1, help="run: only this shard of --stage (e.g. 1: the speed "
                                                          "stage's teacher)")
    ap.add_argument("--hours", type=float, default=0.0, help="run: start no new shard after this many hours")
    ap.add_argument("--commit", action="store_true", help="run: git-commit each finished shard's two files")
    ap.add_argument("--out", default="", help="gate: the JSON to write; sft: the examples file")
    ap.add_argument("--no-corrections", action="store_true", help="sft: the teacher's trajectories only (ablation)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of [campaign]")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(MiniatureConfig, a.config or str(CODE / "recipes" / "miniature.toml"), "campaign", a.overrides)
    if action == "status":
        status(cfg)
    elif action == "run":
        run(cfg, a.stage, a.shards, a.hours, a.commit, a.index)
        status(cfg)
    elif action == "gate":
        gate(cfg, a.out or "bench/results/miniature/gate.json")
    else:
        sft(cfg, a.out or f"{cfg.work}/sft.jsonl", corrections=not a.no_corrections)
    return 0
