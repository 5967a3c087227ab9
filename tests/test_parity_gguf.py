"""Parity on the real embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF), ours vs transformers reading the same file.

    python -m pytest tests/test_parity_gguf.py -x -q       # fetches the GGUF into the cache on first use (93 MB)

transformers dequantises the GGUF with its own code (from_pretrained(dir, gguf_file=...), no kernels on CPU), so
this checks our dequantisation, the llama.cpp Q/K un-permutation, the config read from metadata, the decoder and
greedy generation end to end.
"""
import pytest
import torch

from engine.loading.hub import load_model, model_path

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "def is_even(n):\n    # complete this\n"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small-op-heavy decoding on a shared 2-core machine runs several times faster on one thread (OpenMP
    workers spin against other processes); both sides run under the same setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def path():
    return model_path("smollm2-135m")


@pytest.fixture(scope="module")
def hf_model(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def ours(path):
    return load_model(path, device="cpu", dtype=torch.float32)


def test_state_dict_equals_transformers(ours, hf_model):
    """load_model assigns load_gguf's tensors as the parameters, so this is load_gguf's state dict."""
    cfg, sd = ours[0].cfg, ours[0].state_dict()
    ref = hf_model.state_dict()
    assert cfg.tie_embeddings and set(ref) - set(sd) == {"lm_head.weight"} and not set(sd) - set(ref)
    for k, v in sd.items():
        assert v.dtype == torch.float32 and v.shape == ref[k].shape, k
        assert torch.equal(v, ref[k]), f"{k}: max |diff| {(v - ref[k]).abs().max().item()}"


def test_logits_match_transformers(ours, hf_model):
    model, tok = ours
    for msgs in PROMPTS[:3]:
        x = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True)])
        with torch.no_grad():
            a, b = model(x), hf_model(x).logits
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-3, f"max relative logit difference {rel:.2e}"


def test_greedy_generation_matches_transformers(ours, hf_model):
    """32 greedy tokens on 5 prompts, generated as one batch by engine.serving.generate, equal transformers' generate."""
    from engine.serving.generate import generate
    model, tok = ours
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True) for m in PROMPTS]
    outs = generate(model, prompts, max_new_tokens=32, eos_ids=tok.eos_ids)
    for p, out in zip(prompts, outs):
        ref = hf_model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=sorted(tok.eos_ids),
                                pad_token_id=tok.pad_id, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        ref_ids = ref[0, len(p):].tolist()
        if ref_ids and ref_ids[-1] in tok.eos_ids:                 # ours does not return the EOS token
            ref_ids = ref_ids[:-1]
        assert out.token_ids == ref_ids, (tok.decode(out.token_ids), tok.decode(ref_ids))
    assert sum(len(o.token_ids) for o in outs) >= 5 * 8, "expected real continuations, not immediate EOS"
