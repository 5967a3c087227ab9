"""Transformer.forward(logits_at=...): logits only at the loss positions give the same logits, loss and adapter
gradients as the full (B, T, V) logits indexed afterwards (what token_losses did before), on a mixed-role batch with
right padding; and token_losses asks the model for exactly the loss positions.

    python -m pytest tests/train/test_logits_at.py -q
"""
import torch
import torch.nn.functional as F

from engine.training.data import collate, load_sft

from engine.lora import add_adapters
from engine.roles import ROLES
from engine.training.trainer import token_losses
from tiny_setup import byte_tokenizer, memorisation_rows, tiny_model, write_jsonl


def test_logits_at_equals_full_logits_loss_and_grads(tmp_path):
    model = tiny_model(seed=1)
    add_adapters(model, ROLES, rank=8, alpha=16)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    with torch.no_grad():                                    # non-zero B so every A gets a gradient too
        for p in params:
            p.normal_(0, 0.05)
    examples = load_sft(write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(2)), byte_tokenizer()).examples
    b = collate(examples)                                    # 8 rows, 4 roles, different lengths (padded)
    assert (b.loss_mask == 0).any() and b.tokens.shape[0] == 8

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        ce = fn()
        ce.sum().backward()
        return ce.detach(), [p.grad.clone() for p in params]

    rows, cols = b.loss_mask.nonzero(as_tuple=True)
    full = lambda: F.cross_entropy(model(b.tokens, adapter_ids=b.adapter_ids)[rows, cols], b.targets[rows, cols],
                                   reduction="none")
    ce_full, g_full = loss_and_grads(full)
    ce_at, g_at = loss_and_grads(lambda: token_losses(model, b, None)[0])
    assert ce_at.shape == (int(b.loss_mask.sum()),)
    torch.testing.assert_close(ce_at, ce_full, rtol=1e-6, atol=1e-6)
    worst = max(float((ga - gf).norm() / gf.norm()) for ga, gf in zip(g_at, g_full))
    assert worst <= 1e-5, f"largest relative difference of a LoRA gradient: {worst:.2e}"

    with torch.no_grad():                                    # the logits themselves, and the output shape
        at = rows * b.tokens.shape[1] + cols
        got = model(b.tokens, adapter_ids=b.adapter_ids, logits_at=at)
        ref = model(b.tokens, adapter_ids=b.adapter_ids)[rows, cols]
    assert got.shape == (at.numel(), model.cfg.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_token_losses_asks_for_the_loss_positions_only(tmp_path):
    model = tiny_model(seed=2)
    examples = load_sft(write_jsonl(tmp_path / "sft.jsonl", memorisation_rows(1)), byte_tokenizer()).examples
    b = collate(examples)
    seen = {}
    real_forward = model.forward

    def spy(*args, **kw):
        seen.update(kw)
        return real_forward(*args, **kw)

    model.forward = spy
    ce, rows = token_losses(model, b, None)
    r, c = b.loss_mask.nonzero(as_tuple=True)
    assert torch.equal(seen["logits_at"], r * b.tokens.shape[1] + c) and torch.equal(rows, r)
    assert ce.shape == r.shape and bool(torch.isfinite(ce).all())
