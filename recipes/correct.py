"""`mcl correct`: supervisor-guided correction of failed trajectories (MapCoder-Lite, sec. 3.2): the teacher's, or the
student's own as the paper does.

    mcl correct --config recipes/mini_e2e.toml                                  # the [correct] table
    mcl correct trajectories=runs/distill/trajectories.jsonl out=runs/correct rounds=2
    mcl correct supervisor_url=http://127.0.0.1:8000 supervisor_model=qwen2.5-72b ...
    mcl correct trajectories=STUDENT.jsonl teacher=qwen2.5-coder-0.5b supervisor=qwen2.5-coder-1.5b \
        fallback=qwen2.5-coder-1.5b weights=q4     # the student's failures: the student first, the 1.5B after

    from recipes.correct import CorrectConfig, correct, parse_verdict
    stats = correct(cfg, teacher=backend, supervisor=backend2, run_tests=...)

For each trajectory of `mcl distill` whose final program fails the problem's tests, up to `rounds` times:

    supervisor reads  problem + the plan + the coder's program + its test report
               answers <root><agent>planner|coder</agent><feedback>...</feedback></root>  (parse_verdict: tolerant)
    planner at fault: the planner answers its original prompt again, with the feedback as a follow-up turn;
                      the coder writes a program from the new plan (its ordinary prompt)
    coder at fault:   the coder answers its original prompt again, with the feedback as a follow-up turn
    the new program is run on the sample and hidden tests: all pass -> corrected, stop
    still failing, and a `fallback` model is set: it answers the same feedback from the same point (the paper's
    order: the small model corrects itself first, a stronger one after); the record names who corrected it

A corrected trajectory yields training examples whose prompts are the agents' ORIGINAL prompts (no feedback,
no supervisor): the student learns to answer right the first time. Kept: the retriever call (if
format-valid), the plan and confidence calls of the plan (or the regenerated plan), the coder call (or the
regenerated one). The supervisor sees the hidden tests' report when the program passes the sample tests
(privileged information, as in the paper); the examples never contain it.

Never crashes on a bad teacher or supervisor: a backend error, a verdict that cannot be parsed, or an
answer without a plan/code is counted (stats.json) and that trajectory moves on; an unexpected exception
costs one trajectory (`error` in its record). Resumable like distill: OUT/corrections.jsonl is append-only,
keyed by problem id, flushed per trajectory.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from engine.agents import parsers, prompts
from engine.agents.parsers import FormatFailure
from engine.agents.problem import TestReport
from engine.roles import ROLES
from recipes.common import (append_jsonl, check_resume, dedup, load_config, open_backend, read_jsonl_resumable,
                            run_record, set_threads, write_examples, write_meta)
from recipes.trajectory import Trajectory, call_example, example

BLAMEABLE = ("planner", "coder")


@dataclass
class CorrectConfig:
    trajectories: str = "runs/distill/trajectories.jsonl"   # from mcl distill
    teacher: str = ""                    # the agents that regenerate; "" = the distill run's teacher
    teacher_url: str = ""
    teacher_model: str = ""
    supervisor: str = ""                 # "" = the teacher (the miniature); the paper uses a stronger model
    fallback: str = ""                   # a local model that regenerates when the teacher's program still fails
                                         # ("" = none; the paper's order: the student itself, then a stronger one)
    supervisor_url: str = ""
    supervisor_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 300.0
    retries: int = 2
    device: str = ""
    dtype: str = ""
    weights: str = "fp32"                # local teacher and supervisor: fp32 | bf16 | q4 (engine/loading/packed_model.py)
    rounds: int = 1                      # supervisor -> regenerate -> test, at most this many times per trajectory
    max_new_tokens: int = 256
    n_problems: int = 0                  # 0 = every failed trajectory
    concurrency: int = 8
    threads: int = 0                     # torch CPU threads: 0 = auto (1 on a busy machine), -1 = torch default
    out: str = "runs/correct"


PINNED = ("trajectories", "teacher", "teacher_url", "teacher_model", "supervisor", "supervisor_url",
          "supervisor_model", "fallback", "rounds", "max_new_tokens")


# --- the supervisor's prompt and its verdict ---------------------------------------------------------------

SUPERVISOR_SYSTEM = ("You are the supervisor of a team of coding agents. The planner writes a step-by-step plan; "
                     "the coder writes a Python program that follows the plan. You read a failed attempt, decide "
                     "which agent made the mistake, and tell that agent how to fix it.")


def supervisor_prompt(problem, plan: str, code: str, report_text: str) -> list[dict]:
    user = f"""
