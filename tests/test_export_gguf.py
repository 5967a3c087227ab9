"""`mcl export --gguf`: our PEFT adapters as llama.cpp GGUF LoRA files, with llama.cpp itself as the oracle.

    python -m pytest tests/test_export_gguf.py -q

The oracle test loads SmolLM2-135M's GGUF in llama-cpp-python with and without the exported adapter and compares
next-token logits with ours (fp32, the same GGUF dequantised, the same adapter). llama.cpp computes in its Q4_1
blocks with 8-bit activations, so its logits are not ours to 1e-4; what must agree is the adapter's effect
(adapted minus base logits: correlation > 0.99) and the adapted top-1. A wrong Q/K row order or a transposed A/B
gives a visibly different effect (the test also checks that an unpermuted export is worse). Skipped only when
llama_cpp is not importable (the `test` extra installs it).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.export_gguf import export_gguf, permute_rows
from engine.hub import load_model, model_path
from engine.lora import ALL_TARGETS, add_adapters, adapter_id, save_peft
from engine.weights import _unpermute, open_gguf

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def test_permute_rows_inverts_unpermute():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)    # 2 heads of head_dim 8, 3 columns
    assert torch.equal(_unpermute(permute_rows(w, 2), 2), w)
    assert not torch.equal(permute_rows(w, 2), w)


@pytest.fixture(scope="module")
def smollm2_adapter(tmp_path_factory):
    """Our SmolLM2-135M (fp32 from the GGUF) with one random non-zero rank-8 adapter on all 7 targets, saved."""
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    add_adapters(model, ["rand"], rank=8, alpha=16, targets=ALL_TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    d = tmp_path_factory.mktemp("adapters") / "rand"
    save_peft(model, "rand", d, base_model="smollm2-135m")
    return model, tok, d


def test_export_layout_round_trip(smollm2_adapter, tmp_path):
    """The file reads back (through gguf-py) as llama.cpp expects: metadata keys, names, ne order, and B of q/k
    permuted like the base weights."""
    model, _, d = smollm2_adapter
    out = export_gguf(d, tmp_path / "rand.gguf", model="smollm2-135m")
    r = open_gguf(out)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 * 7 * model.cfg.n_layers
    peft = load_file(str(d / "adapter_model.safetensors"))
    a = t["blk.3.attn_q.weight.lora_a"]
    assert list(a.shape) == [model.cfg.dim, 8]                             # ne = [in, r]
    b = t["blk.3.attn_k.weight.lora_b"]
    assert list(b.shape) == [8, model.cfg.n_kv_heads * model.cfg.head_dim]  # ne = [r, out]
    pre = "base_model.model.model.layers.3."
    assert np.array_equal(np.asarray(a.data), peft[pre + "self_attn.q_proj.lora_A.weight"].numpy())
    k_b = _unpermute(torch.from_numpy(np.array(b.data)), model.cfg.n_kv_heads)
    assert torch.equal(k_b, peft[pre + "self_attn.k_proj.lora_B.weight"])
    v_b = np.asarray(t["blk.3.attn_v.weight.lora_b"].data)
    assert np.array_equal(v_b, peft[pre + "self_attn.v_proj.lora_B.weight"].numpy())


def test_export_rejects_adapter_of_another_base(smollm2_adapter, tmp_path):
    _, _, d = smollm2_adapter
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    sd[key] = torch.zeros(1536, 8)                                         # SmolLM2's up_proj has 1536 rows
    sd[key.replace("up_proj", "down_proj").replace("lora_B", "lora_A")] = torch.zeros(8, 4864)
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        export_gguf(bad, tmp_path / "bad.gguf", model="smollm2-135m")
    msg = str(e.value)
    assert "layers.2.mlp.down_proj.lora_A.weight" in msg and "(8, 4864)" in msg and "(576, 1536)" in msg, msg
    assert not (tmp_path / "bad.gguf").exists()

    cfg = json.loads((d / "adapter_config.json").read_text())
    sd = load_file(str(d / "adapter_model.safetensors"))
    sd["base_model.model.model.layers.30.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 576)
    save_file(sd, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layers\.30\.self_attn\.q_proj.*30 layers"):
        export_gguf(bad, tmp_path / "bad.gguf", model="smollm2-135m")


def _llama_last_logits(llama_cpp, tokens, lora_path=None):
    llm = llama_cpp.Llama(model_path=str(model_path("smollm2-135m")), lora_path=lora_path and str(lora_path),
                          logits_all=True, n_threads=2, n_ctx=256, verbose=False, seed=0)
    llm.eval(tokens)
    out = np.array(llm.scores[len(tokens) - 1], dtype=np.float64)
    llm.close()
    return out


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_llama_cpp_applies_exported_adapter_like_ours(smollm2_adapter, tmp_path, monkeypatch):
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp not importable (pip install -e '.[test]' installs llama-cpp-python)")
    model, tok, d = smollm2_adapter
    tokens = tok.encode(PROMPT)
    x = torch.tensor([tokens])
    with torch.no_grad():
        ours_base = model(x)[0, -1].double().numpy()
        ours_lora = model(x, adapter_ids=torch.tensor([adapter_id(model, "rand")]))[0, -1].double().numpy()
    path = export_gguf(d, tmp_path / "rand.gguf", model="smollm2-135m")
    ll_base = _llama_last_logits(llama_cpp, tokens)
    ll_lora = _llama_last_logits(llama_cpp, tokens, path)

    base_corr = _corr(ours_base, ll_base)
    effect_ours, effect_ll = ours_lora - ours_base, ll_lora - ll_base
    effect_corr = _corr(effect_ours, effect_ll)
    rel = np.abs(effect_ll - effect_ours).max() / np.abs(effect_ours).max()
    report = (f"base logits corr {base_corr:.5f}, max|diff| {np.abs(ll_base - ours_base).max():.3f}; "
              f"adapter effect: max|ours| {np.abs(effect_ours).max():.3f}, corr {effect_corr:.5f}, "
              f"max|diff|/max|ours| {rel:.4f}; top-1 ours {ours_lora.argmax()} llama.cpp {ll_lora.argmax()}")
    print(report)
    assert np.abs(effect_ours).max() > 1.0, "the random adapter must move the logits for this test to mean anything"
    assert base_corr > 0.999, report
    assert effect_corr > 0.99, report
    assert ours_lora.argmax() == ll_lora.argmax(), report

    # The check discriminates: the same adapter without the Q/K row permutation is applied wrongly.
    monkeypatch.setattr("engine.export_gguf.permute_rows", lambda w, n_heads: w)
    wrong = export_gguf(d, tmp_path / "unpermuted.gguf", model="smollm2-135m")
    wrong_corr = _corr(effect_ours, _llama_last_logits(llama_cpp, tokens, wrong) - ll_base)
    print(f"unpermuted export: effect corr {wrong_corr:.5f}")
    assert wrong_corr < effect_corr - 0.01, f"unpermuted {wrong_corr:.5f} vs permuted {effect_corr:.5f}"
