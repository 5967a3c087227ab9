"""Typed trajectory records: what the recipe stages read back from a distill run's trajectories.jsonl.

    from recipes.trajectory import Trajectory, call_example, winning_attempt
    t = Trajectory.from_dict(json.loads(line))       # t.calls: [Call], t.sample_attempts: [Attempt], t.problem
    ex = call_example(t.calls[0], t.id, "distill")   # one trainer-format example from one agent call

One line of trajectories.jsonl is the eval record of one problem (eval/run.py run_problem: verdict, code, the
agent trace) plus the problem itself. The agent trace is the agents' own records, `Call` and `Attempt`
(engine/agents/mapcoder.py), so a stage reads `call.plan`, never `call.get("plan")`; a misspelt field is an
AttributeError where it is written, and an unknown field in a file is a ValueError naming it. The record's other
fields (verdict, failures, test counts, timings) are kept as they are in `record`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.agents.mapcoder import Attempt, Call
from engine.agents.parsers import clean
from engine.agents.problem import Problem

TYPED = ("id", "index", "passed", "solved_samples", "error", "code", "algorithm", "calls", "sample_attempts",
         "problem")


@dataclass
class Trajectory:
    id: str                                          # the problem's id
    index: int = 0                                   # its place in distill's seeded problem order
    passed: bool = False                             # the final program passes the problem's (hidden) tests
    solved_samples: bool = False                     # some program passed every sample test
    error: str | None = None                         # the exception that cost this problem, if any
    code: str | None = None                          # the final program (None when the problem raised)
    algorithm: str = ""                              # the retriever's algorithm
    calls: list[Call] = field(default_factory=list)
    sample_attempts: list[Attempt] = field(default_factory=list)
    problem: Problem | None = None                   # stored by distill beside the record
    record: dict = field(default_factory=dict)       # the record's other fields, as written

    @classmethod
    def from_dict(cls, d: dict, where: str = "trajectory") -> "Trajectory":
        where = f"{where} {d.get('id', '?')}"
        if "id" not in d:
            raise ValueError(f"{where}: a trajectory record needs an 'id'")
        return cls(id=d["id"], index=d.get("index", 0) or 0, passed=bool(d.get("passed")),
                   solved_samples=bool(d.get("solved_samples")), error=d.get("error"), code=d.get("code"),
                   algorithm=d.get("algorithm") or "",
                   calls=[Call.from_dict(c, where) for c in d.get("calls", [])],
                   sample_attempts=[Attempt.from_dict(a, where) for a in d.get("sample_attempts", [])],
                   problem=Problem.from_dict(d["problem"]) if d.get("problem") else None,
                   record={k: v for k, v in d.items() if k not in TYPED})

    def to_dict(self) -> dict:
        return {"id": self.id, "index": self.index, "passed": self.passed, "solved_samples": self.solved_samples,
                "error": self.error, "code": self.code, "algorithm": self.algorithm,
                "calls": [c.to_dict() for c in self.calls],
                "sample_attempts": [a.to_dict() for a in self.sample_attempts],
                **({"problem": self.problem.to_dict()} if self.problem else {}), **self.record}

    def clean_pass(self) -> bool:
        """The final program passes every test of its problem and nothing raised (distill's accept="hidden")."""
        return self.passed and not self.error


def winning_attempt(t: Trajectory) -> tuple[int, int] | None:
    """(plan, round) of the program that passed the sample tests; for a problem without sample tests, the
    first coder call that produced code."""
    for a in t.sample_attempts:
        if a.verdict == "pass":
            return a.plan, a.round
    if not t.sample_attempts and t.code:
        for c in t.calls:
            if c.role == "coder" and c.status in ("ok", "repaired"):
                return c.plan, 0
    return None


def example(role: str, step: str, messages: list[dict], answer: str, problem_id: str, origin: str,
            plan: int | None = None, round: int | None = None) -> dict:
    """One trainer-format line (engine/training/data.py): the prompt's messages (system, user) + the answer as the
    assistant turn (parsers.clean: chat special tokens and <think> blocks dropped); "source" says where it came
    from (the trainer ignores it)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    msgs.append({"role": "assistant", "content": clean(answer)})
    return {"role": role, "messages": msgs,
            "source": {"origin": origin, "problem": problem_id, "step": step, "plan": plan, "round": round}}


def call_example(call: Call, problem_id: str, origin: str, response: str | None = None) -> dict:
    """The example of one agent call: its own prompt, and its answer (or `response` in its place)."""
    return example(call.role, call.step, call.messages, call.response if response is None else response,
                   problem_id, origin, call.plan, call.round)