A team of coding agents failed to solve the problem below. Decide which agent is at fault:
- planner: the plan is wrong or incomplete, so a program that follows it faithfully would still fail;
- coder: the plan is right, but the program does not follow it or has a bug.
Then write short, concrete feedback for that agent: what is wrong and how to fix it. Do not write the program.

# Problem
{prompts.problem_text(problem)}

# Plan
{plan.strip() or '(the planner gave no plan)'}

# Program
```python
{code.rstrip() or '# (the coder gave no program)'}
```

# Test report
{report_text}

# Output format
Answer with this XML and nothing else:
<root>
<agent>planner or coder</agent>
<feedback>what is wrong and how to fix it</feedback>
</root>
"""
    return [{"role": "system", "content": SUPERVISOR_SYSTEM}, {"role": "user", "content": user.strip() + "\n"}]


def feedback_turn(messages: list[dict], previous: str, feedback: str) -> list[dict]:
    """The agent's original prompt, its previous answer, and the feedback as a follow-up user turn."""
    return list(messages) + [
        {"role": "assistant", "content": previous.strip() or "(no answer)"},
        {"role": "user", "content": f"A reviewer checked your answer against the tests and found this problem:\n"
                                    f"{feedback.strip()}\n\nWrite your whole answer again, corrected, in the same "
                                    f"format as before."}]


@dataclass
class Verdict:
    agent: str                           # planner | coder
    feedback: str
    how: str                             # tag | phrase | mention: how the agent was found


_AGENT_WORD = r"(planner|planning|plan|coder|coding|code|programmer|implementation)"
_TAGS = ("agent", "faulty_agent", "fault", "blame", "culprit", "responsible")


_TEMPLATE_TEXT = ("what is wrong and how to fix it", "planner or coder",
                  "the plan is wrong or incomplete, so a program that follows it faithfully would still fail",
                  "the plan is right, but the program does not follow it or has a bug")


def _norm_agent(word: str) -> str:
    return "planner" if word.lower().startswith("plan") else "coder"


def _tag(text: str, tag: str) -> str | None:
    m = re.search(rf"<{tag}\s*>(.*?)(?:</{tag}\s*>|<\w|$)", text, re.S | re.I)
    return m.group(1).strip() if m else None


def parse_verdict(text) -> Verdict | FormatFailure:
    """The supervisor's answer -> Verdict; never raises. Tried in order: an <agent> tag (or faulty_agent, blame,
    ...); a phrase such as 'the coder is at fault' / 'Agent: planner'; exactly one of the two roles named.
    Feedback: the <feedback> tag, else the text with the verdict removed. A failure (counted): no agent, a tag
    naming both (small models copy the template '<agent>planner or coder</agent>'), or feedback that is
    missing or copied from the prompt."""
    try:
        if not isinstance(text, str):
            return FormatFailure("supervisor", f"answer is {type(text).__name__}, not text")
        t = parsers.clean(text)
        if not t.strip():
            return FormatFailure("supervisor", "empty answer")
        agent, how = None, ""
        for tag in _TAGS:
            v = _tag(t, tag)
            if v:
                named = {_norm_agent(w) for w in re.findall(rf"\b{_AGENT_WORD}\b", v, re.I)}
                if len(named) > 1:                              # "<agent>planner or coder</agent>": the template
                    return FormatFailure("supervisor", f"<{tag}> names both agents: {v[:60]!r}", parsers._excerpt(t))
                if named:
                    agent, how = named.pop(), "tag"
                    break
        if agent is None:
            pats = [rf"\b(?:agent|fault|faulty|blame|culprit|responsible|mistake\s+(?:is|was)\s+(?:made\s+)?by)\b"
                    rf"[^.\n]{{0,30}}?\b{_AGENT_WORD}\b",
                    rf"\b(?:the\s+)?{_AGENT_WORD}\s+(?:agent\s+)?(?:is|was)\s+(?:at\s+fault|responsible|to\s+blame|wrong)"]
            for pat in pats:
                m = re.search(pat, t, re.I)
                if m:
                    agent, how = _norm_agent(m.group(1)), "phrase"
                    break
        if agent is None:
            named = {r for r in BLAMEABLE if re.search(rf"\b{r}\b", t, re.I)}
            if len(named) == 1:
                agent, how = named.pop(), "mention"
        if agent is None:
            return FormatFailure("supervisor", "no agent named (planner or coder)", parsers._excerpt(t))
        fb = _tag(t, "feedback")
        if fb is None:
            fb = re.sub(r"</?\w+\s*>", " ", t)
            fb = re.sub(rf"<(?:{'|'.join(_TAGS)})>.*?</(?:{'|'.join(_TAGS)})>", " ", fb, flags=re.S | re.I).strip()
        fb = fb.strip()
        if not fb or fb.lower() in _TEMPLATE_TEXT:
            return FormatFailure("supervisor", "no feedback of its own (empty, or the prompt's words copied)",
                                 parsers._excerpt(t))
        return Verdict(agent, fb, how)
    except Exception as e:                                          # noqa: BLE001 -- the boundary: count, never crash
        return FormatFailure("supervisor", f"parser error: {type(e).__name__}: {e}")


