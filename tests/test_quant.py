"""Packed CPU weights (engine/cpu/packed.py, engine/cpu/qmatmul.c, engine/loading/packed_model.py): every GGUF block type read into its layout exactly, the
kernel against its integer reference and against the gguf package's dequantisation @ x, fused against unfused,
packed models against the fp32 model (with and without adapters), GGUF loading straight into the packed layout
(including a type we do not pack), and the real SmolLM2 GGUF.

    python -m pytest tests/test_quant.py -x -q
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import PRESETS
from engine.cpu.kernels import available, dequant_min_m, dequantize_ref, qmatmul_ref
from engine.cpu.library import VARIANTS, missing_flags, select_isa
from engine.cpu.modules import PackedEmbedding, set_decode_kernel
from engine.cpu.packed import BLOCK_BYTES, PACKED_TYPES, PackedLinear, PackedParts
from engine.loading.packed_model import FileRows, pack_dense_model, pack_model_bf16
from engine.lora import add_adapters
from engine.model import Transformer

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not available(), reason="engine/cpu/qmatmul.c needs gcc and an AVX2 + FMA CPU")

@pytest.fixture(params=list(VARIANTS))
def isa(request):
    """Each ISA variant of the integer kernels (engine/cpu/library.py) that this CPU runs, in turn; the others skip,
    naming the flags the CPU lacks."""
    name = request.param
    if missing_flags(name):
        pytest.skip(f"the {name} kernels cannot run on this CPU: it lacks {', '.join(missing_flags(name))}")
    assert select_isa(name) == name, f"the {name} kernels disagree with AVX2 on this CPU (see stderr)"
    yield name
    select_isa()


F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, n_rows: int, n_cols: int, seed: int = 0) -> np.ndarray:
    """Valid random GGUF blocks: random bytes, the fp16 scale fields set to small finite values."""
    rng = np.random.default_rng(seed)
    per, nbytes = BLOCK_BYTES[type_name]
    raw = rng.integers(0, 256, size=(n_rows * n_cols // per, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        vals = (rng.standard_normal(raw.shape[0]) * 0.01).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, -1)


def gguf_dequant(raw, type_name, n_rows, n_cols) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(n_rows, n_cols)


@pytest.mark.parametrize("type_name", PACKED_TYPES)
def test_layout_equals_gguf_dequantize_exactly(type_name):
    """The integers and scales we store are the file's weights, bit for bit (what the kernel multiplies by): the C
    dequantisation and its torch reference both equal the gguf package's."""
    n_rows, n_cols = 24, 512
    raw = random_blocks(type_name, n_rows, n_cols)
    pk = PackedLinear.from_gguf(raw, type_name, n_rows, n_cols)
    want = gguf_dequant(raw, type_name, n_rows, n_cols)
    np.testing.assert_array_equal(pk.dequantize().numpy(), want)
    ref = dequantize_ref(pk.w, pk.scale, pk.wmin, pk.kind, pk.group, pk.sd, pk.md)
    np.testing.assert_array_equal(ref.numpy(), want)
    rows = torch.tensor([3, 0, 23, 3])                                    # the embedding lookup reads the same rows
    assert torch.equal(pk.embed(rows[None])[0], pk.dequantize()[rows])


@pytest.mark.parametrize("type_name,m,n_cols", [(t, m, k) for t in PACKED_TYPES for m in (1, 2, 5, 8, 11)
                                                for k in (512, 608) if k % 256 == 0 or not t.endswith("_K")])
