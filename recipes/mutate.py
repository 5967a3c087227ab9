"""Debugger examples from the teacher's passing programs: each with one seeded small bug and its real test report,
and (optionally) the student's own failing programs, each answered with the teacher's passing program.

    mcl mutate --config recipes/mini_e2e.toml                    # the [mutate] table of a recipe
    mcl mutate trajectories=runs/distill/trajectories.jsonl out=runs/mutate per_program=3
    mcl mutate trajectories=runs/distill/trajectories.jsonl student_trajectories=runs/student/trajectories.jsonl

    from recipes.mutate import MutateConfig, mutate, mutants
    stats = mutate(MutateConfig(trajectories=..., out=...), run_tests=...)

Why: the paper's debugger data are teacher calls that turned failing code into passing code. A weak teacher
(the miniature's Qwen2.5-Coder-0.5B) almost never fixes a program, so distill yields no such call. This stage
makes real ones from what the teacher did get right. For each trajectory whose final program passes every
test of its problem (distill's accept="hidden" rule):

    the passing program  -> every single-line mutation site (ast): a comparison flipped (< <=, == !=, in / not in),
                            an arithmetic operator swapped (+ -, * //, / //, %, **), an integer constant off by one,
                            and / or swapped, a `not` dropped, min / max swapped, a call's first two arguments swapped
                         -> sites in a seeded order (sha256 of seed + problem id; no Python hash())
                         -> each mutant run on the problem's SAMPLE tests in the sandbox (eval.harness)
                         -> kept when it fails them (wrong answer or error; a timeout is rejected, counted)
                         -> at most per_program mutants, at most max_tries sandbox runs per program; a program
                            whose answer (below) would exceed max_answer_chars is skipped (the eval budget)
    one mutant -> one debugger example: the debugger's own prompt (prompts.debugger: problem, the winning plan,
                  the mutant, its real test report, the retrieved algorithm) and as the answer what the debugger's
                  system prompt asks for, the plan's numbered steps (plan_steps: without what the teacher wrote
                  after them) and then the passing program as written:

        1. ...
        2. ...

        ```python
        <the passing program>
        ```

    No headings and no quoted line at fault in the answer: a first version began "The mistake is on line N:
    `bad` should be `good`." under "# Revised plan" / "# Program" headings, and the 135M student looped while
    quoting long lines and continued the prompt's own "# Relevant algorithm" section after a heading
    (runs/mini/main48m: 3 of 12 debugger answers without code).

A second source, on when student_trajectories is set: the student's own failing programs. Run the student
itself through distill on the same problems (`mcl distill teacher=smollm2-135m out=runs/mini/student_base`);
each debugger call it made there is a prompt the student's debugger really sees at eval time (its own plan,
its own failing program -- often degenerate, repeated text cut at the token limit -- its real test report)
and becomes an example answered with the teacher's plan steps and passing program for that problem
(source.origin = "student_repair"). Calls whose prompt exceeds max_prompt_tokens (the student's own count,
recorded in the call) are skipped so that prompt + answer fit the trainer's max_len.

The examples are labelled (source.origin = "mutation", with the operator and line; "student_repair", with
the round) and counted in OUT/stats.json; build_sft merges them and PROVENANCE.json names the rules. Pure and
deterministic given the trajectories and the sandbox: no model is called, a rerun rewrites the same files.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from engine.agents import parsers, prompts
from recipes.common import dedup, load_config, read_jsonl_resumable, run_record, write_examples, write_meta
from recipes.trajectory import Trajectory, winning_attempt

RULE = ("mutation: the teacher's passing program (every test of its problem passes) with one seeded single-line "
        "bug that fails the sample tests in the sandbox; the answer is the plan's steps and the passing program "
        "as written")
STUDENT_RULE = ("student_repair: a debugger call of the student's own distill run (its failing program and real "
                "test report, as its debugger saw them) answered with the teacher's plan steps and passing program "
                "for the same problem")


@dataclass
class MutateConfig:
    trajectories: str = "runs/distill/trajectories.jsonl"   # from mcl distill
    per_program: int = 2                 # mutants kept per passing program
    max_tries: int = 12                  # sandbox runs per program at most
    max_answer_chars: int = 1400         # longer answers are rejected: the debugger's budget is 2 x 256 new
                                         # tokens at eval, ~3 characters each for SmolLM2 on these answers
    seed: int = 0
    student_trajectories: str = ""      # `mcl distill teacher=<student>` trajectories: its debugger calls become
                                        # examples answered with the teacher's passing program ("" = off)
    max_prompt_tokens: int = 800        # student calls with longer prompts are skipped (prompt + answer <= max_len)
    out: str = "runs/mutate"


# --- mutation sites ----------------------------------------------------------------------------------------

_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult, ast.Div: ast.FloorDiv,
        ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
_SWAP_CALL = {"min": "max", "max": "min"}


def _variants(node: ast.AST):
    """(operator name, mutated copy of `node`) for each mutation of `node` itself."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMP:
                new = _copy(node)
                new.ops[i] = _CMP[type(op)]()
                yield "comparison", new
    elif isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        new = _copy(node)
        new.op = _BIN[type(node.op)]()
        yield "arithmetic", new
    elif isinstance(node, ast.BoolOp):
        new = _copy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield "boolean", new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "negation", node.operand
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield "constant", ast.Constant(node.value + 1)
    elif isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id in _SWAP_CALL:
            new = _copy(node)
            new.func = ast.Name(_SWAP_CALL[node.func.id], ast.Load())
            yield "min/max", new
        if len(node.args) >= 2 and not any(isinstance(a, ast.Starred) for a in node.args[:2]):
            new = _copy(node)
            new.args[0], new.args[1] = new.args[1], new.args[0]
            yield "arguments", new