# --- one trajectory ----------------------------------------------------------------------------------------

def _first(calls, role: str, step: str | None = None, plan: int | None = None):
    """The first call of `role` (and `step`, and `plan` when given)."""
    return next((c for c in calls if c.role == role and (step is None or c.step == step)
                 and (plan is None or c.plan == plan)), None)


def _report_text(problem, report, hidden: bool) -> str:
    head = ("The program passes the sample tests but fails hidden tests of the problem.\n" if hidden else "")
    return head + prompts.format_report(problem, report)


def _passes(problem, code: str, run_tests):
    """(passed both test sets, the report to show the supervisor, whether that report is of hidden tests)."""
    if not code.strip():
        return False, TestReport("no_code"), False
    r = TestReport("pass")
    if problem.sample_tests:
        r = run_tests(problem, code, problem.sample_tests)
        if not r.passed:
            return False, r, False
    if problem.hidden_tests:
        r = run_tests(problem, code, problem.hidden_tests)
        return r.passed, r, True
    return True, r, False


def _call_record(role, step, messages, c, status, reason="") -> dict:
    return {"role": role, "step": step, "messages": messages, "response": c.text, "status": status, "reason": reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "wall_s": c.wall_s,
            "error": c.error}


@dataclass
class _Attempt:
    """The trajectory's plan and program as corrected so far: each agent's messages and answer."""
    plan_msgs: list
    plan_ans: str
    plan_text: str
    code_msgs: list
    code_ans: str
    code: str
    plan_changed: bool = False


def _regenerate(backend, v: Verdict, a: _Attempt, problem, algorithm, max_new_tokens: int, parse_code):
    """The blamed agent answers again with the feedback (planner: then the coder from the new plan) ->
    (the new attempt or None, the call records, the failure or None)."""
    recs = []
    if v.agent == "planner":
        msgs = feedback_turn(a.plan_msgs, a.plan_ans, v.feedback)
        c = backend.chat("planner", msgs, max_new_tokens=max_new_tokens, temperature=0.0)
        p = FormatFailure("planner", f"backend error: {c.error}") if c.error else parsers.parse_plan(c.text)
        recs.append(_call_record("planner", "plan", msgs, c, "error" if c.error else "ok" if p else "failed",
                                 "" if p else p.reason))
        if not p:
            return None, recs, "planner backend error" if c.error else "regenerated plan: format failure"
        a = dataclasses.replace(a, plan_ans=c.text, plan_text=p.text, plan_changed=True,
                                code_msgs=prompts.coder(problem, p.text, algorithm))
        msgs_sent = a.code_msgs
    else:
        msgs_sent = feedback_turn(a.code_msgs, a.code_ans, v.feedback)
    c = backend.chat("coder", msgs_sent, max_new_tokens=max_new_tokens, temperature=0.0)
    k = FormatFailure("coder", f"backend error: {c.error}") if c.error else parse_code(c.text)
    recs.append(_call_record("coder", "code", msgs_sent, c, "error" if c.error else "ok" if k else "failed",
                             "" if k else k.reason))
    if not k:
        return None, recs, "coder backend error" if c.error else "regenerated program: format failure"
    return dataclasses.replace(a, code_ans=c.text, code=k.code), recs, None


