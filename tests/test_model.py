"""Decoder parity with transformers on tiny random Llama and Qwen2 configs (fp32, max abs diff <= 1e-4).

    python -m pytest tests/test_model.py -q
"""
import pytest
import torch

from engine.config import PRESETS, ModelConfig
from engine.model import Transformer

transformers = pytest.importorskip("transformers")


def tiny(arch: str, tied: bool) -> ModelConfig:
    return PRESETS["tiny"].replace(arch=arch, qkv_bias=arch == "qwen2", tie_embeddings=tied)


def hf_twin(cfg: ModelConfig, ours: Transformer):
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")}
    hf_cfg = (transformers.LlamaConfig if cfg.arch == "llama" else transformers.Qwen2Config)(**d)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)])
def test_logits_match_transformers(arch, tied):
    cfg = tiny(arch, tied)
    ours = Transformer(cfg).init_weights(seed=1).eval()
    hf = hf_twin(cfg, ours)
    tokens = torch.randint(0, cfg.vocab_size, (3, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    diff = (a - b).abs().max().item()
    assert diff <= 1e-4, f"{arch} tied={tied}: max |ours - transformers| = {diff:.3g}"


def test_bf16_forward_close_to_fp32():
    cfg = tiny("qwen2", True)
    m = Transformer(cfg).init_weights(seed=2).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = m(tokens)
        out = m.to(torch.bfloat16)(tokens).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.float32 and rel < 3e-2, f"bf16 relative error {rel:.3g}"


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="config.json: unknown architecture model_type='gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2"}, source="config.json")
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        ModelConfig.from_hf_dict({"model_type": "llama", "num_attention_heads": 4, "vocab_size": 8})
