"""Weights on disk -> (ModelConfig, state dict in Hugging Face naming), and the `mcl convert` command.

    from engine.loading.weights import load_hf_dir, load_gguf
    cfg, sd = load_hf_dir("path/to/hf_dir")                 # config.json + model.safetensors (or sharded + index)
    cfg, sd, meta = load_gguf("model.gguf")                  # dequantised to float32 through the `gguf` package
    model = Transformer(cfg); model.load_state_dict(sd)      # keys: model.layers.0.self_attn.q_proj.weight, ...

    mcl convert model.gguf out_dir/                          # GGUF -> an HF directory transformers can load

State dict keys are Hugging Face's (model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
model.norm.weight, lm_head.weight). lm_head.weight is absent when the embeddings are tied.

GGUF notes (llama.cpp's conventions, undone here):
  - shapes are stored innermost-first: GGUF [in, out] is torch [out, in]. `gguf` gives arrays in numpy (row-major)
    order already, so we only check against the reversed GGUF shape.
  - llama-architecture files store q_proj/k_proj rows permuted so that each head's two rotary halves are
    interleaved (llama.cpp rotates adjacent pairs; HF rotates halves). `_unpermute` reverses it. qwen2 files are
    written without that permutation (llama.cpp runs qwen2 in "NEOX" rope mode), so they are left as they are.
  - no `output.weight` tensor means the LM head is tied to `token_embd.weight`.
Errors are one line naming the file: missing file, truncated file, unknown architecture, missing tensors, a
config.json field of the wrong type or an impossible shape (by its config.json key: ModelConfig.from_hf_dict), a
directory given as a GGUF. `mcl convert` refuses an existing, non-empty output before it reads the GGUF, and writes
into a temp directory renamed into place, so a failed conversion leaves nothing.
"""
from __future__ import annotations

import json
import numbers
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from engine.config import ModelConfig
from engine.errors import read_json

# ----------------------------------------------------------------------------------------------------------
# Hugging Face directories
# ----------------------------------------------------------------------------------------------------------


def expected_keys(cfg: ModelConfig) -> list[str]:
    """Every tensor name the decoder needs for `cfg`, in HF naming."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        if cfg.qkv_bias:
            keys += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return keys


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> torch shape for every key of `expected_keys(cfg)`."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = {
        "self_attn.q_proj.weight": (q, cfg.dim), "self_attn.k_proj.weight": (kv, cfg.dim),
        "self_attn.v_proj.weight": (kv, cfg.dim), "self_attn.o_proj.weight": (cfg.dim, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.dim), "mlp.up_proj.weight": (cfg.intermediate_size, cfg.dim),
        "mlp.down_proj.weight": (cfg.dim, cfg.intermediate_size),
        "input_layernorm.weight": (cfg.dim,), "post_attention_layernorm.weight": (cfg.dim,),
    }
    shapes = {}
    for k in expected_keys(cfg):
        if k.startswith("model.layers."):
            shapes[k] = per_layer[k.split(".", 3)[3]]
        elif k in ("model.embed_tokens.weight", "lm_head.weight"):
            shapes[k] = (cfg.vocab_size, cfg.dim)
        else:
            shapes[k] = (cfg.dim,)
    return shapes


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_inventory(cfg: ModelConfig, have: dict[str, tuple], source: str, cfg_source: str = "config",
                    layers_field: str = "n_layers") -> None:
    """The names and torch shapes a file holds (`have`, HF naming) against what `cfg` expects, BEFORE anything of
    that size is built: first the layer count (a config claiming 10**7 layers over a file with 2 is refused here,
    in time proportional to the file, instead of building 10**7 layers' names, modules or buffers), then exactly
    the expected names, then every shape. One-line ValueError naming `source`, `cfg_source` and `layers_field`."""
    present = {int(m.group(1)) for k in have if (m := _LAYER.match(k))}
    if present != set(range(cfg.n_layers)):
        held = f"layers 0..{max(present)}" if present == set(range(len(present))) and present else \
            f"{len(present)} layer indices ({', '.join(map(str, sorted(present)[:5]))}{', ...' if len(present) > 5 else ''})"
        raise ValueError(f"{source}: {cfg_source} says {layers_field} = {cfg.n_layers}, but the file holds tensors of "
                         f"{held if present else 'no layer'}")
    shapes = expected_shapes(cfg)
    missing = [k for k in shapes if k not in have]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    unexpected = [k for k in have if k not in shapes]
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{source}: unexpected tensors {', '.join(unexpected[:5])}{more}")
    for k, shape in shapes.items():
        if tuple(have[k]) != shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(have[k])}, {cfg_source} says {shape}")


def check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str,
                     cfg_source: str = "config", layers_field: str = "n_layers") -> dict[str, torch.Tensor]:
    """Drop what the decoder does not use (a tied lm_head copy, rotary caches), then insist on exactly the
    expected names and shapes (check_inventory); errors name `source`, the offending tensors and `cfg_source`
    (where the shapes came from)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    check_inventory(cfg, {k: tuple(v.shape) for k, v in sd.items()}, source, cfg_source, layers_field)
    return sd


def _load_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors file "
                         f"(expected an 8-byte header length, a JSON header and the tensor bytes it lists): {e}") from None
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


