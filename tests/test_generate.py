"""KV-cached generation: same tokens as recomputing the whole sequence; a batch of different lengths gives
each prompt the tokens it gets alone; sampling is seeded per request; limits give clear errors.

    python -m pytest tests/test_generate.py -q
"""
import pytest
import torch

from engine.config import PRESETS
from engine.model import Transformer
from engine.serving.generate import generate
from engine.serving.steps import SamplingParams, sample


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


class LetterTokenizer:
    """id -> one letter (a..z by id mod 26): stop strings over text without a real vocabulary."""
    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


# What generate() returned before it drove the Scheduler (its own decode loop, stop strings checked by
# re-decoding the whole output), recorded from commit c814dc5 with /tmp/pin.py-style calls below.
PINNED_GREEDY = [[214, 214, 214, 176, 15, 151, 38, 15, 189, 146, 87, 86], [119, 91, 5], [124, 123, 204, 150, 147, 5, 223, 228, 150, 10, 88, 57, 147, 10, 88, 147, 251, 147, 251, 147], [236, 236, 236, 236, 221, 221, 221], [129, 81, 129, 181, 129, 81, 131, 236, 129, 81, 176, 81, 176, 81, 82]]
PINNED_STOPS = [[214, 214, 214, 176], [119, 91, 5], [124, 123, 204, 150, 147, 5, 223, 228, 150, 10, 88, 57, 147, 10, 88, 147], [236, 236], [129, 81, 129, 181, 129, 81, 131, 236, 129, 81, 176, 81, 176, 81, 82, 163]]
PINNED_STOP_REASONS = ['stop', 'stop', 'length', 'stop', 'length']
PINNED_SAMPLED = [[103, 238, 10, 130, 105, 176, 103, 130, 213, 223], [91, 142, 51, 225, 73, 223, 137, 153, 218, 21], [123, 80, 179, 204, 54, 164, 250, 154, 146, 80], [90, 126, 181, 89, 121, 97, 154, 59, 89, 63], [15, 216, 129, 181, 236, 129, 228, 165, 119, 81]]


def test_single_decode_loop_equals_the_previous_results(model):
    g = torch.Generator().manual_seed(11)
    ps = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 12)]
    out = generate(model, ps, [12, 3, 20, 7, 15])
    assert [o.token_ids for o in out] == PINNED_GREEDY
    out = generate(model, ps, 16, eos_ids={PINNED_GREEDY[0][4]}, stop_strings=["nf", "cc"], tokenizer=LetterTokenizer())
    assert [o.token_ids for o in out] == PINNED_STOPS
    assert [o.finish_reason for o in out] == PINNED_STOP_REASONS
    out = generate(model, ps, 10, temperature=0.8, top_k=20, seed=5)
    assert [o.token_ids for o in out] == PINNED_SAMPLED


def test_stop_string_keeps_the_token_that_completes_it(model):
    """The stop check sees only the output's tail (engine.serving.scheduler.STOP_WINDOW tokens), so a stop far into a long
    output is still found, at the token that completes it."""
    p = prompts([6], seed=4)[0]
    free = generate(model, [p], 120)[0].token_ids
    text = LetterTokenizer().decode(free)
    stop = text[100:103]
    first = text.find(stop)
    out = generate(model, [p], 120, stop_strings=[stop], tokenizer=LetterTokenizer())[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 3]


def test_streaming_and_adapters_through_the_scheduler(model):
    from engine.lora import add_adapters
    m = Transformer(model.cfg).init_weights(seed=3, std=0.1).eval()
    add_adapters(m, ["a", "b"], rank=4, alpha=8)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    ps = prompts([4, 9, 6], seed=5)
    seen = []
    outs = generate(m, ps, 8, adapter_ids=[1, -1, 0], on_token=lambda row, t: seen.append((row, t)))
    for row, (p, aid, o) in enumerate(zip(ps, [1, -1, 0], outs)):
        ids = list(p)
        for _ in range(8):                                       # recompute with the row's adapter, no cache
            with torch.no_grad():
                ids.append(int(m(torch.tensor([ids]), adapter_ids=torch.tensor([aid]))[0, -1].argmax()))
        assert o.token_ids == ids[len(p):]
        assert [t for r, t in seen if r == row] == o.token_ids
