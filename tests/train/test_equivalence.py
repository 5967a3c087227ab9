"""Mixed-role training is exactly the sum of single-role training.

 - one mixed-role step on a batch holding four roles gives the same adapter gradients (fp32, <= 1e-5 relative) as four
   single-role steps on the same examples with the same normalisation (loss = sum of token CE / N, N = assistant tokens
   of the whole global batch); each single-role step leaves the other adapters' gradients exactly zero;
 - AdapterAdamW steps each adapter as if it were its own parameter: an adapter absent from a step is untouched
   (bitwise, even with momentum and weight decay), and mixed updates equal per-adapter torch.optim.AdamW updates.

    python -m pytest tests/train/test_equivalence.py -q
"""
import pytest
import torch

from engine.training.data import collate, load_sft

from engine.lora import add_adapters
from engine.roles import ROLES
from engine.training.trainer import AdapterAdamW, token_losses
from tiny_setup import byte_tokenizer, memorisation_rows, tiny_model, write_jsonl


def lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model(seed=0)
    add_adapters(model, ROLES, rank=8, alpha=16)
    with torch.no_grad():                                    # non-zero B so every A also gets a gradient
        for p in lora_params(model):
            p.normal_(0, 0.05)
    path = write_jsonl(tmp_path_factory.mktemp("eq") / "sft.jsonl", memorisation_rows(3))
    examples = load_sft(path, byte_tokenizer()).examples    # 12 examples, 3 per role, different lengths
    return model, examples


def grads_of(model, examples, n_norm):
    model.zero_grad(set_to_none=True)
    b = collate(examples)
    loss = token_losses(model, b, None)[0].sum() / n_norm
    loss.backward()
    return [p.grad.clone() for p in lora_params(model)]


def test_mixed_step_gradients_equal_sum_of_single_role_steps(setup):
    model, examples = setup
    n_norm = sum(e.n_loss for e in examples)                  # the global batch's assistant tokens
    mixed = grads_of(model, examples, n_norm)
    total = [torch.zeros_like(g) for g in mixed]
    worst = 0.0
    for r in range(len(ROLES)):
        single = grads_of(model, [e for e in examples if e.role_id == r], n_norm)
        for gm, gs, tot in zip(mixed, single, total):
            others = torch.cat([gs[:r].flatten(), gs[r + 1:].flatten()])
            assert torch.count_nonzero(others) == 0, "a single-role step touched another adapter"
            assert gs[r].abs().max() > 0
            rel = float((gm[r] - gs[r]).norm() / gm[r].norm())
            worst = max(worst, rel)
            tot += gs
    assert worst <= 1e-5, f"largest relative difference of an adapter's gradient: {worst:.2e}"
    for gm, tot in zip(mixed, total):
        assert float((gm - tot).norm() / gm.norm()) <= 1e-5


def test_micro_batching_does_not_change_the_gradient(setup):
    model, examples = setup
    n_norm = sum(e.n_loss for e in examples)
    whole = grads_of(model, examples, n_norm)
    model.zero_grad(set_to_none=True)
    for i in range(0, len(examples), 4):                      # gradient accumulation over 3 micro-batches
        b = collate(examples[i:i + 4])
        (token_losses(model, b, None)[0].sum() / n_norm).backward()
    for gw, p in zip(whole, lora_params(model)):
        assert float((gw - p.grad).norm() / gw.norm()) <= 1e-5


def _stacked(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, 3, 5, generator=g)), torch.nn.Parameter(torch.randn(n, 7, 3, generator=g))]


def test_absent_adapter_is_untouched_despite_momentum_and_weight_decay():
    params = _stacked()
    opt = AdapterAdamW(params, 4, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step(1e-2, torch.tensor([True, True, True, True]))      # every adapter now has momentum
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
        p.grad[1] = 0                                          # adapter 1 absent from this batch
    opt.step(1e-2, torch.tensor([True, False, True, True]))
    for p, b in zip(params, before):
        assert torch.equal(p[1], b[1])
        assert not torch.equal(p[0], b[0])
    assert opt.t.tolist() == [2, 1, 2, 2]
    # torch's AdamW on the same stacked tensor would move adapter 1 (momentum + decay): the reason for AdapterAdamW
    ref = _stacked()
    topt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for p in ref:
        p.grad = torch.ones_like(p)
    topt.step()
    frozen = ref[0].detach().clone()
    ref[0].grad = torch.zeros_like(ref[0])
    topt.step()
    assert not torch.equal(ref[0][1], frozen[1])


def test_each_adapter_steps_like_its_own_torch_adamw():
    params = _stacked(seed=2)
    ours = AdapterAdamW(params, 4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    singles = [[torch.nn.Parameter(p[a].detach().clone()) for p in params] for a in range(4)]
    topts = [torch.optim.AdamW(s, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05) for s in singles]
    g = torch.Generator().manual_seed(3)
    schedule = [[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    for active in schedule:
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        ours.step(1e-2, torch.tensor(active, dtype=torch.bool))
        for a in range(4):
            if active[a]:
                for s, gr in zip(singles[a], grads):
                    s.grad = gr[a].clone()
                topts[a].step()
    for a in range(4):
        for p, s in zip(params, singles[a]):
            torch.testing.assert_close(p[a], s, rtol=1e-6, atol=1e-7)