def correct_one(t: Trajectory, teacher, supervisor, run_tests, rounds: int, max_new_tokens: int,
                fallback=None, names: tuple[str, str] = ("teacher", "fallback")) -> dict:
    """One failed trajectory -> its correction record: attempts (supervisor call, verdict, regenerated calls,
    test verdict), success, and the examples of the corrected trajectory. The blamed agent regenerates on
    `teacher`; when its program still fails, on `fallback` (if given) from the same point, with the same feedback.
    `names` label the two in the record (`corrected_by`, each regenerated call's `by`)."""
    problem = t.problem
    calls = t.calls
    out = {"id": t.id, "index": t.index, "attempts": [], "success": False, "blame": None,
           "skipped": None, "corrected_by": None, "examples": []}
    coder_call = _first(calls, "coder", "code")
    if coder_call is None or coder_call.status == "error":
        out["skipped"] = "no coder call to correct"
        return out
    i0 = coder_call.plan
    plan_call = _first(calls, "planner", "plan", i0)
    verify_call = _first(calls, "planner", "verify", i0)
    if plan_call is not None and plan_call.status not in ("ok", "repaired"):
        plan_call = verify_call = None
    algorithm = t.algorithm
    parse_code = lambda text: parsers.parse_code(text, role="coder", entry_point=problem.entry_point,  # noqa: E731
                                                 starter_code=problem.starter_code)
    plan_ans = plan_call.response if plan_call else ""
    cur = _Attempt(plan_msgs=plan_call.messages if plan_call else prompts.planner(problem, None, algorithm),
                   plan_ans=plan_ans,
                   plan_text=(parsers.parse_plan(plan_ans) or parsers.Plan("")).text if plan_ans else "",
                   code_msgs=coder_call.messages, code_ans=coder_call.response,
                   code=(parse_code(coder_call.response) or parsers.Code("")).code)
    regenerators = [(names[0], teacher)] + ([(names[1], fallback)] if fallback is not None else [])

    for rnd in range(1, rounds + 1):
        ok, report, hidden = _passes(problem, cur.code, run_tests)
        if ok:                                                      # (the coder's own program passes after all)
            out["skipped"] = "program passes" if rnd == 1 else None
            break
        att = {"round": rnd, "verdict": None, "regenerated": [], "passed": False, "failure": None}
        out["attempts"].append(att)
        sup_msgs = supervisor_prompt(problem, cur.plan_text, cur.code, _report_text(problem, report, hidden))
        c = supervisor.chat("supervisor", sup_msgs, max_new_tokens=max_new_tokens, temperature=0.0)
        if c.error:
            att["supervisor"] = _call_record("supervisor", "supervise", sup_msgs, c, "error", c.error)
            att["failure"] = "supervisor backend error"
            break
        v = parse_verdict(c.text)
        att["supervisor"] = _call_record("supervisor", "supervise", sup_msgs, c, "ok" if v else "failed",
                                         "" if v else v.reason)
        if not v:
            att["failure"] = "supervisor verdict not parsed"
            break
        att["verdict"] = {"agent": v.agent, "feedback": v.feedback, "how": v.how}
        out["blame"] = v.agent
        following = None                                    # the first valid regenerated attempt: the next round's
        for name, backend in regenerators:
            new, recs, failure = _regenerate(backend, v, cur, problem, algorithm, max_new_tokens, parse_code)
            att["regenerated"] += [{**r, "by": name} for r in recs]
            att["failure"] = failure
            if new is None:
                continue
            following = following or new
            ok, report, _ = _passes(problem, new.code, run_tests)
            if ok:
                cur, att["passed"], out["success"], out["corrected_by"] = new, True, True, name
                break
        if out["success"] or following is None:
            break
        cur = following

    if out["success"]:
        exs = []
        ret = _first(calls, "retriever")
        if ret is not None and ret.status in ("ok", "repaired"):
            exs.append(call_example(ret, t.id, "correct"))
        if plan_call is not None or cur.plan_changed:
            exs.append(example("planner", "plan", cur.plan_msgs, cur.plan_ans, t.id, "correct", plan=i0))
        if verify_call is not None and verify_call.status in ("ok", "repaired") and not cur.plan_changed:
            exs.append(call_example(verify_call, t.id, "correct"))
        exs.append(example("coder", "code", cur.code_msgs, cur.code_ans, t.id, "correct", plan=i0))
        out["examples"] = exs
    return out