def _copy(node):
    return ast.parse(ast.unparse(node), mode="eval").body


@dataclass(frozen=True)
class Mutant:
    code: str
    operator: str
    line: int            # 1-based
    bad: str             # the mutated line, stripped
    good: str            # the original line, stripped


def mutants(code: str) -> list[Mutant]:
    """Every single-line mutation of `code`, in source order; [] when it does not parse. Each mutant replaces
    the node's source span (one line) by the unparsed mutated node, so the rest of the program keeps its text."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    lines = code.splitlines()
    out, seen = [], set()
    for node in ast.walk(tree):
        if not hasattr(node, "lineno") or node.lineno != node.end_lineno:
            continue
        row = node.lineno - 1
        src = lines[row]
        # ast offsets are UTF-8 byte offsets; slice the encoded line
        raw = src.encode()
        for op, new in _variants(node):
            bad_line = (raw[:node.col_offset] + ast.unparse(new).encode() + raw[node.end_col_offset:]).decode()
            if bad_line == src:
                continue
            bad_code = "\n".join(lines[:row] + [bad_line] + lines[row + 1:]) + ("\n" if code.endswith("\n") else "")
            if bad_code in seen or not parsers.compiles(bad_code):
                continue
            seen.add(bad_code)
            out.append(Mutant(bad_code, op, row + 1, bad_line.strip(), src.strip()))
    out.sort(key=lambda m: (m.line, m.bad))
    return out


def _order(items: list, seed: int, key: str) -> list:
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big"))
    items = list(items)
    rng.shuffle(items)
    return items


# --- trajectories -> examples ------------------------------------------------------------------------------

def winning_plan(t: Trajectory) -> str | None:
    """The plan text the passing program was written (or debugged) from, as the agents saw it: the debugger's
    revised plan when a debug round won, else the planner's plan of the winning attempt."""
    win = winning_attempt(t)
    if win is None:
        return None
    plan, rnd = win
    for c in t.calls:
        if rnd and c.role == "debugger" and c.plan == plan and c.round == rnd:
            d = parsers.parse_debugger(c.response)
            if d and d.plan.strip():
                return d.plan.strip()
    for c in t.calls:
        if c.role == "planner" and c.step == "plan" and c.plan == plan:
            p = parsers.parse_plan(c.response)
            return p.text.strip() if p else None
    return None


