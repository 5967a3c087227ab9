"""engine/loading/weights.py: HF directories (single + sharded), GGUF (permuted Q/K, every supported quantisation), the
`mcl convert` round trip through transformers, and one-line errors for bad inputs.

    python -m pytest tests/test_weights.py -x -q

Independent references: transformers writes the HF directories (save_pretrained, sharded too) and reads our GGUF
files (from_pretrained(gguf_file=...)) and our converted directories; the llama.cpp Q/K permutation is
re-implemented here from its definition. The real SmolLM2 GGUF comparison lives in test_parity_gguf.py.
"""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.loading.weights import convert_gguf, expected_keys, load_gguf, load_hf_dir

Q = gguf.GGMLQuantizationType
transformers = pytest.importorskip("transformers")


def tiny_hf(arch: str, tie: bool, seed: int = 0):
    """A random transformers model of the Llama or Qwen2 family, shapes that allow 256-element K-quant blocks."""
    torch.manual_seed(seed)
    common = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tie)
    if arch == "llama":
        cfg = transformers.LlamaConfig(rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_theta=1e6, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():                       # give norms and biases non-trivial values too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# HF directories
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tie,shard", [("llama", False, None), ("llama", True, "300KB"), ("qwen2", True, "300KB"),
                                            ("qwen2", False, None)])
def test_hf_dir_roundtrip(tmp_path, arch, tie, shard):
    model = tiny_hf(arch, tie)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, safe_serialization=True, **kw)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file(), "expected transformers to shard"
    cfg, sd = load_hf_dir(tmp_path)
    assert cfg.arch == arch and cfg.tie_embeddings == tie and cfg.n_kv_heads == 2 and cfg.qkv_bias == (arch == "qwen2")
    ref = model.state_dict()
    assert set(sd) == set(expected_keys(cfg))
    for k, v in sd.items():
        assert torch.equal(v, ref[k]), k
    _, sd16 = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in sd16.values())


def test_hf_dir_logits_match_transformers(tmp_path):
    """Our decoder on load_hf_dir's state dict gives transformers' logits."""
    from engine.model import Transformer
    model = tiny_hf("qwen2", tie=False, seed=1)
    model.save_pretrained(tmp_path)
    cfg, sd = load_hf_dir(tmp_path)
    ours = Transformer(cfg)
    ours.load_state_dict(sd)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        diff = (ours(x) - model(x).logits).abs().max().item()
    assert diff < 1e-4, diff


# ---------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows [first half | second half] -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")         # model.layers.{i}.{module path}.{weight|bias}
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def random_kquant_bytes(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random K-quant blocks (gguf-py cannot quantise these): random bytes, with the f16 scale fields set to
    small finite values so no block decodes to inf/nan."""
    n_per, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // n_per, nbytes), dtype=np.uint8)
    f16_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (nbytes - 2,)}[qtype]
    for off in f16_at:
        vals = (rng.random(blocks.shape[0]) * 0.01 + 1e-3).astype(np.float16)
        blocks[:, off:off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path, arch: str, sd: dict, cfg: ModelConfig, types: dict | None = None, tokenizer: dict | None = None,
               skip: tuple = (), permute: bool | None = None, rng=None):
    """Write an HF-named state dict as a GGUF the way llama.cpp's converter does (names, metadata, Q/K permutation
    for llama). `types` maps HF names to a GGMLQuantizationType (default F32)."""
    rng = rng or np.random.default_rng(0)
    types = types or {}
    permute = arch == "llama" if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)
    for key, value in (tokenizer or {}).items():
        getattr(w, key)(value)
    written = {}
    for hf, t in sd.items():
        if hf in skip:
            continue
        a = t.float().numpy()
        if permute and ".q_proj." in hf:
            a = llama_cpp_permute(a, cfg.n_heads)
        elif permute and ".k_proj." in hf:
            a = llama_cpp_permute(a, cfg.n_kv_heads)
        qt = types.get(hf, Q.F32)
        if qt == Q.F32:
            w.add_tensor(gguf_name(hf), a)
        elif qt == Q.F16:
            w.add_tensor(gguf_name(hf), a.astype(np.float16))
        elif qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            w.add_tensor(gguf_name(hf), random_kquant_bytes(qt, *a.shape, rng), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(a, qt), raw_dtype=qt)
        written[hf] = qt
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def hf_cfg(model) -> ModelConfig:
    from engine.loading.weights import _rope_fields
    return ModelConfig.from_hf_dict(_rope_fields(model.config.to_dict(), "test"))


def same_cfg(a: ModelConfig, b: ModelConfig):
    """Equal up to rms_eps, which GGUF stores as float32."""
    assert abs(a.rms_eps - b.rms_eps) < 1e-6 * b.rms_eps and a.replace(rms_eps=b.rms_eps) == b, (a, b)


def test_gguf_llama_f32_unpermutes_exactly(tmp_path):
    """F32 GGUF written with llama.cpp's permutation -> exactly the original HF tensors."""
    model = tiny_hf("llama", tie=False)
    cfg, ref = hf_cfg(model), model.state_dict()
    write_gguf(tmp_path / "m.gguf", "llama", ref, cfg)
    got_cfg, sd, meta = load_gguf(tmp_path / "m.gguf")
    same_cfg(got_cfg, cfg)
    assert meta["general.architecture"] == "llama"
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k