# --- the run -----------------------------------------------------------------------------------------------

def _distill_config(trajectories: Path) -> dict:
    path = trajectories.parent / "config.json"
    return json.loads(path.read_text()).get("config", {}) if path.is_file() else {}


def resolve_models(cfg: CorrectConfig) -> CorrectConfig:
    """Empty teacher fields <- the distill run's teacher; empty supervisor fields <- the teacher."""
    cfg = dataclasses.replace(cfg)
    if not (cfg.teacher or cfg.teacher_url):
        d = _distill_config(Path(cfg.trajectories))
        cfg.teacher, cfg.teacher_url, cfg.teacher_model = (d.get("teacher", "qwen2.5-coder-0.5b"),
                                                           d.get("teacher_url", ""), d.get("teacher_model", ""))
    if not (cfg.supervisor or cfg.supervisor_url):
        cfg.supervisor, cfg.supervisor_url, cfg.supervisor_model = cfg.teacher, cfg.teacher_url, cfg.teacher_model
    return cfg


def correct(cfg: CorrectConfig, teacher=None, supervisor=None, run_tests=None, progress: bool = True,
            fallback=None) -> dict:
    """Correct the failed trajectories of cfg.trajectories (resuming OUT/corrections.jsonl); write
    OUT/examples.jsonl and OUT/stats.json; return the stats. `fallback` (a backend) regenerates where the
    teacher's program still fails; by default cfg.fallback's model (the supervisor's backend when it is the same)."""
    from tqdm import tqdm
    cfg = resolve_models(cfg)
    src = Path(cfg.trajectories)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: trajectories not found (run `mcl distill` first)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = check_resume(out, cfg, PINNED, "correct")
    trajs = sorted((Trajectory.from_dict(r, str(src)) for r in read_jsonl_resumable(src)), key=lambda t: (t.index, t.id))
    n_sel = _distill_config(src).get("n_problems", 0)
    if n_sel:                                       # only the distill run's selection (a killed run may hold more)
        trajs = [t for t in trajs if t.index < n_sel]
    failed = [t for t in trajs if not t.passed and not t.error and t.problem]
    if cfg.n_problems:
        failed = failed[:cfg.n_problems]
    path = out / "corrections.jsonl"
    done = {r["id"] for r in read_jsonl_resumable(path)}
    todo = [t for t in failed if t.id not in done]
    if run_tests is None:
        from eval.harness import run_tests
    set_threads(cfg.threads)
    meta["runs"].append(run_record(todo=len(todo)))
    write_meta(out, meta, cfg)
    t0, opened = time.perf_counter(), []
    if todo:
        from engine.serving.scheduler import TurnLock
        turns = TurnLock()                          # local models of this process take turns on the cores
        if teacher is None:
            teacher = open_backend(cfg.teacher, cfg.teacher_url, cfg.teacher_model, cfg.api_key_env, cfg.timeout_s,
                                   cfg.retries, cfg.device, cfg.dtype, n_slots=cfg.concurrency, weights=cfg.weights,
                                   step_lock=turns)
            opened.append(teacher)
        if supervisor is None:
            same = (cfg.supervisor, cfg.supervisor_url, cfg.supervisor_model) == \
                   (cfg.teacher, cfg.teacher_url, cfg.teacher_model)
            supervisor = teacher if same else open_backend(
                cfg.supervisor, cfg.supervisor_url, cfg.supervisor_model, cfg.api_key_env, cfg.timeout_s, cfg.retries,
                cfg.device, cfg.dtype, n_slots=cfg.concurrency, weights=cfg.weights, step_lock=turns)
            if supervisor is not teacher:
                opened.append(supervisor)
        if fallback is None and cfg.fallback:
            if (cfg.fallback, "", "") == (cfg.supervisor, cfg.supervisor_url, cfg.supervisor_model):
                fallback = supervisor
            else:
                fallback = open_backend(cfg.fallback, "", "", cfg.api_key_env, cfg.timeout_s, cfg.retries, cfg.device,
                                        cfg.dtype, n_slots=cfg.concurrency, weights=cfg.weights, step_lock=turns)
                opened.append(fallback)
        names = (cfg.teacher or cfg.teacher_model or "teacher", cfg.fallback or "fallback")

        def work(t: Trajectory):
            try:
                return correct_one(t, teacher, supervisor, run_tests, cfg.rounds, cfg.max_new_tokens, fallback, names)
            except Exception as e:                                  # noqa: BLE001 -- one trajectory, not the run
                return {"id": t.id, "index": t.index, "attempts": [], "success": False, "blame": None,
                        "skipped": None, "examples": [], "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()}
        try:
            with open(path, "a") as f, ThreadPoolExecutor(max(1, cfg.concurrency)) as pool, \
                    tqdm(total=len(failed), initial=len(failed) - len(todo), desc="correct", disable=not progress,
                         dynamic_ncols=True) as bar:
                n_ok = 0
                for fut in as_completed([pool.submit(work, r) for r in todo]):
                    res = fut.result()
                    append_jsonl(f, res)
                    n_ok += res["success"]
                    bar.update(1)
                    bar.set_postfix(corrected=f"{n_ok}/{bar.n - (len(failed) - len(todo))}")
        finally:
            for b in opened:
                if hasattr(b, "close"):
                    b.close()
    meta["runs"][-1].update(wall_s=round(time.perf_counter() - t0, 1))
    write_meta(out, meta, cfg)
    order = {t.id: n for n, t in enumerate(failed)}
    results = sorted((r for r in read_jsonl_resumable(path) if r["id"] in order), key=lambda r: order[r["id"]])
    examples, stats = summarize(results)
    stats["failed_trajectories"] = len(failed)
    write_examples(out / "examples.jsonl", examples)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def summarize(results: list[dict]) -> tuple[list[dict], dict]:
    """Correction records (in trajectory order) -> (examples, stats: attempts, blame, successes, failures)."""
    blame, wins, failures, how, by = Counter(), Counter(), Counter(), Counter(), Counter()
    sup_calls = sup_errors = regen_calls = regen_errors = 0
    examples = []
    for r in results:
        for a in r.get("attempts", []):
            sup_calls += 1
            sup_errors += a.get("supervisor", {}).get("status") == "error"
            if a.get("verdict"):
                blame[a["verdict"]["agent"]] += 1
                how[a["verdict"]["how"]] += 1
            if a.get("failure"):
                failures[a["failure"]] += 1
            for g in a.get("regenerated", []):
                regen_calls += 1
                regen_errors += g["status"] == "error"
        if r.get("success"):
            wins[r["blame"]] += 1
            by[r.get("corrected_by") or "teacher"] += 1
        examples += r.get("examples", [])
        if r.get("error"):
            failures["exception: " + r["error"].split(":")[0]] += 1
        if r.get("skipped"):
            failures["skipped: " + r["skipped"]] += 1
    rejected = Counter()
    examples = dedup(examples, rejected)
    per_role = Counter(e["role"] for e in examples)
    return examples, {
        "trajectories": len(results),
        "attempted": sum(bool(r.get("attempts")) for r in results),
        "supervisor_calls": sup_calls,
        "supervisor_backend_errors": sup_errors,
        "blame": {a: blame[a] for a in BLAMEABLE},
        "verdict_found_by": dict(how),
        "regenerations": regen_calls,
        "regeneration_backend_errors": regen_errors,
        "successes": sum(bool(r.get("success")) for r in results),
        "successes_by_blame": {a: wins[a] for a in BLAMEABLE},
        "successes_by_regenerator": dict(by),
        "failures": dict(sorted(failures.items())),
        "examples": {r: per_role[r] for r in ROLES},
        "duplicates_dropped": sum(rejected.values()),
    }


def cli_correct(config: str | None, overrides: list[str]) -> int:
    """`mcl correct [--config RECIPE.toml] [key=value ...]`: the [correct] table of the recipe, then the overrides."""
    cfg = load_config(CorrectConfig, config, "correct", overrides)
    s = correct(cfg)
    print(f"correct: {s['failed_trajectories']} failed trajectories, {s['attempted']} attempted, "
          f"blame planner {s['blame']['planner']} / coder {s['blame']['coder']}, {s['successes']} corrected, "
          f"{s['supervisor_backend_errors'] + s['regeneration_backend_errors']} backend errors; "
          f"examples: {', '.join(f'{r} {n}' for r, n in s['examples'].items())} -> {cfg.out}/examples.jsonl")
    return 0