def _rope_fields(d: dict, source) -> dict:
    """transformers >= 5 writes rope_theta inside "rope_parameters"; older files use top-level rope_theta and
    rope_scaling. Lift the theta to the top level and refuse scaled RoPE, which the decoder does not implement."""
    if not isinstance(d, dict):
        return d                                               # from_hf_dict names what it is instead
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for key, v in (("rope_parameters", rope), ("rope_scaling", scaling)):
        if not isinstance(v, dict):
            raise ValueError(f"{source}: field {key!r} = {v!r}: expected a JSON object")
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"{source}: rope_type={kind!r} is not supported (plain RoPE only)")
    if "rope_theta" not in d and "rope_theta" in rope:
        d = d | {"rope_theta": rope["rope_theta"]}
    return d


def load_hf_dir(path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """An HF model directory -> (ModelConfig, state dict). Reads config.json and either model.safetensors or the
    shards named by model.safetensors.index.json. Tensors keep the file's dtype unless `dtype` is given."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no such file (an HF model directory needs config.json)")
    cfg = ModelConfig.from_hf_dict(_rope_fields(read_json(cfg_file), cfg_file), source=str(cfg_file))

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        sd, source = _load_safetensors(single, dtype), str(single)
    elif index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: expected a JSON object with a 'weight_map' field (tensor name -> shard file)")
        sd, source = {}, str(index)
        for shard in sorted(set(weight_map.values())):   # model-00001-of-00002.safetensors, ...
            sd.update(_load_safetensors(path / shard, dtype))
        absent = [k for k in weight_map if k not in sd]
        if absent:
            raise ValueError(f"{index}: tensors listed in weight_map but not in their shard: {', '.join(absent[:5])}")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return cfg, check_state_dict(cfg, sd, source, cfg_source=str(cfg_file), layers_field="num_hidden_layers")


# ----------------------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------------------

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_ARCHS = ("llama", "qwen2")
_DEQUANTISABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for a name we do not know."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Per head, the converter reorders rows [half0 | half1] into
    interleaved pairs (r0, r_hd/2, r1, r_hd/2+1, ...); reading them back as (head, hd/2, 2) and swapping the last
    two axes restores (head, 2, hd/2). Works for weights [out, in] and biases [out]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path):
    """GGUFReader for `path`, or a one-line error naming the file (missing, not GGUF, truncated)."""
    import gguf
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a GGUF file" +
                         (" (it holds config.json: an HF model directory is already converted)"
                          if (path / "config.json").is_file() else ""))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (expected magic b'GGUF' in the first 4 bytes, got {magic!r})")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:   # the reader fails with IndexError/ValueError/reshape errors on a short file
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({os.path.getsize(path)} bytes; expected a full "
                         f"header, metadata and every tensor's bytes): {type(e).__name__}: {e}") from None
    return reader


def gguf_metadata(reader) -> dict:
    """Every GGUF key -> its Python value (str, int, float, bool, or a list of them)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        v = field.contents()
        out[key] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def gguf_config(meta: dict, vocab_size: int, has_output: bool, source: str) -> ModelConfig:
    """GGUF metadata -> ModelConfig. `vocab_size` comes from token_embd's shape (some files have no
    {arch}.vocab_size key); `has_output` says whether an untied LM head is stored."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{source}: unknown architecture general.architecture={arch!r}; supported: {', '.join(GGUF_ARCHS)}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported (plain RoPE only)")

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full in meta:
            v = meta[full]
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{source}: metadata key {full!r} = {str(v)[:80]!r}: expected a number")
            return v
        if default is None:
            raise ValueError(f"{source}: missing metadata key {full!r}")
        return default

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    fields = dict(arch=arch, vocab_size=vocab_size, dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
                  n_kv_heads=int(get("attention.head_count_kv", n_heads)),
                  intermediate_size=int(get("feed_forward_length")),
                  head_dim=int(get("attention.key_length", dim // n_heads if n_heads > 0 else 0)),
                  rope_theta=float(get("rope.freq_base", 10000.0)),
                  rms_eps=float(get("attention.layer_norm_rms_epsilon")),
                  max_seq_len=int(get("context_length", 2048)), tie_embeddings=not has_output,
                  qkv_bias=arch == "qwen2")
    try:
        return ModelConfig(**fields)
    except ValueError as e:                            # e.g. head_count 7 for embedding_length 576
        raise ValueError(f"{source}: metadata describes an impossible model: {e}") from None


def check_gguf_tensors(cfg: ModelConfig, tensors: list[tuple[str, str, tuple]], source: str) -> None:
    """(name, GGUF type name, GGUF shape) of every tensor in a file, checked against cfg (check_inventory) before
    any is read: a name we do not know, then layer count, names and shapes, each one line naming the file and,
    for the layer count, the metadata key."""
    have = {}
    for name, kind, shape in tensors:
        hf = gguf_to_hf_name(name)
        if hf is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} (type {kind})")
        have[hf] = tuple(reversed(shape))                     # GGUF lists dimensions innermost first
    check_inventory(cfg, have, source, cfg_source="its metadata", layers_field=f"{cfg.arch}.block_count")


def load_gguf(path, dtype: torch.dtype | None = None, reader=None) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """A GGUF file -> (ModelConfig, state dict in HF naming, metadata dict). Quantised tensors are dequantised to
    float32 one by one (then cast to `dtype` if given), so peak memory is the dense model plus one tensor.
    `reader`: an open_gguf(path) already made (parsing a GGUF's header takes ~2 s for SmolLM2's 49k tokens)."""
    from gguf.quants import dequantize
    reader = reader or open_gguf(path)
    source = str(path)
    meta = gguf_metadata(reader)
    shapes = {t.name: t.shape for t in reader.tensors}
    vocab = int(shapes["token_embd.weight"][1]) if "token_embd.weight" in shapes else \
        len(meta.get("tokenizer.ggml.tokens", ()))             # a missing token_embd is reported below
    cfg = gguf_config(meta, vocab_size=vocab, has_output="output.weight" in shapes, source=source)
    check_gguf_tensors(cfg, [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors],
                       source)

    sd = {}
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise ValueError(f"{source}: unexpected tensor {t.name!r} (type {t.tensor_type.name})")
        if t.tensor_type.name not in _DEQUANTISABLE:
            raise ValueError(f"{source}: tensor {t.name} has type {t.tensor_type.name}; "
                             f"supported: {', '.join(_DEQUANTISABLE)}")
        shape = tuple(int(d) for d in reversed(t.shape))        # GGUF lists dimensions innermost first
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{source}: truncated GGUF file: tensor {t.name} has {t.data.nbytes} of {t.n_bytes} bytes")
        arr = dequantize(t.data, t.tensor_type)                  # float32 ndarray; F32 comes back as a view
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=np.may_share_memory(arr, t.data)).reshape(shape))
        if cfg.arch == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, cfg.n_heads)
        elif cfg.arch == "llama" and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, cfg.n_kv_heads)
        sd[hf] = w.to(dtype) if dtype is not None and dtype != torch.float32 else w
    return cfg, check_state_dict(cfg, sd, source), meta


# ----------------------------------------------------------------------------------------------------------
# mcl convert: GGUF -> HF directory
# ----------------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path, outdir, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json
    for the model in `gguf_path`; transformers' AutoModelForCausalLM / AutoTokenizer load the result."""
    from safetensors.torch import save_file

    from engine.loading.tokenizer import Tokenizer
    final = Path(outdir)
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):     # checked before the conversion
        raise ValueError(f"{final}: already exists{' and is not empty' if final.is_dir() else ' (a file)'}; "
                         f"mcl convert writes a new directory: remove it or choose another")
    cfg, sd, meta = load_gguf(gguf_path, dtype=dtype)
    tok = Tokenizer.from_gguf(meta, source=str(gguf_path))
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.tmp_convert"             # written here, renamed into place at the end
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        hf_cfg = cfg.to_hf_dict() | {k: v for k, v in special.items() if v is not None}
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: v for k, v in special.items() if v is not None}
        gen["eos_token_id"] = sorted(tok.eos_ids) if len(tok.eos_ids) > 1 else tok.eos_id
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok.save(out)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        os.chmod(out / "model.safetensors", 0o644)                  # safetensors writes it 0600
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)                    # a failed conversion leaves nothing behind
        raise
    os.replace(out, final)                                       # onto nothing or an empty directory: atomic
    return final


def cli_convert(args) -> int:
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    out = convert_gguf(args.gguf, args.outdir, dtype=dtype)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json)")
    return 0
