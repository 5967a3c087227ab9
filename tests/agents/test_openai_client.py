"""The official `openai` Python client against `mcl serve`'s server (a tiny random model on loopback, the real
scheduler): models.list; chat and completions, streaming and not, with n, top_p, top_k (extra_body), seed and
logprobs in OpenAI's shapes; streamed pieces add up to the whole answer; a base model name means no adapter;
n=4 costs one prefill and decodes as one batch; every bad value of a new field is a 400 naming it.

    python -m pytest tests/agents/test_openai_client.py -q
"""
import pytest
import torch

openai = pytest.importorskip("openai")

from engine.config import PRESETS                # noqa: E402
from engine.lora import add_adapters             # noqa: E402
from engine.model import Transformer             # noqa: E402
from engine.serving.backend import LocalBackend  # noqa: E402
from engine.serving.http_server import serve     # noqa: E402
from engine.serving.scheduler import Scheduler   # noqa: E402

ROLES = ["retriever", "planner", "coder", "debugger"]
BASE = "tiny-test"
MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "write is_prime(n) héllo"}]


class ByteTokenizer:
    """One token per byte (the tiny model has 256 ids): a token can be half of a UTF-8 character."""
    eos_ids = set()

    def encode(self, text, add_special=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=True):
        return bytes(ids).decode("utf-8", "replace")

    def token_bytes(self, token_id):
        return bytes([token_id])

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode("".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>")


@pytest.fixture(scope="module")
def served():
    m = Transformer(PRESETS["tiny"]).init_weights(seed=5, std=0.1).eval()
    add_adapters(m, ROLES, rank=8, alpha=16)
    g = torch.Generator().manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:                                  # every adapter changes the outputs
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tok = ByteTokenizer()
    sched = Scheduler(m, tok, n_slots=4, max_len=256, log_batches=True).start()
    server = serve(LocalBackend(sched, tok, adapters=True), model_name=BASE, max_n=4, vocab_size=256)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield client, sched, tok
    server.shutdown()
    server.server_close()
    sched.stop()


def chat(client, **kw):
    return client.chat.completions.create(**{"model": "coder", "messages": MSGS, "max_tokens": 12, **kw})


def complete(client, **kw):
    return client.completions.create(**{"model": "coder", "prompt": "def is_prime(n):", "max_tokens": 12, **kw})


def test_models_list_names_the_roles_and_the_base_model(served):
    client, _, _ = served
    assert [m.id for m in client.models.list()] == ROLES + [BASE]


def test_chat_n_top_p_top_k_seed_logprobs(served):
    client, _, tok = served
    kw = dict(n=2, temperature=1.0, top_p=0.9, seed=7, logprobs=True, top_logprobs=3, extra_body={"top_k": 40})
    r = chat(client, **kw)
    assert r.object == "chat.completion" and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(tok.apply_chat_template(MSGS))
    for c in r.choices:
        content = c.logprobs.content
        assert c.finish_reason == "length" and len(content) == 12
        assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == c.message.content
        for e in content:
            tops = [t.logprob for t in e.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
            assert e.logprob <= tops[0] + 1e-6 and e.token == (bytes(e.bytes).decode() if e.bytes[0] < 128
                                                               else "bytes:" + "".join(f"\\x{b:02x}" for b in e.bytes))
    assert r.choices[0].message.content != r.choices[1].message.content       # each choice its own stream
    again = chat(client, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]   # seeded
    plain = chat(client)
    assert plain.choices[0].logprobs is None and len(plain.choices) == 1


def test_chat_streaming_adds_up_to_the_answer(served):
    client, _, _ = served
    kw = dict(n=2, temperature=0.8, top_p=0.95, seed=3, logprobs=True, top_logprobs=2)
    whole = chat(client, **kw)
    text, tokens, finish = ["", ""], [[], []], [None, None]
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **kw))
    for ch in chunks:
        assert ch.object == "chat.completion.chunk"
        for c in ch.choices:
            text[c.index] += c.delta.content or ""
            tokens[c.index] += [e.token for e in (c.logprobs.content if c.logprobs else [])]
            finish[c.index] = finish[c.index] or c.finish_reason
    assert text == [c.message.content for c in whole.choices]
    assert tokens == [[e.token for e in c.logprobs.content] for c in whole.choices]
    assert finish == ["length", "length"] and chunks[-1].usage.completion_tokens == 24
    assert sum(1 for ch in chunks for c in ch.choices if c.delta.content) > 2    # token by token, not one piece


