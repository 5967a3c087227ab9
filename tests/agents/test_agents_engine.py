"""The agents on the real engine: run_eval -> LocalBackend -> engine.serving.scheduler.Scheduler -> a tiny random model
with four role adapters. Its answers are noise, so every role fails its format; what is tested is the
wiring and the point of the design: decode batches that mix the roles of different problems.

    python -m pytest tests/agents/test_agents_engine.py -q
"""
import json
import zlib

import pytest
import torch

import engine.agents.problem as ev
from engine.config import PRESETS
from engine.lora import add_adapters
from engine.model import Transformer
from engine.roles import ROLES
from engine.serving.backend import LocalBackend
from engine.serving.scheduler import Scheduler
from eval.run import run_eval


class WordTokenizer:
    """Stand-in for the tiny vocabulary: one id per whitespace-separated word (stable hash), letters out."""
    eos_ids = {0}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        words = " ".join(m["content"] for m in messages).split()
        return [1 + zlib.crc32(w.encode()) % 255 for w in words]

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + i % 26) for i in ids)


def never_run(problem, code, tests):
    raise AssertionError("noise never parses as code, so nothing reaches the sandbox")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(PRESETS["tiny"].replace(max_seq_len=1024)).init_weights(seed=1, std=0.1).eval()
    add_adapters(m, list(ROLES), rank=4, alpha=8)
    return m


def test_mixed_role_decode_batches(model, tmp_path):
    # Statements of very different lengths: prefill takes different numbers of steps, so the problems drift
    # apart and one decode batch holds, e.g., one problem's planner next to another's retriever.
    probs = [ev.Problem(id=f"p{i}", benchmark="toy", description="Sum the numbers. " + "detail " * (60 * i),
                        entry_point="f", starter_code="def f(xs):\n    pass\n",
                        sample_tests=[ev.Test("assert", code="assert f([1]) == 1")],
                        hidden_tests=[ev.Test("assert", code="assert f([2]) == 2")]) for i in range(6)]
    sched = Scheduler(model, WordTokenizer(), n_slots=6, max_len=1024, prefill_chunk=16, log_batches=True)
    sched.start()
    try:
        s = run_eval(probs, LocalBackend(sched, WordTokenizer(), adapters=True), "mapcoder", k=2, t=1,
                     out_dir=tmp_path, concurrency=6, max_new_tokens=8, run_tests=never_run, progress=False)
    finally:
        sched.stop()
    assert s["n"] == 6 and s["problem_errors"] == 0 and s["pass_at_1"] == 0.0
    assert s["format_failures"]["retriever"] == 6 and s["format_failures"]["coder"] == 6
    recs = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["verdict"] == "no_code" and r["calls"][0]["role"] == "retriever"
        assert all(c["completion_tokens"] <= 3 * 8 for c in r["calls"])
        assert r["calls"][0]["prompt_tokens"] > 100
    used = {a for b in sched.batch_log for a in b["adapters"]}
    assert {"retriever", "coder"} <= used and "base" not in used
    mixed = [b for b in sched.batch_log if len(b["adapters"]) > 1]
    assert mixed, f"no decode batch mixed roles: {sched.batch_log[:20]}"
    assert max(b["size"] for b in sched.batch_log) > 1
    # Prefix caching: the retriever prompts of different problems share their instructions.
    st = sched.stats
    assert st["prefix_hits"] > 0 and st["prefill_tokens"] == st["prompt_tokens"] - st["prefix_reused_tokens"]


def test_prefix_cache_does_not_change_the_agents_answers(model, tmp_path):
    probs = [ev.Problem(id=f"p{i}", benchmark="toy", description=f"Return {i} plus the sum. " + "x " * (7 * i),
                        entry_point="f", sample_tests=[ev.Test("assert", code="assert f([1]) == 1")],
                        hidden_tests=[ev.Test("assert", code="assert f([2]) == 2")]) for i in range(4)]
    answers, hits = [], []
    for cache in (True, False):
        sched = Scheduler(model, WordTokenizer(), n_slots=3, max_len=1024, prefill_chunk=32, prefix_cache=cache)
        sched.start()
        try:
            run_eval(probs, LocalBackend(sched, WordTokenizer(), adapters=True), "mapcoder", k=1, t=1,
                     out_dir=tmp_path / str(cache), concurrency=4, max_new_tokens=6, run_tests=never_run,
                     progress=False)
        finally:
            sched.stop()
        recs = [json.loads(line) for line in (tmp_path / str(cache) / "problems.jsonl").read_text().splitlines()]
        answers.append([[(c["role"], c["response"]) for c in r["calls"]] for r in recs])
        hits.append(sched.stats["prefix_hits"])
    assert answers[0] == answers[1] and hits[0] > 0 and hits[1] == 0
    assert sum(len(resp) for calls in answers[0] for _, resp in calls) > 20     # real (noise) answers compared
