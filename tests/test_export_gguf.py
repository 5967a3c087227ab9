"""`mcl export --gguf`: our PEFT adapters as llama.cpp GGUF LoRA files, with llama.cpp itself as the oracle.

    python -m pytest tests/test_export_gguf.py -q

The oracle test loads the exported adapter in llama-cpp-python and compares next-token logits with ours (fp32 from
the same GGUF, the same adapter). (1) On an F32 copy of SmolLM2-135M's GGUF (same tensors, row order and
metadata) llama.cpp computes in fp32 like us: base and adapted logits agree to < 1e-3 (measured ~5e-5, the adapter
moving logits by up to ~2.5), and the same export without the Q/K row permutation is off by ~1 (so the check
discriminates). (2) On the Q4_1 file users run, llama.cpp's 8-bit activations add their own noise: the adapted
logits correlate > 0.99 with ours and the top-1 agrees. Skipped only when
llama_cpp is not installed (`python -m bench.llama_build` builds it for this CPU; scripts/test.sh runs that).
llama.cpp runs in a child process (bench/isolated.py): if its native code crashes on this CPU (a SIGSEGV in
libggml-cpu.so, a SIGILL from a wheel built for another CPU), this is one failed test naming the signal and the
rest of the suite runs on.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.isolated import ChildError, run_isolated
from engine.loading.export_gguf import export_gguf, permute_rows
from engine.loading.hub import load_model, model_path
from engine.loading.weights import _unpermute, open_gguf
from engine.lora import ALL_TARGETS, add_adapters, adapter_id, save_peft

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
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
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


def _f32_copy(src, dst):
    """The same GGUF with every tensor dequantised to F32 (names, row order and metadata kept): llama.cpp then
    computes in fp32 like our fp32 model of `src`, instead of in Q4_1 blocks with 8-bit activations."""
    import gguf
    from gguf.quants import dequantize
    r = open_gguf(src)
    w = gguf.GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        val = 0 if key == "general.file_type" else f.contents()               # 0 = ALL_F32
        w.add_key_value(key, val, f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        w.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _llama_last_logits(runs, tokens) -> dict:
    """In the child process: llama.cpp's last-position logits for each (model file, LoRA file or None) of `runs`."""
    import llama_cpp
    out = {}
    for i, (model_file, lora_path) in enumerate(runs):
        llm = llama_cpp.Llama(model_path=str(model_file), lora_path=lora_path and str(lora_path), logits_all=True,
                              n_threads=2, n_ctx=256, verbose=False, seed=0,
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        llm.eval(tokens)
        out[str(i)] = np.array(llm.scores[len(tokens) - 1], dtype=np.float64)
        llm.close()
    return out


def _llama_logits(runs, tokens) -> list[np.ndarray]:
    """_llama_last_logits in a child process; a crash there fails this test with one line (the signal)."""
    try:
        got, crash = run_isolated(_llama_last_logits, runs, tokens,
                                  label="llama.cpp (llama-cpp-python: libllama / libggml-cpu.so)"), None
    except ChildError as e:
        crash = str(e)
    if crash:                                   # outside the except: no "during handling" chain in the report
        pytest.fail(crash, pytrace=False)
    return [got[str(i)] for i in range(len(runs))]


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_llama_cpp_applies_exported_adapter_like_ours(smollm2_adapter, tmp_path, monkeypatch):
    if importlib.util.find_spec("llama_cpp") is None:           # found, not imported: loading it may crash
        pytest.skip("llama_cpp not installed (python -m bench.llama_build builds and installs it for this CPU)")
    model, tok, d = smollm2_adapter
    tokens = tok.encode(PROMPT)
    x = torch.tensor([tokens])
    with torch.no_grad():
        ours_base = model(x)[0, -1].double().numpy()
        ours_lora = model(x, adapter_ids=torch.tensor([adapter_id(model, "rand")]))[0, -1].double().numpy()
    effect_ours = ours_lora - ours_base
    assert np.abs(effect_ours).max() > 1.0, "the random adapter must move the logits for this test to mean anything"
    path = export_gguf(d, tmp_path / "rand.gguf", model="smollm2-135m")
    # The same adapter exported without the Q/K row permutation: llama.cpp must apply it wrongly (the check bites).
    monkeypatch.setattr("engine.loading.export_gguf.permute_rows", lambda w, n_heads: w)
    wrong = export_gguf(d, tmp_path / "unpermuted.gguf", model="smollm2-135m")
    monkeypatch.undo()
    f32 = _f32_copy(model_path("smollm2-135m"), tmp_path / "smollm2-f32.gguf")
    q41 = model_path("smollm2-135m")
    ll_base, ll_lora, ll_wrong, q_base, q_lora = _llama_logits(
        [(f32, None), (f32, path), (f32, wrong), (q41, None), (q41, path)], tokens)

    # 1. fp32 on both sides (llama.cpp on an F32 copy of the GGUF): the logits agree closely.
    base_diff, lora_diff = np.abs(ll_base - ours_base).max(), np.abs(ll_lora - ours_lora).max()
    effect_corr = _corr(effect_ours, ll_lora - ll_base)
    report = (f"fp32: max|llama.cpp - ours| base {base_diff:.2e}, adapted {lora_diff:.2e} (adapter effect up to "
              f"{np.abs(effect_ours).max():.2f}); effect corr {effect_corr:.6f}; top-1 {ours_lora.argmax()} / "
              f"{ll_lora.argmax()}")
    print(report)
    assert base_diff < 1e-3 and lora_diff < 1e-3, report
    assert effect_corr > 0.9999 and ours_lora.argmax() == ll_lora.argmax(), report
    wrong_diff = np.abs(ll_wrong - ours_lora).max()
    print(f"unpermuted export: max|llama.cpp - ours| adapted {wrong_diff:.2e}")
    assert wrong_diff > 10 * lora_diff, f"unpermuted {wrong_diff:.2e} vs permuted {lora_diff:.2e}"

    # 2. The file as users run it, on the Q4_1 GGUF (llama.cpp's 8-bit activations add noise of their own).
    q_report = (f"Q4_1: adapted logits corr {_corr(ours_lora, q_lora):.5f}, effect corr "
                f"{_corr(effect_ours, q_lora - q_base):.4f}, top-1 {ours_lora.argmax()} / {q_lora.argmax()}")
    print(q_report)
    assert _corr(ours_lora, q_lora) > 0.99 and ours_lora.argmax() == q_lora.argmax(), q_report