_STEP = re.compile(r"^\s*(\d+[.)]|[-*]) ")


def plan_steps(plan: str) -> str:
    """The numbered steps a plan opens with, without what the teacher wrote after them (it often goes on with
    "# Relevant algorithm ...", "# Plan" again, or the problem): lines up to the first heading, or up to the
    first blank line followed by a line that is not a step. The whole text when it does not open with a step."""
    lines = plan.strip().splitlines()
    if not lines or not _STEP.match(lines[0]):
        return plan.strip()
    kept = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            break
        if not line.strip() and (i + 1 == len(lines) or not _STEP.match(lines[i + 1])):
            break
        kept.append(line)
    return "\n".join(kept).strip()


def answer(plan: str, code: str) -> str:
    """The debugger's answer for a code-level bug: the plan's steps (still right), then the passing program."""
    return f"{plan_steps(plan)}\n\n```python\n{code.rstrip()}\n```"


def trajectory_mutants(t: Trajectory, cfg: MutateConfig, run_tests) -> tuple[list[dict], Counter]:
    """One trajectory -> (debugger examples, Counter of reasons: kept / rejected)."""
    why = Counter()
    if not t.clean_pass():
        why["final program fails the problem's tests"] += 1
        return [], why
    problem = t.problem
    code, plan = t.code or "", winning_plan(t)
    if not problem.sample_tests:
        why["no sample tests"] += 1
        return [], why
    if not plan:
        why["no plan on the passing path"] += 1
        return [], why
    sites = _order(mutants(code), cfg.seed, t.id)
    if not sites:
        why["no mutation site"] += 1
        return [], why
    reply = answer(plan, code)                                     # the same for every mutant of this program
    if len(reply) > cfg.max_answer_chars:
        why["answer longer than max_answer_chars"] += 1
        return [], why
    kept = []
    for m in sites[:cfg.max_tries]:
        if len(kept) >= cfg.per_program:
            break
        report = run_tests(problem, m.code, problem.sample_tests)
        if report.passed:
            why["mutant passes the sample tests"] += 1
            continue
        if any(r.verdict == "timeout" for r in report.results):
            why["mutant times out"] += 1
            continue
        msgs = prompts.debugger(problem, plan, m.code, report, t.algorithm)
        msgs.append({"role": "assistant", "content": reply})
        kept.append({"role": "debugger", "messages": msgs,
                     "source": {"origin": "mutation", "problem": t.id, "step": "debug",
                                "operator": m.operator, "line": m.line, "verdict": report.verdict}})
        why["kept"] += 1
    return kept, why


def student_repairs(student: Trajectory, teacher: Trajectory | None, cfg: MutateConfig) -> tuple[list[dict], Counter]:
    """One student trajectory -> (debugger examples: its debugger calls answered with the teacher's passing
    program for the same problem, Counter of reasons)."""
    why = Counter()
    calls = [c for c in student.calls if c.role == "debugger"]
    if not calls:
        why["student made no debugger call"] += 1
        return [], why
    plan = winning_plan(teacher) if teacher and teacher.clean_pass() else None
    if not plan:
        why["no passing teacher program for the problem"] += len(calls)
        return [], why
    reply = answer(plan, teacher.code)
    if len(reply) > cfg.max_answer_chars:
        why["answer longer than max_answer_chars"] += len(calls)
        return [], why
    kept = []
    for c in calls:
        if c.prompt_tokens > cfg.max_prompt_tokens:
            why["prompt longer than max_prompt_tokens"] += 1
            continue
        msgs = [{"role": m["role"], "content": m["content"]} for m in c.messages if m["role"] != "assistant"]
        msgs.append({"role": "assistant", "content": reply})
        kept.append({"role": "debugger", "messages": msgs,
                     "source": {"origin": "student_repair", "problem": student.id, "step": "debug",
                                "round": c.round, "student_status": c.status}})
        why["kept"] += 1
    return kept, why