def test_gguf_qwen2_tied_with_bias_not_permuted(tmp_path):
    model = tiny_hf("qwen2", tie=True)
    cfg, ref = hf_cfg(model), model.state_dict()
    ref = {k: v for k, v in ref.items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "q.gguf", "qwen2", ref, cfg)
    got_cfg, sd, _ = load_gguf(tmp_path / "q.gguf", dtype=torch.bfloat16)
    assert got_cfg.tie_embeddings and got_cfg.qkv_bias and "lm_head.weight" not in sd
    for k in ref:
        assert sd[k].dtype == torch.bfloat16
        assert torch.equal(sd[k], ref[k].to(torch.bfloat16)), k


ALL_TYPES = {  # one tensor per supported quantisation; q/k quantised so the permutation is checked through blocks
    "model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q6_K,
    "model.layers.0.self_attn.q_proj.weight": Q.Q4_K, "model.layers.0.self_attn.k_proj.weight": Q.Q5_K,
    "model.layers.0.self_attn.v_proj.weight": Q.Q4_0, "model.layers.0.self_attn.o_proj.weight": Q.Q4_1,
    "model.layers.0.mlp.gate_proj.weight": Q.Q5_0, "model.layers.0.mlp.up_proj.weight": Q.Q5_1,
    "model.layers.0.mlp.down_proj.weight": Q.Q8_0,
    "model.layers.1.self_attn.q_proj.weight": Q.Q4_0, "model.layers.1.self_attn.k_proj.weight": Q.F16,
    "model.layers.1.self_attn.v_proj.weight": Q.BF16, "model.layers.1.mlp.gate_proj.weight": Q.Q6_K,
}