def test_kernel_equals_its_reference_and_bounded_against_dequant(type_name, m, n_cols, isa):
    """y = kernel(x), each ISA variant: equal to the float64 reference of the same arithmetic (int8 activations per 32
    inputs, exact integer block dots) to fp32 rounding; against gguf's dequantised W @ x in float64 the difference is
    the activation rounding only: |err_j| <= sum_k |W_jk| * dx_k / 2. 608 columns are 19 blocks: the kernels' 8-block
    steps, then an odd tail (decode pairs blocks); 2 to 8 rows go as one register tile each, 11 as 8 + 3."""
    assert m < dequant_min_m()                                                  # the integer kernel, not dequant + SGEMM
    n_rows = 40
    raw = random_blocks(type_name, n_rows, n_cols, seed=m)
    pk = PackedLinear.from_gguf(raw, type_name, n_rows, n_cols)
    x = torch.randn(m, n_cols, generator=torch.Generator().manual_seed(m)) * 3
    got = pk(x).double()
    ref = qmatmul_ref(x, pk.w, pk.scale, pk.wmin, pk.kind, pk.group, pk.sd, pk.md)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), f"max diff {(got - ref).abs().max():.3e}"
    w = torch.from_numpy(gguf_dequant(raw, type_name, n_rows, n_cols)).double()
    exact = x.double() @ w.t()
    dx = x.view(m, -1, 32).abs().amax(-1).double() / 127                     # (m, K/32)
    bound = (w.abs().view(n_rows, -1, 32).sum(-1)[None] * dx[:, None]).sum(-1) / 2 + 1e-4 * exact.abs().max()
    assert ((got - exact).abs() <= bound).all(), f"max excess {((got - exact).abs() - bound).max():.3e}"


def test_fused_equals_separate_calls():
    """PackedLinear.cat: equal layouts stack into one weight, different ones (Q5_0, Q6_K group 16, Q8_0) into a
    PackedParts; either gives each part's output bit for bit."""
    parts = [PackedLinear.from_gguf(random_blocks(t, 32, 256, seed=i), t, 32, 256) for i, t in
             enumerate(["Q5_0", "Q6_K", "Q8_0"])]
    fused = PackedLinear.cat(parts)
    assert isinstance(fused, PackedParts) and fused.out_features == 96
    x = torch.randn(3, 256)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    q4 = [PackedLinear.from_gguf(random_blocks("Q4_K", 32, 256, seed=i), "Q4_K", 32, 256) for i in range(2)]
    one = PackedLinear.cat(q4)
    assert isinstance(one, PackedLinear) and one.w.shape[0] == 64
    assert torch.equal(one(x), torch.cat([p(x) for p in q4], dim=-1))