def _selected(path: Path) -> list[Trajectory]:
    """The trajectories of a distill run, in problem order, restricted to the run's current selection."""
    trajs = sorted((Trajectory.from_dict(r, str(path)) for r in read_jsonl_resumable(path)), key=lambda t: t.index)
    n = distill_selection(path)
    return [t for t in trajs if t.index < n] if n else trajs


def distill_selection(trajectories: Path) -> int:
    """n_problems of the distill run that wrote `trajectories` (its config.json beside it), 0 if unknown: a
    trajectory's index is its place in distill's seeded order, so index < n is the run's current selection
    (a file can hold more, from an earlier, larger run)."""
    cfg = trajectories.parent / "config.json"
    if not cfg.is_file():
        return 0
    return int(json.loads(cfg.read_text()).get("config", {}).get("n_problems", 0) or 0)


def mutate(cfg: MutateConfig, run_tests=None) -> dict:
    """Read cfg.trajectories, write OUT/examples.jsonl, OUT/stats.json, OUT/config.json; return the stats."""
    if run_tests is None:
        from eval.harness import run_tests
    src = Path(cfg.trajectories)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: trajectories not found (run mcl distill first)")
    trajs = _selected(src)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    examples, reasons = [], Counter()
    for t in trajs:
        kept, why = trajectory_mutants(t, cfg, run_tests)
        examples += kept
        reasons.update(why)
    student = None
    if cfg.student_trajectories:
        spath = Path(cfg.student_trajectories)
        if not spath.is_file():
            raise FileNotFoundError(f"{spath}: student trajectories not found (run mcl distill teacher=<student>)")
        by_id, repairs, sreasons = {t.id: t for t in trajs}, [], Counter()
        for st in _selected(spath):
            kept, why = student_repairs(st, by_id.get(st.id), cfg)
            repairs += kept
            sreasons.update(why)
        examples += repairs
        scfg = spath.parent / "config.json"
        student = {"trajectories": str(spath), "examples": len(repairs), "reasons": dict(sorted(sreasons.items())),
                   "student_run": json.loads(scfg.read_text()) if scfg.is_file() else None, "rule": STUDENT_RULE}
    dropped = Counter()
    examples = dedup(examples, dropped)
    mutated = [e for e in examples if e["source"]["origin"] == "mutation"]
    stats = {"trajectories": len(trajs), "programs_mutated": len({e["source"]["problem"] for e in mutated}),
             "examples": {"debugger": len(examples)}, "mutants": len(mutated),
             "operators": dict(sorted(Counter(e["source"]["operator"] for e in mutated).items())),
             "verdicts": dict(sorted(Counter(e["source"]["verdict"] for e in mutated).items())),
             "reasons": dict(sorted(reasons.items())), "duplicates_dropped": sum(dropped.values()), "rule": RULE,
             "student_repair": student}
    write_examples(out / "examples.jsonl", examples)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_meta(out, {"stage": "mutate", "runs": [run_record()]}, cfg)
    return stats


def cli_mutate(config: str | None, overrides: list[str]) -> int:
    """`mcl mutate [--config RECIPE.toml] [key=value ...]`: the [mutate] table of the recipe, then the overrides."""
    cfg = load_config(MutateConfig, config, "mutate", overrides)
    s = mutate(cfg)
    print(f"mutate: {s['mutants']} debugger examples from {s['programs_mutated']} passing programs "
          f"({s['trajectories']} trajectories) -> {cfg.out}/examples.jsonl; {s['reasons']}")
    if s["student_repair"]:
        r = s["student_repair"]
        print(f"mutate: + {r['examples']} student repairs ({r['trajectories']}); {r['reasons']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="recipe TOML with a [mutate] table")
    ap.add_argument("rest", nargs="*", help="key=value overrides")
    a = ap.parse_args(argv)
    return cli_mutate(a.config, a.rest)


if __name__ == "__main__":
    raise SystemExit(main())
