"""Trainer features beyond the core loop: held-out eval per role, activation checkpointing (same adapters, bitwise on
CPU), the proportional sampler, gradient accumulation equivalence through train(), and input checks.

    python -m pytest tests/train/test_trainer_features.py -q
"""
import json

import pytest
import torch

from engine.roles import ROLES
from engine.training.trainer import load_recipe, lr_at, TrainCfg, train
from tiny_setup import byte_tokenizer, memorisation_rows, read_adapters, tiny_model, tiny_tables, write_jsonl, write_recipe


def _train(tmp_path, name, rows=None, **kw):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows or memorisation_rows(4))
    tables = tiny_tables(tmp_path / name, data, **{k: v for k, v in kw.items() if not k.startswith("data_")})
    tables["data"].update({k[5:]: v for k, v in kw.items() if k.startswith("data_")})
    recipe = load_recipe(write_recipe(tmp_path / f"{name}.toml", tables))
    return train(recipe, model=tiny_model(), tokenizer=byte_tokenizer()), tmp_path / name


def test_eval_per_role_on_held_out_split(tmp_path):
    res, out = _train(tmp_path, "ev", steps=4, eval_every=2, data_eval_fraction=0.25)
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval/loss/coder" in l]
    assert [e["step"] for e in evals] == [2, 4]
    assert set(res["eval_loss"]) == set(ROLES) and all(0 < v < 20 for v in res["eval_loss"].values())


def test_activation_checkpointing_gives_the_same_adapters(tmp_path):
    _, a = _train(tmp_path, "plain", steps=3)
    _, b = _train(tmp_path, "ckpt", steps=3, grad_checkpointing=True)
    wa, wb = read_adapters(a / "adapters"), read_adapters(b / "adapters")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_matches_one_big_micro_batch(tmp_path):
    _, a = _train(tmp_path, "mb8", steps=3, global_batch=8, micro_batch=8)
    _, b = _train(tmp_path, "mb2", steps=3, global_batch=8, micro_batch=2)
    wa, wb = read_adapters(a / "adapters"), read_adapters(b / "adapters")
    worst = max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp(min=1e-30)) for k in wa)
    assert worst <= 1e-3, worst                           # fp32 rounding amplified by Adam, see test_distributed


def test_proportional_sampler_follows_the_data(tmp_path):
    rows = [r for r in memorisation_rows(12) if r["role"] in ("planner", "coder")][:18]
    rows = rows + [r for r in memorisation_rows(2) if r["role"] == "debugger"]
    res, _ = _train(tmp_path, "prop", rows=rows, steps=5, data_sampler="proportional")
    toks = {r: sum(h[f"train/tokens/{r}"] for h in res["history"]) for r in ROLES}
    assert toks["retriever"] == 0 and toks["debugger"] < toks["planner"]


def test_schedule_warmup_then_cosine():
    tc = TrainCfg(lr=1.0, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    lrs = [lr_at(s, tc) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and abs(lr_at(14, tc) - 0.1) < 1e-12


def test_bad_batch_shape_and_vocab_mismatch(tmp_path):
    with pytest.raises(ValueError, match="global_batch=10 must be a multiple of train.micro_batch"):
        _train(tmp_path, "bs", steps=1, global_batch=10, micro_batch=4)
    rows = [{"role": "coder", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "é"}]}]
    data = write_jsonl(tmp_path / "v.jsonl", rows)
    recipe = load_recipe(write_recipe(tmp_path / "v.toml", tiny_tables(tmp_path / "v", data, steps=1)))
    small = tiny_model()
    small.cfg = small.cfg.replace(vocab_size=100)            # pretend the model has a smaller vocabulary
    with pytest.raises(ValueError, match=r"v.jsonl:1: token id \d+ >= the model's vocab_size 100"):
        train(recipe, model=small, tokenizer=byte_tokenizer())


def test_eval_runs_the_same_number_of_forwards_on_every_rank(tmp_path, monkeypatch):
    from engine.lora import add_adapters
    from engine.training import distributed as D
    from engine.training.data import load_sft
    from engine.training.trainer import evaluate
    ex = load_sft(write_jsonl(tmp_path / "e.jsonl", memorisation_rows(2)[:7]), byte_tokenizer()).examples
    model = tiny_model()
    add_adapters(model, ROLES, rank=4)
    calls = []
    model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(D, "all_reduce_sum_", lambda tensors, d: None)
    counted = []
    for rank in range(3):                                      # 7 examples over 3 ranks: 3, 3, 1
        calls.clear()
        sums, toks = evaluate(model, ex, 4, 2, 0, D.DistInfo(rank=rank, world=3), None)
        counted.append((len(calls), int(toks.sum())))
    assert [c for c, _ in counted] == [2, 2, 2]
    assert sum(t for _, t in counted) == sum(e.n_loss for e in ex)


def test_bf16_base_trains_under_autocast_with_fp32_masters(tmp_path, monkeypatch):
    """model.dtype = bfloat16 on the CPU: the base and the adapters' forward copies are bf16, the optimizer steps fp32
    masters, the loss falls like the fp32 run's (same data, same seed), and the adapters are saved in fp32."""
    from engine.training import trainer
    seen = {}
    real = trainer.token_losses

    def spy(model, batch, autocast_dtype, ce_chunk=256):
        seen["autocast"], seen["base"] = autocast_dtype, model.model.layers[0].mlp.up_proj.weight.dtype
        return real(model, batch, autocast_dtype, ce_chunk)

    monkeypatch.setattr(trainer, "token_losses", spy)
    data = write_jsonl(tmp_path / "d.jsonl", memorisation_rows(4))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tables = tiny_tables(tmp_path / dtype, data, steps=8, ce_chunk=7)
        tables["model"]["dtype"] = dtype
        runs[dtype] = train(load_recipe(write_recipe(tmp_path / f"{dtype}.toml", tables)), model=tiny_model(),
                            tokenizer=byte_tokenizer())
    assert seen == {"autocast": torch.bfloat16, "base": torch.bfloat16}
    l32, l16 = runs["float32"]["history"], runs["bfloat16"]["history"]
    assert l16[-1]["train/loss"] < 0.8 * l16[0]["train/loss"]
    assert abs(l16[-1]["train/loss"] - l32[-1]["train/loss"]) < 0.1 * l32[-1]["train/loss"], (l16[-1], l32[-1])
    saved = read_adapters(tmp_path / "bfloat16" / "adapters")
    assert all(v.dtype == torch.float32 for v in saved.values())
