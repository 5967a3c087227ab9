"""Multi-adapter LoRA in the model: a batch mixing four adapters equals each sequence run alone with its
adapter; PEFT interop both ways (our save -> peft loads; peft saves -> we load) with equal logits; merge;
bad adapter files give clear errors.

    python -m pytest tests/test_lora_model.py -q
"""
import json

import pytest
import torch

from engine.config import PRESETS
from engine.lora import (ALL_TARGETS, add_adapters, adapter_id, load_adapters, load_peft, merge_adapter,
                         save_peft)
from engine.model import Transformer

ROLES = ["retriever", "planner", "coder", "debugger"]
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def randomise(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)
    # keep the zero padding of lower-rank adapters zero, as training does
    for m in model.modules():
        if getattr(m, "lora_A", None) is not None:
            for i, r in enumerate(m.ranks):
                m.lora_A.data[i, r:] = 0
                m.lora_B.data[i, :, r:] = 0


def tiny_model(arch="qwen2", seed=1):
    cfg = PRESETS["tiny"].replace(arch=arch, qkv_bias=arch == "qwen2", tie_embeddings=arch == "qwen2")
    return Transformer(cfg).init_weights(seed=seed).eval()


def base_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" not in k}


def hf_twin(model):
    cfg = model.cfg
    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("model_type", "architectures")}
    hf_cfg = (transformers.LlamaConfig if cfg.arch == "llama" else transformers.Qwen2Config)(**d)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    hf.load_state_dict(base_state(model), strict=False)
    return hf.eval()


def test_mixed_batch_equals_each_alone():
    m = tiny_model()
    add_adapters(m, ROLES, rank={"retriever": 8, "planner": 16, "coder": 32, "debugger": 64}, alpha=16)
    randomise(m)
    tokens = torch.randint(0, 256, (6, 13), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([2, 0, -1, 3, 1, 2])
    with torch.no_grad():
        mixed = m(tokens, adapter_ids=ids)
        for b in range(6):
            alone = m(tokens[b:b + 1], adapter_ids=ids[b:b + 1])
            torch.testing.assert_close(mixed[b:b + 1], alone, rtol=1e-5, atol=1e-5)
        base = m(tokens)
    assert not torch.allclose(mixed[0], base[0], atol=1e-3), "adapter had no effect"
    torch.testing.assert_close(mixed[2], base[2], rtol=1e-5, atol=1e-5)      # id -1 = base only


def test_per_token_ids_equal_per_sequence_ids():
    m = tiny_model()
    add_adapters(m, ROLES, rank=8)
    randomise(m, seed=3)
    tokens = torch.randint(0, 256, (3, 7))
    ids = torch.tensor([1, 3, -1])
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, adapter_ids=ids), m(tokens, adapter_ids=ids[:, None].expand(3, 7)))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_ours_to_peft(tmp_path, arch):
    m = tiny_model(arch)
    add_adapters(m, ["planner", "coder"], rank={"planner": 4, "coder": 8}, alpha={"planner": 8, "coder": 32},
                 targets=ALL_TARGETS)
    randomise(m, seed=4)
    tokens = torch.randint(0, 256, (2, 11))
    for name in ("planner", "coder"):
        save_peft(m, name, tmp_path / name, base_model="tiny")
        pm = peft.PeftModel.from_pretrained(hf_twin(m), str(tmp_path / name)).eval()
        with torch.no_grad():
            ours = m(tokens, adapter_ids=torch.full((2,), adapter_id(m, name)))
            theirs = pm(tokens).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-4, f"{name}: max |ours - peft| = {diff:.3g}"


def test_peft_to_ours(tmp_path):
    m = tiny_model()
    hf = hf_twin(m)
    cfg = peft.LoraConfig(r=16, lora_alpha=24, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(5)
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path / "debugger"))
    names = load_adapters(m, tmp_path)
    assert names == ["debugger"]
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        theirs = pm.eval()(tokens).logits
        ours = m(tokens, adapter_ids=torch.zeros(2, dtype=torch.long))
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |ours - peft| = {diff:.3g}"


def test_merge_equals_adapter():
    m = tiny_model()
    add_adapters(m, ["coder"], rank=8)
    randomise(m, seed=6)
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        with_adapter = m(tokens, adapter_ids=torch.zeros(2, dtype=torch.long))
        merge_adapter(m, "coder")
        merged = m(tokens)
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)


def test_save_is_unpadded_and_round_trips(tmp_path):
    m = tiny_model()
    add_adapters(m, ["a", "b"], rank={"a": 4, "b": 16})
    randomise(m, seed=7)
    save_peft(m, "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    m2 = tiny_model()
    load_peft(m2, tmp_path / "a")
    tokens = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(m2(tokens, adapter_ids=torch.tensor([0])), m(tokens, adapter_ids=torch.tensor([0])))
    assert not list(tmp_path.glob("a/.*tmp"))


def test_bad_adapter_files(tmp_path):
    m = tiny_model()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_peft(m, tmp_path / "nothing")
    d = tmp_path / "broken"
    d.mkdir()
    (d / "adapter_config.json").write_text('{"r": 4,\n "lora_alpha": }')
    (d / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_config.json:2: invalid JSON"):
        load_peft(m, d)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="adapter_model.safetensors: cannot read safetensors"):
        load_peft(m, d)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        adapter_id(m, "nope")


def test_training_through_kernel_matches_reference():
    """Loss and adapter gradients through the Triton kernels (interpreted on CPU) equal the torch path."""
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    cfg = PRESETS["tiny"].replace(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, intermediate_size=48, vocab_size=64)
    grads, losses = {}, {}
    for backend in ("torch", "triton"):
        m = Transformer(cfg).init_weights(seed=8)
        add_adapters(m, ROLES, rank={"retriever": 4, "planner": 8, "coder": 4, "debugger": 16})
        randomise(m, seed=9, std=0.1)
        m.lora_backend = backend
        tokens = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(1))
        logits = m(tokens[:, :-1], adapter_ids=torch.tensor([3, 0, 2, 1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert abs(losses["torch"] - losses["triton"]) < 1e-5
    for n, g in grads["torch"].items():
        rel = ((grads["triton"][n] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, f"{n}: relative gradient difference {rel:.3g}"
