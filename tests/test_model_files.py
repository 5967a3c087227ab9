"""Malformed model files: a few bytes that claim a huge model (block_count / num_hidden_layers = 10**7), tensors the
config does not expect (blk.99) or of the wrong shape. Each is one ValueError naming the file, raised from what the
file holds before anything of the claimed size is built (the q4 loader used to hang building 10**7 layers; the fp32
one died with MemoryError at 5.4 GB).

    python -m pytest tests/test_model_files.py -q
"""
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import PRESETS
from engine.loading.packed_model import load_gguf_packed
from engine.loading.weights import load_gguf, load_hf_dir
from engine.model import Transformer

CFG = PRESETS["tiny"]
HUGE = 10 ** 7


@pytest.fixture(scope="module")
def sd():
    return {k: v for k, v in Transformer(CFG).init_weights(seed=0, std=0.02).state_dict().items()}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    _, _, i, rest = hf.split(".", 3)
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{names[mod]}.{kind}"


def write_gguf(path, sd, block_count=CFG.n_layers, extra=(), shape_of=None):
    """A tiny llama GGUF: 2-D weights Q8_0, the rest F32 (no Q/K permutation: the values do not matter here)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_context_length(CFG.max_seq_len)
    w.add_embedding_length(CFG.dim)
    w.add_feed_forward_length(CFG.intermediate_size)
    w.add_head_count(CFG.n_heads)
    w.add_head_count_kv(CFG.n_kv_heads)
    w.add_layer_norm_rms_eps(CFG.rms_eps)
    tensors = {gguf_name(k): v.float().numpy() for k, v in sd.items()}
    tensors.update({name: np.zeros((CFG.dim,), np.float32) for name in extra})
    for name, a in tensors.items():
        if shape_of and name in shape_of:
            a = np.zeros(shape_of[name], np.float32)
        if a.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


LOADERS = {"fp32": lambda p: load_gguf(p), "q4": lambda p: load_gguf_packed(p)}


@pytest.mark.parametrize("mode", LOADERS)
def test_a_good_tiny_gguf_loads(tmp_path, sd, mode):
    LOADERS[mode](write_gguf(tmp_path / "m.gguf", sd))


@pytest.mark.parametrize("mode", LOADERS)
def test_block_count_beyond_the_tensors_is_refused_at_once(tmp_path, sd, mode):
    path = write_gguf(tmp_path / "m.gguf", sd, block_count=HUGE)
    with pytest.raises(ValueError) as e:
        LOADERS[mode](path)
    msg = str(e.value)
    assert str(path) in msg and "llama.block_count = 10000000" in msg and "layers 0..1" in msg and "\n" not in msg


@pytest.mark.parametrize("mode", LOADERS)
@pytest.mark.parametrize("case,needle", [
    ("extra layer", "layer indices (0, 1, 99)"),
    ("wrong shape", "tensor model.layers.1.mlp.up_proj.weight has shape (64, 128)"),
])
def test_tensors_the_config_does_not_expect(tmp_path, sd, mode, case, needle):
    kw = {"extra": ["blk.99.attn_norm.weight"]} if case == "extra layer" else \
        {"shape_of": {"blk.1.ffn_up.weight": (64, 128)}}
    path = write_gguf(tmp_path / "m.gguf", sd, **kw)
    with pytest.raises(ValueError) as e:
        LOADERS[mode](path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_num_hidden_layers_beyond_the_tensors_is_refused(tmp_path, sd):
    d = tmp_path / "hf"
    d.mkdir()
    cfg = CFG.to_hf_dict() | {"num_hidden_layers": HUGE}
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_hf_dir(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "num_hidden_layers = 10000000" in msg and "config.json" in msg, msg


# --- loaders: one line naming the file, never a traceback -------------------------------------------------------

@pytest.mark.parametrize("merges,needle", [
    (["a"], "merges'[0] = 'a'"), ([5], "merges'[0] = 5"), (["a b", "x y"], "merges'[1] = 'x y'"), ("a b", "= str"),
])
def test_malformed_gguf_merges(merges, needle):
    from engine.loading.tokenizer import Tokenizer
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": merges}
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(meta, source="m.gguf")
    assert str(e.value).startswith("m.gguf: metadata key 'tokenizer.ggml.merges") and needle in str(e.value), e.value


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["adapter_config.json", "config.json", "tokenizer_config.json"])
def test_json_nested_100k_deep_is_one_line_naming_the_file(tmp_path, sd, name):
    from engine.loading.tokenizer import Tokenizer
    from engine.lora import read_peft_config
    sys_path = tmp_path / name
    sys_path.write_text(DEEP)
    with pytest.raises(ValueError) as e:
        if name == "adapter_config.json":
            save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
            read_peft_config(tmp_path)
        elif name == "config.json":
            load_hf_dir(tmp_path)
        else:
            sys.path.insert(0, str(Path(__file__).parent / "train"))
            from tiny_setup import byte_tokenizer
            byte_tokenizer().save(tmp_path / "tok")
            (tmp_path / "tok" / "tokenizer_config.json").write_text(DEEP)
            Tokenizer.from_file(tmp_path / "tok" / "tokenizer.json")
    assert name in str(e.value) and "\n" not in str(e.value), e.value


def test_gguf_metadata_nested_100k_deep_or_of_the_wrong_type(tmp_path, sd):
    import struct
    from engine.loading.gguf_header import read_header
    key = b"deep"
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 9)
    body += struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)
    (tmp_path / "deep.gguf").write_bytes(body)
    with pytest.raises(ValueError, match="deep.gguf: metadata arrays nested deeper"):
        read_header(tmp_path / "deep.gguf")
    path = tmp_path / "m.gguf"
    write_gguf(path, sd)
    from engine.loading.weights import gguf_config
    meta = read_header(path).meta | {"llama.block_count": "two"}
    with pytest.raises(ValueError, match="m.gguf: metadata key 'llama.block_count' = 'two': expected a number"):
        gguf_config(meta, 256, True, str(path))