def test_completions_string_or_ids_streaming_and_logprobs(served):
    client, _, tok = served
    r = complete(client, n=3, temperature=1.0, seed=11, logprobs=2)
    assert r.object == "text_completion" and len(r.choices) == 3 and r.usage.completion_tokens == 36
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(c.text)
        assert all(t in top and len(top) in (2, 3) for t, top in zip(lp.tokens, lp.top_logprobs))
    greedy = complete(client, max_tokens=20)
    ids = complete(client, prompt=tok.encode("def is_prime(n):"), max_tokens=20)
    assert ids.choices[0].text == greedy.choices[0].text and ids.usage.prompt_tokens == 16

    text, tokens, offsets = ["", "", ""], [[], [], []], [[], [], []]
    for ch in complete(client, n=3, temperature=1.0, seed=11, logprobs=2, stream=True):
        assert ch.object == "text_completion"
        for c in ch.choices:
            text[c.index] += c.text
            if c.logprobs:
                tokens[c.index] += c.logprobs.tokens
                offsets[c.index] += c.logprobs.text_offset
    assert text == [c.text for c in r.choices]
    assert tokens == [c.logprobs.tokens for c in r.choices] and offsets == [c.logprobs.text_offset for c in r.choices]
    one = complete(client, logprobs=0, max_tokens=16).choices[0]                      # n = 1 streams logprobs too
    streamed = list(complete(client, logprobs=0, max_tokens=16, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == one.text
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == one.logprobs.tokens
    assert all(len(top) == 1 for top in one.logprobs.top_logprobs)                     # k = 0: the sampled token only


def test_the_base_model_name_means_no_adapter(served):
    client, sched, tok = served
    base = complete(client, model=BASE, max_tokens=16).choices[0].text
    coder = complete(client, model="coder", max_tokens=16).choices[0].text
    other = complete(client, model="gpt-4o", max_tokens=16).choices[0].text        # the documented fallback: coder
    direct = sched.submit(tok.encode("def is_prime(n):"), adapter=None, max_new_tokens=16).result(timeout=60)
    assert base == direct.text and coder == other and base != coder


def test_n4_costs_one_prefill_and_decodes_as_one_batch(served):
    client, sched, tok = served
    prompt = "a prompt nobody sent before, 40 bytes!!"
    before, logged = sched.stats["prefill_tokens"], len(sched.batch_log)
    r = complete(client, prompt=prompt, n=4, temperature=1.0, seed=5, max_tokens=8)
    assert len(r.choices) == 4 and r.usage.prompt_tokens == len(tok.encode(prompt))
    assert sched.stats["prefill_tokens"] - before == len(tok.encode(prompt))            # once, not 4 times
    assert [b["size"] for b in sched.batch_log[logged:]] == [4] * 7                     # 7 steps after the first token
    before = sched.stats["prefill_tokens"]
    chat(client, messages=[{"role": "user", "content": "fresh chat"}], n=4, temperature=1.0, max_tokens=4)
    assert sched.stats["prefill_tokens"] - before == len(tok.apply_chat_template([{"role": "user",
                                                                                     "content": "fresh chat"}]))


BAD = [  # (endpoint, extra fields, the field the 400 names)
    ("chat", dict(n=0), "n"), ("chat", dict(n=1000), "n"), ("chat", dict(n=5), "n"), ("completions", dict(n=0), "n"),
    ("chat", dict(top_p=0), "top_p"), ("chat", dict(top_p=1.5), "top_p"), ("chat", dict(top_p="x"), "top_p"),
    ("completions", dict(top_p=-0.1), "top_p"),
    ("chat", dict(extra_body={"top_k": -1}), "top_k"), ("completions", dict(extra_body={"top_k": 2.5}), "top_k"),
    ("chat", dict(seed="x"), "seed"), ("completions", dict(seed=2 ** 70), "seed"),
    ("chat", dict(logprobs="yes"), "logprobs"), ("chat", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat", dict(logprobs=True, top_logprobs=-1), "top_logprobs"), ("chat", dict(top_logprobs=2), "top_logprobs"),
    ("completions", dict(logprobs=6), "logprobs"), ("completions", dict(logprobs=True), "logprobs"),
    ("completions", dict(prompt=5), "prompt"), ("completions", dict(prompt=[]), "prompt"),
    ("completions", dict(prompt=""), "prompt"), ("completions", dict(prompt=[1.5, 2]), "prompt"),
    ("completions", dict(prompt=["a", "b"]), "prompt"), ("completions", dict(prompt=[300]), "prompt"),
    ("completions", dict(prompt=[-1]), "prompt"), ("completions", dict(prompt={"text": "x"}), "prompt"),
    ("completions", dict(echo=True), "echo"), ("completions", dict(best_of=3), "best_of"),
    ("completions", dict(suffix="x"), "suffix"), ("chat", dict(stream_options={"include_usage": 1}), "stream_options"),
    ("chat", dict(max_tokens=0), "max_tokens"), ("completions", dict(temperature=3), "temperature"),
]


@pytest.mark.parametrize("endpoint,fields,param", BAD, ids=[f"{e}-{p}-{i}" for i, (e, _, p) in enumerate(BAD)])
def test_bad_values_are_400s_naming_the_field(served, endpoint, fields, param):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        (chat if endpoint == "chat" else complete)(client, **fields)
    assert e.value.status_code == 400 and e.value.param == param and param in e.value.message


def test_a_chat_only_backend_serves_plain_chat_and_names_what_it_cannot(served):
    from engine.serving.backend import Completion

    class Echo:
        def chat(self, role, messages, max_new_tokens, temperature=0.0, stop=None):
            return Completion(f"[{role}] {messages[-1]['content']}", prompt_tokens=3, completion_tokens=2)
    server = serve(Echo())
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert chat(client).choices[0].message.content == "[coder] write is_prime(n) héllo"
        assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True) if c.choices) == \
            "[coder] write is_prime(n) héllo"
        for call, kw, param in [(chat, dict(n=2), "n"), (chat, dict(top_p=0.5), "top_p"),
                                (chat, dict(logprobs=True), "logprobs"), (complete, {}, "prompt")]:
            with pytest.raises(openai.BadRequestError) as e:
                call(client, **kw)
            assert e.value.param == param
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="coder", input="x")
    finally:
        server.shutdown()
        server.server_close()
