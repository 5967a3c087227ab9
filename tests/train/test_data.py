"""engine/training/data.py: JSONL validation errors (file:line + field), tokenisation with assistant-only loss masks, truncation
counting, the role-balanced sampler (deterministic, exact save/restore) and role-sorted batches.

    python -m pytest tests/train/test_data.py -q
"""
import json

import pytest
import torch

from engine.training.data import RoleSampler, collate, load_sft, split_eval

from engine.roles import ROLES
from tiny_setup import byte_tokenizer, memorisation_rows, write_jsonl

TOK = byte_tokenizer()


def good(role="planner", answer="ok"):
    return {"role": role, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("bad_line,needle", [
    ('{"role": "planner", "messages": [', "malformed JSON"),
    ('["planner"]', "expected a JSON object"),
    (json.dumps({"messages": good()["messages"]}), "field 'role': missing"),
    (json.dumps({"role": "planner"}), "field 'messages': missing"),
    (json.dumps({"role": "planner", "messages": [{"role": "user"}]}), "field 'messages[0].content'"),
    (json.dumps({"role": "planner", "messages": [{"role": "robot", "content": "x"}]}), "field 'messages[0].role'"),
    (json.dumps({"role": "tester", "messages": good()["messages"]}), "unknown role 'tester'"),
    (json.dumps({"role": "coder", "messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    ('{"role": "planner", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
    ('{"role": "planner", "messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", '
     '"content": "b"}]}', "field 'messages[0].content': a lone surrogate"),
    ('{"role": "planner", "x": ' + "7" * 5000 + "}", "unreadable JSON"),
])
def test_bad_line_names_file_line_and_field(tmp_path, bad_line, needle):
    path = write_jsonl(tmp_path / "sft.jsonl", [good(), good("coder"), bad_line, good()])
    with pytest.raises(ValueError) as e:
        load_sft(path, TOK)
    msg = str(e.value)
    assert f"{path}:3" in msg and needle in msg, msg


def test_unknown_role_lists_valid_roles(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [good("tester")])
    with pytest.raises(ValueError, match=r"sft.jsonl:1: field 'role': unknown role 'tester'; expected one of "
                                         r"\['retriever', 'planner', 'coder', 'debugger'\]"):
        load_sft(path, TOK)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_sft("nope.jsonl", TOK)


def test_mask_covers_exactly_the_assistant_answer(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [good("coder", "def f(): pass")])
    data = load_sft(path, TOK)
    (ex,) = data.examples
    b = collate([ex])
    trained = [int(t) for t, m in zip(b.targets[0], b.loss_mask[0]) if m]
    assert TOK.decode(trained, skip_special=False) == "def f(): pass<|im_end|>"
    assert ex.role_id == ROLES.index("coder") and ex.where.endswith("sft.jsonl:1")


def test_truncation_is_counted_and_fully_cut_examples_dropped(tmp_path):
    long_user = {"role": "planner", "messages": [{"role": "user", "content": "x" * 200},
                                                 {"role": "assistant", "content": "y"}]}
    long_answer = good("coder", "z" * 200)
    path = write_jsonl(tmp_path / "sft.jsonl", [good(), long_user, long_answer])
    data = load_sft(path, TOK, max_len=64)
    assert data.stats.truncated == 2 and data.stats.dropped == 1          # long_user lost its whole answer
    assert [len(e.ids) for e in data.examples][1] == 64 and data.examples[1].truncated
    assert data.stats.per_role == {"retriever": 0, "planner": 1, "coder": 1, "debugger": 0}


def test_collate_sorts_rows_by_adapter_and_pads(tmp_path):
    rows = [good("debugger", "a" * 9), good("retriever"), good("coder", "b" * 3), good("retriever", "c" * 5)]
    data = load_sft(write_jsonl(tmp_path / "sft.jsonl", rows), TOK)
    b = collate(data.examples, pad_id=0)
    assert b.adapter_ids.tolist() == [0, 0, 2, 3]
    assert b.tokens.shape[1] == max(len(e.ids) for e in data.examples) - 1
    assert b.n_real == sum(len(e.ids) - 1 for e in data.examples)
    assert b.loss_mask.sum() == sum(e.n_loss for e in data.examples)


def _examples(tmp_path, n_per_role=(5, 3, 2, 6)):
    rows = [good(r, f"{r} {i}") for r, n in zip(ROLES, n_per_role) for i in range(n)]
    return load_sft(write_jsonl(tmp_path / "sft.jsonl", rows), TOK).examples


def test_uniform_sampler_balances_roles_every_batch(tmp_path):
    s = RoleSampler(_examples(tmp_path), n_roles=4, mode="uniform", seed=1)
    for _ in range(20):
        batch = s.draw(10)                                             # 2 each + 2 leftover slots on distinct roles
        counts = torch.bincount(torch.tensor([e.role_id for e in batch]), minlength=4)
        assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 10


def test_uniform_sampler_visits_each_role_epoch_without_repeats(tmp_path):
    ex = _examples(tmp_path)
    s = RoleSampler(ex, n_roles=4, mode="uniform", seed=0)
    drawn = [id(e) for _ in range(3) for e in s.draw(4) if e.role_id == 2]   # role 2 has 2 examples
    assert len(drawn) == 3 and len(set(drawn[:2])) == 2


def test_proportional_sampler_is_an_epoch_permutation(tmp_path):
    ex = _examples(tmp_path)
    s = RoleSampler(ex, n_roles=4, mode="proportional", seed=0)
    first = s.draw(len(ex))
    assert sorted(map(id, first)) == sorted(map(id, ex))


@pytest.mark.parametrize("mode", ["uniform", "proportional"])
def test_sampler_is_deterministic_and_restores_exactly(tmp_path, mode):
    ex = _examples(tmp_path)
    a, b = RoleSampler(ex, 4, mode, seed=3), RoleSampler(ex, 4, mode, seed=3)
    for _ in range(7):
        assert [e.where for e in a.draw(6)] == [e.where for e in b.draw(6)]
    state = json.loads(json.dumps(a.state_dict()))                     # survives JSON (checkpoint format)
    ahead = [[e.where for e in a.draw(6)] for _ in range(9)]
    c = RoleSampler(ex, 4, mode, seed=3)
    c.load_state_dict(state)
    assert [[e.where for e in c.draw(6)] for _ in range(9)] == ahead
    other = RoleSampler(ex, 4, mode, seed=4)
    assert [e.where for e in other.draw(12)] != [e.where for e in RoleSampler(ex, 4, mode, seed=3).draw(12)]
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_split_eval_holds_out_per_role(tmp_path):
    ex = load_sft(write_jsonl(tmp_path / "m.jsonl", memorisation_rows(10)), TOK).examples
    train, held = split_eval(ex, 0.2, seed=0)
    assert len(held) == 8 and len(train) == 32
    assert sorted(e.role_id for e in held) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split_eval(ex, 0.2, seed=0)[1] == held and split_eval(ex, 0.0, seed=0)[1] == []


def test_a_huge_line_is_capped_before_tokenising(tmp_path, monkeypatch):
    """A 5 MB line: only about max_len tokens' worth of characters reach the tokenizer."""
    seen = []
    real = type(TOK).chat_ids_and_mask
    monkeypatch.setattr(type(TOK), "chat_ids_and_mask", lambda self, m: seen.append(sum(len(x["content"]) for x in m))
                        or real(self, m))
    row = {"role": "planner", "messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "ab " * 1_700_000}]}
    data = load_sft(write_jsonl(tmp_path / "sft.jsonl", [row]), TOK, max_len=64)
    ex = data.examples[0]
    assert len(ex.ids) == 64 and ex.truncated and data.stats.truncated == 1
    assert seen and max(seen) < 64 * (TOK.max_token_chars + 1) + 4096 + 10


def test_the_loss_mask_stays_on_the_answer_when_the_user_quotes_it(tmp_path):
    answer = "return 42"
    row = {"role": "coder", "messages": [
        {"role": "user", "content": f"why does <|im_start|>assistant\n{answer}<|im_end|> fail?"},
        {"role": "assistant", "content": answer}]}
    ex = load_sft(write_jsonl(tmp_path / "sft.jsonl", [row]), TOK).examples[0]
    kept = [i for i, m in zip(ex.ids, ex.mask) if m]
    assert TOK.decode(kept, skip_special=False) == answer + "<|im_end|>"
    assert TOK.decode(ex.ids[:ex.mask.index(1)], skip_special=False).endswith("fail?<|im_end|>\n<|im_start|>assistant\n")
