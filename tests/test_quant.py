"""Packed CPU weights (engine/quant.py): the GGUF 4-bit layout, the int4 kernel against its torch reference, packed
models against the fp32 model (with and without adapters), and the real SmolLM2 GGUF in q4.

    python -m pytest tests/test_quant.py -x -q
"""
import numpy as np
import pytest
import torch

from engine.config import PRESETS
from engine.lora import add_adapters
from engine.model import Transformer
from engine.quant import GROUP, Q4_MAX_ROWS, PackedLinear, dequant_q4, gguf_q4_rows, pack_model, pack_q4

gguf = pytest.importorskip("gguf")


def _random_blocks(type_name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes for a (n_rows, n_cols) Q4_0 / Q4_1 tensor with random nibbles and scales."""
    rng = np.random.default_rng(seed)
    n_blocks = n_rows * n_cols // GROUP
    d = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    qs = rng.integers(0, 256, size=(n_blocks, 16), dtype=np.uint8)
    if type_name == "Q4_0":
        return np.concatenate([d, qs], axis=1)
    m = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return np.concatenate([d, m, qs], axis=1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_rows_equal_gguf_dequantize(type_name):
    """Our reading of the blocks, through the kernel's (q - 8) * scale + zero convention, is the gguf package's
    dequantisation exactly (fp32)."""
    n_rows, n_cols = 24, 96
    raw = _random_blocks(type_name, n_rows, n_cols)
    q, scale, zero = gguf_q4_rows(raw, type_name, n_rows, n_cols)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and tuple(q.shape) == (n_rows, n_cols)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(n_rows, n_cols)
    got = dequant_q4(q, scale, zero).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gguf_q4_rows_rejects_wrong_size():
    with pytest.raises(ValueError, match="does not hold 24x64"):
        gguf_q4_rows(_random_blocks("Q4_1", 24, 96), "Q4_1", 24, 64)


@pytest.mark.parametrize("rows", [1, 5, Q4_MAX_ROWS, Q4_MAX_ROWS + 1, 100])
def test_packed_linear_matches_reference(rows):
    """Both paths (int4 kernel for few rows, dense bf16 above Q4_MAX_ROWS) against x @ W^T in float64 with the
    file's weights: error of bf16 rounding (activations and scales), nothing more."""
    n_out, n_in = 80, 128
    q, scale, zero = gguf_q4_rows(_random_blocks("Q4_1", n_out, n_in, seed=rows), "Q4_1", n_out, n_in)
    w = dequant_q4(q, scale, zero)
    pk = PackedLinear(w.to(torch.bfloat16), *pack_q4(q, scale, zero))
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ w.double().t()
    got = pk(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n_out)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-2, f"relative error {err:.2e}"
    got3 = pk(x.view(1, rows, n_in))                                  # leading dims are kept
    assert got3.shape == (1, rows, n_out) and torch.equal(got3[0], got)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"]).init_weights(seed=seed).eval()


def test_pack_model_bf16_close_to_fp32_and_training_ignores_it():
    model = _tiny()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(tokens)
        stats = pack_model(model, "bf16")
        got = model(tokens)
    assert stats["dense_bf16"] == 7 * model.cfg.n_layers + 1 and stats["packed_q4"] == 0
    assert not torch.equal(got, ref)                                  # the packed path did run
    assert (got - ref).abs().max() / ref.abs().max() < 2e-2
    with torch.enable_grad():                                         # gradients never go through packed copies
        assert torch.equal(model(tokens), ref)


def test_packed_q4_with_mixed_adapters_matches_fp32():
    """q4-packed base + four adapters, a decode-sized batch mixing adapters and base rows: each row equals the
    fp32 model with the same adapter (bf16 tolerance), and the adapters change the output."""
    model = _tiny()
    add_adapters(model, ["retriever", "planner", "coder", "debugger"], rank=8, alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    # Build q4 blocks for every projection from its fp32 weight (a re-quantisation, fine for this test) and
    # make the fp32 weights equal to what the blocks hold, so the reference is the same model.
    q4 = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "packed"):
                w = mod.weight.view(mod.out_features, -1, GROUP)
                lo, hi = w.amin(-1), w.amax(-1)
                scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.float16).float()
                q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view_as(mod.weight)
                zero = lo.to(torch.float16).float() + 8 * scale
                mod.weight.copy_(dequant_q4(q, scale, zero))
                q4[f"{name}.weight"] = (q, scale, zero)
    tokens = torch.randint(0, model.cfg.vocab_size, (6, 1), generator=g)
    ids = torch.tensor([0, 1, 2, 3, -1, 2])
    one = torch.full((6,), 1)                                          # every row on one adapter: the fast path
    with torch.inference_mode():
        ref, ref_one = model(tokens, adapter_ids=ids), model(tokens, adapter_ids=one)
        base = model(tokens)
        stats = pack_model(model, "q4", q4)
        got, got_one = model(tokens, adapter_ids=ids), model(tokens, adapter_ids=one)
    assert stats["packed_q4"] == 7 * model.cfg.n_layers
    for r, g in ((ref, got), (ref_one, got_one)):
        assert (r - base).abs().max() > 10 * (g - r).abs().max()      # adapters matter more than rounding
        assert (g - r).abs().max() / r.abs().max() < 2e-2