@pytest.mark.parametrize("gemm,tol", [("fp32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("type_name", PACKED_TYPES)
def test_many_rows_dequantise_then_gemm(type_name, gemm, tol, monkeypatch):
    """From dequant_min_m() rows on, y = x @ dequantised W^T (a GEMM over tiles of rows, here several tiles and several
    parts): close to the float64 product with the file's weights; within bf16 rounding on the bf16 GEMM path (the
    default where the CPU multiplies bf16 natively; forced here on every CPU)."""
    import engine.cpu.kernels as ck
    monkeypatch.setattr(ck, "TILE_WEIGHTS", 7 * 512)                          # 7-row tiles: a partial last tile
    monkeypatch.setattr(ck, "BF16_TILE_WEIGHTS", 7 * 512)
    monkeypatch.setenv("MCL_GEMM_DTYPE", gemm)
    raws = [random_blocks(type_name, 40, 512, seed=s) for s in (1, 2)]
    parts = [PackedLinear.from_gguf(r, type_name, 40, 512) for r in raws]
    x = torch.randn(dequant_min_m() + 3, 512, generator=torch.Generator().manual_seed(0))
    w = torch.cat([torch.from_numpy(gguf_dequant(r, type_name, 40, 512)) for r in raws]).double()
    exact = x.double() @ w.t()
    for got in (parts[0](x), PackedParts(parts)(x)):
        want = exact[:, :got.shape[1]]
        err = (got.double() - want).abs().max().item()
        assert err <= tol * want.abs().max(), f"{gemm}: max error {err:.3g} vs {tol} x {want.abs().max():.3g}"


@pytest.mark.parametrize("type_name", PACKED_TYPES)
def test_dequantise_to_bf16_rounds_as_torch_does(type_name):
    """The bf16 GEMM's input comes straight from the C code: bit-equal to the fp32 dequantisation rounded by torch
    (nearest even), for whole tensors, row ranges and gathered rows."""
    from engine.cpu.kernels import dequant
    pk = PackedLinear.from_gguf(random_blocks(type_name, 24, 512, seed=3), type_name, 24, 512)
    full = pk.dequantize()
    assert torch.equal(dequant(pk.args(), dtype=torch.bfloat16).view(torch.int16),
                       full.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(dequant(pk.args(), row0=5, nrows=7, dtype=torch.bfloat16), full[5:12].to(torch.bfloat16))
    rows = torch.tensor([23, 0, 7, 7])
    assert torch.equal(dequant(pk.args(), rows=rows, dtype=torch.bfloat16), full[rows].to(torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        dequant(pk.args(), out=torch.empty(24, 512), dtype=torch.bfloat16)


def test_bf16_rounding_is_nearest_even_at_ties():
    """Values exactly halfway between two bf16 numbers (the case a truncating conversion gets wrong): Q8_0 blocks
    whose scale times q lands on ties, compared with torch's rounding."""
    from engine.cpu.kernels import dequant
    q = torch.tensor([[1 + 2 * i for i in range(32)]], dtype=torch.int8)          # odd q: low mantissa bits set
    d = torch.tensor([[1.0 + 2 ** -8]], dtype=torch.float16)                        # fp16 scale with bit 8 of the mantissa
    pk = PackedLinear(8, 32, q.contiguous(), d.contiguous())
    full = pk.dequantize()
    assert ((full.view(torch.int32) & 0xFFFF) == 0x8000).any(), "no exact tie among the values"
    got = dequant(pk.args(), dtype=torch.bfloat16)
    assert torch.equal(got.view(torch.int16), full.to(torch.bfloat16).view(torch.int16))
    assert not torch.equal(got.view(torch.int16), (full.view(torch.int32) >> 16).to(torch.int16)[None].view(1, 32)), \
        "no value here needed rounding: the test would not see a truncating conversion"


def test_gemm_dtype_follows_the_cpu_and_the_override(monkeypatch):
    import engine.cpu.kernels as ck
    import kernels.cpu_info as ci
    monkeypatch.delenv("MCL_GEMM_DTYPE", raising=False)
    monkeypatch.setattr(ci, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert ck.gemm_dtype() == torch.float32                                   # bf16 emulated: ~86x slower
    monkeypatch.setattr(ci, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert ck.gemm_dtype() == torch.bfloat16
    monkeypatch.setenv("MCL_GEMM_DTYPE", "fp32")
    assert ck.gemm_dtype() == torch.float32
    monkeypatch.setenv("MCL_GEMM_DTYPE", "fp16")
    with pytest.raises(ValueError, match="MCL_GEMM_DTYPE"):
        ck.gemm_dtype()


def test_unpacked_type_names_the_tensor():
    with pytest.raises(ValueError, match="blk.0.attn_q.weight: GGUF block type Q5_1 is not packed"):
        PackedLinear.from_gguf(np.zeros((4, 24), np.uint8), "Q5_1", 4, 32, name="blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="does not hold 4x64 weights"):
        PackedLinear.from_gguf(random_blocks("Q8_0", 4, 32), "Q8_0", 4, 64)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny"]).init_weights(seed=seed).eval()


def test_packed_model_with_mixed_adapters_matches_fp32():
    """pack_dense_model (Q8_0 re-quantisation, fused QKV and gate/up, packed embeddings and head, no fp32 weights
    left) + four adapters in a decode-sized batch mixing adapters and base rows: each row close to the fp32 model
    with the same adapter, and the adapters change the output by much more than the packing does."""
    model = _tiny()
    add_adapters(model, ["retriever", "planner", "coder", "debugger"], rank=8, alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tokens = torch.randint(0, model.cfg.vocab_size, (6, 1), generator=g)
    ids, one = torch.tensor([0, 1, 2, 3, -1, 2]), torch.full((6,), 1)
    with torch.inference_mode():
        ref, ref_one, base = model(tokens, adapter_ids=ids), model(tokens, adapter_ids=one), model(tokens)
    pack_dense_model(model)
    assert isinstance(model.model.embed_tokens, PackedEmbedding) and model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.pack_stats["fused"] == 2 * model.cfg.n_layers
    with torch.inference_mode():
        got, got_one = model(tokens, adapter_ids=ids), model(tokens, adapter_ids=one)
    for r, o in ((ref, got), (ref_one, got_one)):
        assert (r - base).abs().max() > 10 * (o - r).abs().max()
        assert (o - r).abs().max() / r.abs().max() < 2e-2
    with pytest.raises(RuntimeError, match="loaded for inference"):
        model(tokens)                                                     # grad enabled: a clear error


def test_bf16_mode_close_to_fp32_and_training_ignores_it():
    model = _tiny()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(tokens)
        stats = pack_model_bf16(model)
        got = model(tokens)
    assert stats["packed"]["bf16"] == 7 * model.cfg.n_layers + 1
    assert not torch.equal(got, ref) and (got - ref).abs().max() / ref.abs().max() < 2e-2
    with torch.enable_grad():
        assert torch.equal(model(tokens), ref)


def _write_tiny_gguf(path, types, seed=0):
    """tests/test_weights.py's tiny llama (hidden 256: K-quant blocks fit) as a GGUF with a byte-level vocabulary."""
    from test_weights import hf_cfg, tiny_byte_vocab, tiny_hf, write_gguf
    hf = tiny_hf("llama", tie=False, seed=seed)
    tokens, ttypes, merges = tiny_byte_vocab()
    pad = 512 - len(tokens)
    write_gguf(path, "llama", hf.state_dict(), hf_cfg(hf).replace(vocab_size=512), types=types, tokenizer={
        "add_tokenizer_model": "gpt2", "add_tokenizer_pre": "smollm", "add_token_list": tokens + [f"[P{i}]" for i in range(pad)],
        "add_token_types": ttypes + [5] * pad, "add_token_merges": merges, "add_eos_token_id": 2})


def test_gguf_loads_straight_into_packed_layout(tmp_path):
    """A llama GGUF (permuted Q/K) with every packed type among its projections: the q4 load equals the fp32 load's
    model (its dequantised weights) up to the int8 activation rounding, and holds no fp32 projection weight."""
    from engine.loading.hub import load_model
    Q = gguf.GGMLQuantizationType
    kinds = {"q_proj": Q.Q4_K, "k_proj": Q.Q4_1, "v_proj": Q.Q8_0, "o_proj": Q.Q5_0, "gate_proj": Q.Q4_0,
             "up_proj": Q.Q4_K, "down_proj": Q.Q6_K}
    from test_weights import tiny_hf
    tiny = tiny_hf("llama", tie=False)
    types = {k: kinds[k.split(".")[-2]] for k in tiny.state_dict() if k.split(".")[-2] in kinds}
    types["model.embed_tokens.weight"] = Q.Q8_0
    types["lm_head.weight"] = Q.Q4_0
    _write_tiny_gguf(tmp_path / "m.gguf", types)
    fp32, _ = load_model(tmp_path / "m.gguf", device="cpu")
    q4, _ = load_model(tmp_path / "m.gguf", device="cpu", weights="q4")
    assert all(p.is_meta for n, p in q4.named_parameters() if n.endswith("proj.weight"))
    n = q4.cfg.n_layers
    assert q4.pack_stats["packed"] == {"Q4_K": 2 * n, "Q4_1": n, "Q8_0": n + 1, "Q5_0": n, "Q4_0": n + 1, "Q6_K": n}
    ref = fp32.state_dict()
    for name, mod in q4.named_modules():                                 # weights bit for bit, Q/K un-permuted
        if getattr(mod, "packed", None) is not None:
            assert torch.equal(mod.packed.dequantize(), ref[f"{name}.weight"]), name
    emb = q4.model.embed_tokens.rows
    assert torch.equal(emb.dequantize(), ref["model.embed_tokens.weight"])
    assert torch.equal(q4.lm_head.packed.dequantize(), ref["lm_head.weight"])
    tokens = torch.randint(0, q4.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    tokens[1, 3] = tokens[0, 5]                                          # a repeated token
    assert isinstance(emb, FileRows)                                     # untied: rows read from the file's map
    assert torch.equal(emb.embed(tokens), ref["model.embed_tokens.weight"][tokens])
    with pytest.raises(IndexError, match=r"m.gguf: tensor token_embd.weight: row index out of range"):
        emb.embed(torch.tensor([[q4.cfg.vocab_size]]))
    with torch.inference_mode():                                         # logits: int8 activation rounding only
        a, b = fp32(tokens), q4(tokens)
    assert (a - b).abs().max() / a.abs().max() < 0.1, f"relative {((a - b).abs().max() / a.abs().max()):.3e}"


def test_gguf_with_an_unpacked_type_fails_by_name_unless_fallback(tmp_path):
    from engine.loading.hub import load_model
    from test_weights import tiny_hf
    Q = gguf.GGMLQuantizationType
    tiny = tiny_hf("llama", tie=False)
    types = {k: Q.Q8_0 for k, v in tiny.state_dict().items() if v.dim() == 2}
    types["model.layers.1.mlp.up_proj.weight"] = Q.Q5_1
    _write_tiny_gguf(tmp_path / "m.gguf", types)
    with pytest.raises(ValueError, match="tensor blk.1.ffn_up.weight has GGUF type Q5_1"):
        load_model(tmp_path / "m.gguf", device="cpu", weights="q4")
    model, _ = load_model(tmp_path / "m.gguf", device="cpu", weights="q4", dense_fallback=True)
    assert model.pack_stats["packed"]["dense(Q5_1)"] == 1


def _teacher_forced_decode(model, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """Logits for positions n_prompt-1 .. end-1: the prompt prefilled at once, then one token per call (decode)."""
    from engine.kv_cache import KVCache
    cache = KVCache(model.cfg, 1, len(tokens))
    x = torch.tensor([tokens])
    out = [model(x[:, :n_prompt], input_pos=torch.arange(n_prompt)[None], kv_cache=cache)[0, -1]]
    for p in range(n_prompt, len(tokens) - 1):
        out.append(model(x[:, p:p + 1], input_pos=torch.tensor([[p]]), kv_cache=cache)[0, -1])
    return torch.stack(out)


@pytest.mark.slow
def test_smollm2_q4_packs_every_projection_and_agrees_with_fp32():
    """The real GGUF: 210 Q4_1 projections and the Q8_0 embedding (tied head) packed. Teacher-forced on the fp32
    model's greedy continuation, the q4 model's top-1 agrees on nearly every position (bench/quality.py measures
    4 prompts x 256 tokens per model)."""
    from engine.loading.hub import load_model
    from engine.serving.generate import generate
    fp32, tok = load_model("smollm2-135m", device="cpu")
    q4, _ = load_model("smollm2-135m", device="cpu", weights="q4")
    assert q4.pack_stats["packed"] == {"Q4_1": 210, "Q8_0": 1} and q4.lm_head.packed is q4.model.embed_tokens.rows
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that checks whether a "
                                       "number is prime, then explain it."}], add_generation_prompt=True)
    with torch.inference_mode():
        seq = prompt + generate(fp32, [prompt], 48, ignore_eos=True)[0].token_ids
        want = fp32(torch.tensor([seq]))[0, len(prompt) - 1:-1].argmax(-1)
        decode = _teacher_forced_decode(q4, seq, len(prompt)).argmax(-1)
    agree = (decode == want).float().mean().item()
    assert agree >= 0.9, f"top-1 agreement {agree:.2f}"


def test_q4_load_imports_no_compiler_stack():
    """Loading and running a q4 model pulls in neither torch._dynamo nor triton (torch's meta-device init would:
    ~60 MB resident and ~0.5 s for nothing; engine.model.on_meta). A fresh process, as a user's would be."""
    import subprocess
    import sys
    code = ("import sys, torch; from engine.loading.hub import load_model; from engine.serving.generate import generate\n"
            "m, tok = load_model('smollm2-135m', device='cpu', weights='q4')\n"
            "generate(m, [tok.encode('def f(x):')], 4)\n"
            "print(sorted(k for k in ('torch._dynamo', 'triton') if k in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_fusion_holds_the_weights_once():
    """After fuse_layer, q/k/v and gate/up packed copies are views of the fused copy's rows (memory held once)."""
    model = _tiny()
    pack_dense_model(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for parts, fused in (((attn.q_proj, attn.k_proj, attn.v_proj), attn.qkv_packed), ((mlp.gate_proj, mlp.up_proj),
                                                                                        mlp.gate_up_packed)):
        assert all(p.packed.w.untyped_storage().data_ptr() == fused.w.untyped_storage().data_ptr() for p in parts)
        x = torch.randn(2, parts[0].in_features)
        assert torch.equal(torch.cat([p.packed(x) for p in parts], -1), fused(x))


@pytest.mark.parametrize("adapters", [False, True])
def test_decode_kernel_equals_eager_path(adapters, isa):
    """engine/cpu/cpu_ops.c's decode step (one decode_layer call per layer: RMSNorm, fused QKV, RoPE, KV-cache write,
    grouped-query attention, o_proj, SwiGLU, residuals, and with adapters each row's own LoRA delta) against the eager
    torch path it replaces, with each ISA variant of the projections: three rows at different positions in scattered
    cache slots, several greedy steps, rows on different adapters and one on the base; the same logits and cache
    contents to fp32 rounding."""
    from engine.kv_cache import KVCache
    from engine.lora import LoRABatch
    model = _tiny()
    if adapters:
        add_adapters(model, ["a", "b"], rank=8, alpha=16)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    model = pack_dense_model(model)
    cfg = model.cfg
    assert cfg.n_kv_heads < cfg.n_heads                                   # GQA exercised
    g = torch.Generator().manual_seed(0)
    slots, lens = torch.tensor([4, 0, 2]), [3, 7, 5]
    ids = torch.tensor([1, -1, 0]) if adapters else None
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    outs, caches = {}, {}
    for on in (True, False):
        set_decode_kernel(model, on)
        cache = caches[on] = KVCache(cfg, 5, 32)
        steps = []
        with torch.inference_mode():
            for i, (s, p) in enumerate(zip(slots, prompts)):
                model(p[None], None if ids is None else ids[i:i + 1], input_pos=torch.arange(len(p))[None],
                      kv_cache=cache, cache_slots=s[None])
            pos, tok = torch.tensor(lens), torch.tensor([[1], [2], [3]])
            for _ in range(4):
                logits = model(tok, ids, input_pos=pos[:, None], kv_cache=cache, cache_slots=slots)
                steps.append(logits)
                tok, pos = logits.argmax(-1), pos + 1
        outs[on] = torch.stack(steps)
        if on:                                                            # the one-call path was taken
            assert model.model.steps is not None and model.model.steps.layers is not None
    assert (outs[True] - outs[False]).abs().max() <= 1e-4 * outs[False].abs().max()
    for a, b in ((caches[True].k, caches[False].k), (caches[True].v, caches[False].v)):   # the C RMSNorm rounds
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()                                # differently: close
    if adapters:                                                          # the adapters matter at this tolerance
        set_decode_kernel(model, True)
        with torch.inference_mode():
            cache = KVCache(cfg, 5, 32)
            for s, p in zip(slots, prompts):
                model(p[None], input_pos=torch.arange(len(p))[None], kv_cache=cache, cache_slots=s[None])
            base = model(torch.tensor([[1], [2], [3]]), input_pos=torch.tensor(lens)[:, None], kv_cache=cache,
                         cache_slots=slots)
        assert (base[0] - outs[True][0][0]).abs().max() > 100 * (outs[True] - outs[False]).abs().max()


def test_swiglu_equals_torch_to_a_few_ulp():
    """decode_layer's SwiGLU (a vector exp, 8 lanes, glibc's expf for the last I % 8) against silu(g) * u in float64,
    over gates from -100 to 100 (the exp's clamps at both ends) in rows of a width that leaves a tail: within 2 fp32
    ulps (torch's own fp32 silu: 2.5e-7 here)."""
    from engine.cpu.kernels import swiglu
    g = torch.cat([torch.linspace(-100, 100, 4001), torch.randn(4001) * 4]).view(2, -1)   # I = 4001: 500 x 8 + 1
    u = torch.randn_like(g)
    want = (torch.nn.functional.silu(g.double()) * u.double())
    got = swiglu(torch.cat([g, u], -1)).double()
    rel = (got - want).abs() / want.abs().clamp_min(1e-20)      # gates below -88: ~1e-37 for ~1e-42 (the clamp)
    assert rel.max() < 2.5e-7, f"max relative error {rel.max():.2e} at gate {g.flatten()[rel.argmax()]:.3f}"
    assert torch.equal(got.float(), swiglu(torch.cat([g, u], -1), nt=1))            # threads split rows, not sums


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_equals_torch_over_long_contexts(threads, monkeypatch):
    """decode_attention (a vector exp in the softmax) against RoPE and softmax attention in float64, two rows at 300
    and 1,000 keys (exp8's 8-wide loop and its tail), 6 query heads on 2 KV: on 1 thread the 4 (row, KV head) groups
    are enough work items, each reading its keys once for 6 heads; on 2 threads each head is an item."""
    from engine.cpu.kernels import decode_attention
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(0)
    B, nh, nkv, hd, L = 2, 6, 2, 64, 1024
    q, k, v = (torch.randn(B, n * hd, generator=g) for n in (nh, nkv, nkv))
    kc, vc = (torch.randn(3, nkv, L, hd, generator=g) for _ in range(2))
    slots, pos = torch.tensor([2, 0]), torch.tensor([299, 999])
    ang = pos[:, None].double() / 10000 ** (torch.arange(0, hd, 2).double() / hd)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    kc0, vc0 = kc.clone().double(), vc.clone().double()
    out = decode_attention(q, k, v, cos, sin, kc, vc, slots, pos).double()

    def rope(x, c, s):                                                     # rotate-half, x (..., hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * c + torch.cat([-x2, x1], -1) * s
    for b in range(B):
        c, s, p = cos[b].double(), sin[b].double(), int(pos[b])
        kb = rope(k[b].double().view(nkv, hd), c, s)
        kc0[slots[b], :, p], vc0[slots[b], :, p] = kb, v[b].double().view(nkv, hd)
        assert torch.allclose(kc[slots[b], :, p].double(), kb, atol=1e-5) and torch.equal(vc[slots[b], :, p], v[b].view(nkv, hd))
        qb = rope(q[b].double().view(nh, hd), c, s)
        keys = kc0[slots[b], :, : p + 1].repeat_interleave(nh // nkv, 0)  # (nh, p + 1, hd)
        att = torch.softmax(torch.einsum("hd,hkd->hk", qb, keys) / hd ** 0.5, -1)
        want = torch.einsum("hk,hkd->hd", att, vc0[slots[b], :, : p + 1].repeat_interleave(nh // nkv, 0))
        assert (out[b].view(nh, hd) - want).abs().max() <= 1e-5 * want.abs().max(), b


def test_lora_apply_equals_multi_lora_torch():
    """engine/cpu/cpu_ops.c's decode-time adapter delta against kernels.multi_lora.multi_lora_torch: 16 rows over four
    rank-32 adapters (one padded from rank 16) and base rows, added in place into a column slice of a fused output."""
    from engine.cpu.kernels import lora_apply
    from kernels.multi_lora import make_segments, multi_lora_torch
    g = torch.Generator().manual_seed(0)
    T, n_in, n_out, N, R = 16, 96, 80, 4, 32
    x = torch.randn(T, n_in, generator=g)
    A, B = torch.randn(N, R, n_in, generator=g), torch.randn(N, n_out, R, generator=g)
    A[2, 16:] = 0
    B[2, :, 16:] = 0
    scales = torch.tensor([0.5, 1.0, 2.0, 0.25])
    ids = torch.tensor([0, 1, 2, 3, -1, 2, 2, 0, 1, -1, 3, 3, 0, 1, 2, 3])
    fused = torch.randn(T, n_out + 8, generator=g)
    base = fused[:, 8:].clone()
    want = multi_lora_torch(x, torch.empty(n_out, n_in), None, A, B, scales, make_segments(ids, N), base_out=base)
    lora_apply(x, fused[:, 8:], A, B, scales, ids)
    assert (fused[:, 8:] - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(fused[ids < 0, 8:], base[ids < 0])                  # base rows untouched


def test_adapter_delta_the_c_kernel_cannot_take_goes_to_torch():
    """add_lora_delta on a packed projection: rank 32 goes through lora_apply, rank 20 (not a multiple of 8) through
    multi_lora_torch; both equal the reference. The shapes lora_apply takes are one predicate, lora_apply_fits."""
    from engine.cpu.kernels import lora_apply_fits
    from engine.cpu.modules import add_lora_delta
    from engine.lora import LoRABatch, LoRALinear
    from kernels.multi_lora import make_segments, multi_lora_torch
    g = torch.Generator().manual_seed(1)
    for R in (32, 20):
        proj = LoRALinear(64, 48)
        proj.lora_A = torch.nn.Parameter(torch.randn(2, R, 64, generator=g) * 0.1, requires_grad=False)
        proj.lora_B = torch.nn.Parameter(torch.randn(2, 48, R, generator=g) * 0.1, requires_grad=False)
        proj.lora_scale = torch.tensor([0.5, 2.0])
        x, ids = torch.randn(3, 64, generator=g), torch.tensor([1, -1, 0])
        y = torch.randn(3, 48, generator=g)
        want = multi_lora_torch(x, torch.empty(48, 64), None, proj.lora_A, proj.lora_B, proj.lora_scale,
                                make_segments(ids, 2), base_out=y.clone())
        got = add_lora_delta(proj, x, y.clone(), LoRABatch(make_segments(ids, 2)))
        assert lora_apply_fits(R, 64, 3) == (R == 32)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), R


def test_bad_input_to_the_c_kernels_is_refused_by_name():
    """A token id outside the packed embedding, activations of the wrong width, an adapter stack the decode kernel
    cannot take: one-line errors, nothing written."""
    from engine.cpu.kernels import lora_apply
    pk = PackedLinear.from_gguf(random_blocks("Q8_0", 8, 64), "Q8_0", 8, 64)
    with pytest.raises(IndexError, match="row index out of range for 8 rows"):
        pk.embed(torch.tensor([[3, 8]]))
    with pytest.raises(ValueError, match="x has 32 columns, the weight 64"):
        pk(torch.randn(2, 32))
    y = torch.zeros(2, 8)
    with pytest.raises(ValueError, match=r"rank 12 \(<= 256, a multiple of 8\)"):
        lora_apply(torch.randn(2, 64), y, torch.randn(1, 12, 64), torch.randn(1, 8, 12), torch.ones(1),
                   torch.tensor([0, 0]))
    assert not y.any()
