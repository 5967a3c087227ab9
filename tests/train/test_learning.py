"""Training learns, and only what it should:
 - tiny random model: each role's loss falls by at least half on a 64-example memorisation set (16 per role);
 - SmolLM2-135M (slow: the real embedded model): the same, in a handful of steps on short sequences;
 - training one role's examples leaves the other adapters bitwise unchanged (weights and outputs), with weight decay on.

    python -m pytest tests/train/test_learning.py -q          # -m "not slow" skips SmolLM2
"""
import pytest
import torch

from engine.lora import add_adapters
from engine.roles import ROLES
from engine.training.trainer import load_recipe, train
from tiny_setup import byte_tokenizer, memorisation_rows, tiny_model, tiny_tables, write_jsonl, write_recipe


def _per_role_drop(history):
    """(first-step loss, mean of the last 3 steps) per role, from the training history."""
    out = {}
    for r in ROLES:
        curve = [h[f"train/loss/{r}"] for h in history if f"train/loss/{r}" in h]
        out[r] = (curve[0], sum(curve[-3:]) / len(curve[-3:]))
    return out


def test_tiny_each_role_loss_halves(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(16))
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(
        tmp_path / "out", data, steps=40, global_batch=16, micro_batch=16, lr=1e-2, warmup_steps=4)))
    res = train(recipe, model=tiny_model(), tokenizer=byte_tokenizer())
    drops = _per_role_drop(res["history"])
    for r, (first, last) in drops.items():
        assert last <= 0.5 * first, f"{r}: loss {first:.3f} -> {last:.3f} ({drops})"


def test_training_one_role_leaves_other_adapters_bitwise_unchanged(tmp_path):
    rows = [r for r in memorisation_rows(8) if r["role"] == "planner"]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_tables(
        tmp_path / "out", data, steps=5, lr=1e-2, weight_decay=0.1)))
    model = tiny_model()
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 2, 3, -1])                        # retriever, coder, debugger, base
    with torch.no_grad():
        before = model(tokens)                               # no adapters yet: the base
    reference = tiny_model()                                 # the adapters' initial values (same seed)
    add_adapters(reference, ROLES, rank=recipe.lora.rank, alpha=recipe.lora.alpha, seed=recipe.train.seed)
    train(recipe, model=model, tokenizer=byte_tokenizer())
    trained = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if "lora_" in name:
            for a, role in enumerate(ROLES):
                same = torch.equal(trained[name][a], p[a])
                assert same == (role != "planner"), f"{name}[{role}] {'unchanged' if same else 'changed'}"
    model.eval()
    with torch.no_grad():
        after = model(tokens, adapter_ids=ids)
        planner = model(tokens, adapter_ids=torch.full((4,), 1))
    assert torch.equal(after, before), "other adapters' outputs changed"
    assert not torch.equal(planner, before)


@pytest.mark.slow
def test_smollm2_each_role_loss_halves(tmp_path):
    from engine.loading.hub import load_model
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    data = write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(16))
    tables = tiny_tables(tmp_path / "out", data, steps=6, global_batch=8, micro_batch=8, lr=2e-3, warmup_steps=2)
    tables["lora"] = {"rank": 16, "alpha": 32.0}
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tables))
    res = train(recipe, model=model, tokenizer=tok)
    assert res["data"]["tokens"] / 64 < 48, "keep the sequences short: this runs on CPU"
    drops = _per_role_drop(res["history"])
    for r, (first, last) in drops.items():
        assert last <= 0.5 * first, f"{r}: loss {first:.3f} -> {last:.3f} ({drops})"