def test_merge_drops_the_stale_packed_copy():
    model = _tiny()
    add_adapters(model, ["coder"], rank=4, alpha=8)
    pack_model(model, "bf16")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.packed is not None
    layer.merge(0)
    assert layer.packed is None


def test_pack_model_rejects_unknown_mode():
    with pytest.raises(ValueError, match="weights='int3'"):
        pack_model(_tiny(), "int3")


def _teacher_forced_decode(model, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """Logits for positions n_prompt-1 .. end-1: the prompt prefilled at once, then one token per call through the
    KV cache (so the packed model runs its decode path, the int4 kernel)."""
    from engine.kv_cache import KVCache
    cache = KVCache(model.cfg, 1, len(tokens))
    x = torch.tensor([tokens])
    out = [model(x[:, :n_prompt], input_pos=torch.arange(n_prompt)[None], kv_cache=cache)[0, -1]]
    for p in range(n_prompt, len(tokens) - 1):
        out.append(model(x[:, p:p + 1], input_pos=torch.tensor([[p]]), kv_cache=cache)[0, -1])
    return torch.stack(out)


@pytest.mark.slow
def test_smollm2_q4_packs_every_projection_and_agrees_with_fp32():
    """The real GGUF: all 210 projections are Q4_1 and stay 4-bit. Teacher-forced on the fp32 model's own greedy
    continuation, the q4 model's next-token choice agrees with fp32's on nearly every position, through the
    decode path (int4 kernel) and the prefill path (dense bf16); bf16 rounding may flip near-ties, so not all."""
    from engine.generate import generate
    from engine.hub import load_model
    fp32, tok = load_model("smollm2-135m", device="cpu")
    q4, _ = load_model("smollm2-135m", device="cpu", weights="q4")
    assert q4.pack_stats["packed_q4"] == 210
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that checks whether a "
                                       "number is prime, then explain it."}], add_generation_prompt=True)
    with torch.inference_mode():
        seq = prompt + generate(fp32, [prompt], 48, ignore_eos=True)[0].token_ids
        want = fp32(torch.tensor([seq]))[0, len(prompt) - 1:-1].argmax(-1)
        decode = _teacher_forced_decode(q4, seq, len(prompt)).argmax(-1)
        prefill = q4(torch.tensor([seq]))[0, len(prompt) - 1:-1].argmax(-1)
    for name, got in (("decode", decode), ("prefill", prefill)):
        agree = (got == want).float().mean().item()
        assert agree >= 0.9, f"{name} path: top-1 agreement {agree:.2f}"