def test_gguf_quantised_matches_transformers(tmp_path):
    """Every quantisation type, llama arch with permuted Q/K: our dequantised state dict equals transformers'
    GGUF loader's (a separate dequantiser) and our decoder gives its logits."""
    from engine.model import Transformer
    model = tiny_hf("llama", tie=False)
    cfg = hf_cfg(model)
    write_gguf(tmp_path / "m.gguf", "llama", model.state_dict(), cfg, types=ALL_TYPES)
    _, sd, _ = load_gguf(tmp_path / "m.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ref = hf.state_dict()
    for k in sd:
        diff = (sd[k] - ref[k].float()).abs().max().item()
        assert diff <= 1e-6 * max(1.0, ref[k].abs().max().item()), f"{k} ({ALL_TYPES.get(k, Q.F32).name}): {diff}"
    # and the quantisation round trip stays close to the original weights (blocks decoded in the right order)
    for k, qt in ALL_TYPES.items():
        if qt in (Q.Q8_0, Q.F16, Q.BF16):
            orig = model.state_dict()[k]
            err = (sd[k] - orig).abs().max().item() / orig.abs().max().item()
            assert err < 1e-2, f"{k} {qt.name}: relative error {err}"
    ours = Transformer(cfg)
    ours.load_state_dict(sd)
    x = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# mcl convert
# ---------------------------------------------------------------------------------------------------------

def tiny_byte_vocab():
    """A byte-level BPE vocabulary (all 256 byte symbols + a few merges) with ChatML special tokens."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    byte_syms = sorted(alphabet)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "d e", "de f", "Ċ Ċ"]
    tokens = specials + byte_syms + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def test_convert_roundtrip_through_transformers(tmp_path):
    """GGUF -> `convert_gguf` -> transformers AutoModelForCausalLM/AutoTokenizer load it; logits, token ids and
    chat template agree with ours."""
    from engine.loading.hub import load_model
    model = tiny_hf("llama", tie=True)
    tokens, types, merges = tiny_byte_vocab()
    cfg = hf_cfg(model).replace(vocab_size=len(tokens))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["model.embed_tokens.weight"] = torch.randn(len(tokens), cfg.dim) * 0.02
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok_meta = {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": "smollm", "add_token_list": tokens,
                "add_token_types": types, "add_token_merges": merges, "add_bos_token_id": 1, "add_eos_token_id": 2,
                "add_pad_token_id": 2, "add_add_bos_token": False, "add_chat_template": template}
    write_gguf(tmp_path / "t.gguf", "llama", sd, cfg, types={"model.layers.0.mlp.up_proj.weight": Q.Q8_0},
               tokenizer=tok_meta)
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "hf")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours, tok = load_model(tmp_path / "t.gguf", device="cpu")
    text = "def the  thin\n\n\tfoo 123 é"
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "the def"}, {"role": "assistant", "content": "in a"}]
    hf_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == list(hf_ids)
    assert hf_tok.eos_token == "<|im_end|>" and hf.config.tie_word_embeddings
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-5, rtol=1e-4)


def test_cli_convert(tmp_path, capsys):
    from engine.cli import main
    model = tiny_hf("qwen2", tie=False)
    tokens, types, merges = tiny_byte_vocab()
    cfg = hf_cfg(model).replace(vocab_size=512)
    write_gguf(tmp_path / "q.gguf", "qwen2", model.state_dict(), cfg, tokenizer={
        "add_tokenizer_model": "gpt2", "add_tokenizer_pre": "qwen2", "add_token_list": tokens + [f"[PAD{i}]" for i in range(512 - len(tokens))],
        "add_token_types": types + [5] * (512 - len(tokens)), "add_token_merges": merges, "add_eos_token_id": 2})
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "q.gguf"), str(tmp_path / "out"), "--dtype", "bfloat16"])
    assert e.value.code == 0
    sd = load_file(tmp_path / "out" / "model.safetensors")
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    cfg2, _ = load_hf_dir(tmp_path / "out")
    same_cfg(cfg2, cfg)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one line, naming the file
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_hf("llama", tie=True)
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _one_line(e, *needles):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)


def test_missing_files(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError) as e:
        load_hf_dir(tmp_path / "nope")
    _one_line(e, tmp_path / "nope" / "config.json")
    with pytest.raises(FileNotFoundError) as e:
        load_gguf(tmp_path / "nope.gguf")
    _one_line(e, tmp_path / "nope.gguf")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_hf_dir(hf_dir)
    _one_line(e, hf_dir, "model.safetensors")


def test_truncated_safetensors(hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        load_hf_dir(hf_dir)
    _one_line(e, f, "truncated")


def test_truncated_sharded_safetensors(tmp_path):
    tiny_hf("llama", tie=True).save_pretrained(tmp_path, max_shard_size="300KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError) as e:
        load_hf_dir(tmp_path)
    _one_line(e, shard, "truncated")


@pytest.mark.parametrize("cut", [10, 2000, -5000])
def test_truncated_gguf(tmp_path, cut):
    model = tiny_hf("llama", tie=True)
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "m.gguf", "llama", ref, hf_cfg(model), types={"model.embed_tokens.weight": Q.Q8_0})
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[:cut])
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "m.gguf")
    _one_line(e, tmp_path / "m.gguf", "truncated")


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "x.gguf")
    _one_line(e, tmp_path / "x.gguf", "GGUF")


def test_unknown_architecture(tmp_path, hf_dir):
    cfg_file = hf_dir / "config.json"
    d = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(d | {"model_type": "gpt2"}))
    with pytest.raises(ValueError) as e:
        load_hf_dir(hf_dir)
    _one_line(e, cfg_file, "gpt2")

    model = tiny_hf("llama", tie=True)
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "g.gguf", "gpt2", ref, hf_cfg(model))
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "g.gguf")
    _one_line(e, tmp_path / "g.gguf", "general.architecture='gpt2'")


def test_missing_tensors(tmp_path, hf_dir):
    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.down_proj.weight"], sd["model.norm.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_hf_dir(hf_dir)
    _one_line(e, f, "model.layers.1.mlp.down_proj.weight", "model.norm.weight")

    model = tiny_hf("llama", tie=True)
    ref = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "m.gguf", "llama", ref, hf_cfg(model), skip=("model.layers.0.self_attn.k_proj.weight",))
    with pytest.raises(ValueError) as e:
        load_gguf(tmp_path / "m.gguf")
    _one_line(e, tmp_path / "m.gguf", "model.layers.0.self_attn.k_proj.weight")


def test_wrong_shape(hf_dir):
    d = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(d | {"intermediate_size": 1024}))
    with pytest.raises(ValueError) as e:
        load_hf_dir(hf_dir)
    _one_line(e, hf_dir / "model.safetensors", "shape")
