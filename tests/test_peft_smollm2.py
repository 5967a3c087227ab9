"""PEFT interop on the real SmolLM2-135M, both ways: adapters we save load in peft on transformers' model of the
same GGUF and give the same logits (fp32, max difference <= 1e-5 of the largest logit), and adapters peft saves load in our engine likewise.

    python -m pytest tests/test_peft_smollm2.py -q
"""
import pytest
import torch

from engine.loading.hub import load_model, model_path
from engine.lora import ALL_TARGETS, add_adapters, adapter_id, load_adapters, save_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_base():
    p = model_path("smollm2-135m")
    return transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()


def randomise(named_params, seed, std=0.02):
    g = torch.Generator().manual_seed(seed)
    for n, p in named_params:
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)


TOKENS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def test_ours_to_peft_and_back(tmp_path):
    ours, _ = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    add_adapters(ours, ["planner", "coder"], rank={"planner": 8, "coder": 32}, alpha=16, targets=ALL_TARGETS)
    randomise(ours.named_parameters(), seed=1)
    for layer in (m for m in ours.modules() if getattr(m, "lora_A", None) is not None):
        layer.lora_A.data[0, 8:] = 0                       # planner is rank 8: keep its padding zero
        layer.lora_B.data[0, :, 8:] = 0
    hf = hf_base()
    for name in ("planner", "coder"):
        save_peft(ours, name, tmp_path / name, base_model="smollm2-135m")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / name)).eval()
        with torch.no_grad():
            a = ours(TOKENS, adapter_ids=torch.full((2,), adapter_id(ours, name)))
            b = pm(TOKENS).logits
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert diff <= 1e-5 * scale, f"{name}: max |ours - peft| = {diff:.3g} (max |logit| {scale:.3g})"
        hf = pm.unload()                                   # the base model again, for the next adapter


def test_peft_to_ours(tmp_path):
    hf = hf_base()
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    randomise(pm.named_parameters(), seed=2)
    pm.save_pretrained(str(tmp_path / "debugger"))
    ours, _ = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    assert load_adapters(ours, tmp_path) == ["debugger"]
    with torch.no_grad():
        a = ours(TOKENS, adapter_ids=torch.zeros(2, dtype=torch.long))
        b = pm.eval()(TOKENS).logits
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= 1e-5 * scale, f"max |ours - peft| = {diff:.3g} (max |logit| {scale:.3g})"
