"""KV-cached generation: same tokens as recomputing the whole sequence; a batch of different lengths gives
each prompt the tokens it gets alone; sampling is seeded per request; limits give clear errors.

    python -m pytest tests/test_generate.py -q
"""
import pytest
import torch

from engine.config import PRESETS
from engine.generate import SamplingParams, generate, sample
from engine.model import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(PRESETS["tiny"].replace(arch="qwen2", qkv_bias=True)).init_weights(seed=3, std=0.1).eval()


def recompute_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def test_cache_equals_recompute(model):
    for p in prompts([1, 7, 30]):
        assert generate(model, [p], 20)[0].token_ids == recompute_greedy(model, p, 20)


def test_batch_of_different_lengths_equals_alone(model):
    ps = prompts([5, 17, 1, 9, 12], seed=1)
    budgets = [12, 3, 20, 7, 15]                        # rows finish at different steps and leave the batch
    batch = generate(model, ps, budgets)
    for p, b, out in zip(ps, budgets, batch):
        assert out.token_ids == generate(model, [p], b)[0].token_ids
        assert len(out.token_ids) == b and out.finish_reason == "length"


def test_eos_stops_a_row(model):
    p = prompts([6], seed=2)[0]
    free = generate(model, [p], 10)[0].token_ids
    stopped = generate(model, [p], 10, eos_ids={free[3]})[0]
    assert stopped.token_ids == free[:free.index(free[3])] and stopped.finish_reason == "stop"


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    p = [SamplingParams(temperature=1.0, top_k=3)]
    draws = {int(sample(logits, p, [torch.Generator().manual_seed(s)])[0]) for s in range(40)}
    assert draws <= set(torch.topk(logits[0], 3).indices.tolist()) and len(draws) > 1
    a = sample(logits, p, [torch.Generator().manual_seed(7)])
    b = sample(logits, p, [torch.Generator().manual_seed(7)])
    assert torch.equal(a, b)
    top_p = [SamplingParams(temperature=1.0, top_p=1e-6)]            # nucleus of one token = argmax
    assert int(sample(logits, top_p, [torch.Generator().manual_seed(1)])[0]) == int(logits.argmax())


def test_prompt_longer_than_context_is_refused(model):
    n = model.cfg.max_seq_len
    with pytest.raises(ValueError, match=f"prompt 0 has {n} tokens; the context limit is {n}"):
        generate(model, [[1] * n], 4)


def test_budget_is_clipped_to_the_context(model):
    n = model.cfg.max_seq_len
    out = generate(model, [[1] * (n - 3)], 10)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
