"""A model for CPU inference built from packed weights (engine/cpu/packed.py): engine.loading.hub.load_model's
`weights` modes other than fp32.

    model, tok = engine.loading.hub.load_model("qwen2.5-coder-0.5b", weights="q4")   # through load_gguf_packed
    model, meta = load_gguf_packed("model.gguf")            # a GGUF read straight into the packed layouts
    model = pack_dense_model(fp32_model)                    # an fp32 model re-quantised to Q8_0's layout
    stats = pack_model_bf16(fp32_model)                     # bf16 copies beside the fp32 weights

Modes (engine.loading.hub.load_model's `weights`):
  fp32  nothing packed: the exact reference (parity with transformers), and what training loads.
  bf16  every projection and the LM head as a dense bf16 copy beside the fp32 weights.
  q4    inference only: every GGUF tensor of a packed block type goes into its layout (engine/cpu/packed.py's table),
        the model holds no fp32 projection weights (they stay on the meta device); embeddings are looked up from the
        packed rows. An HF directory is re-quantised to Q8_0's layout. The name is kept from when only Q4_0/Q4_1
        stayed 4-bit.
The packed weights go into the model through engine/cpu/modules.py's modules, swapped in for the model's own (the
model file knows nothing of them); a q4 model then runs its one-token steps through engine/cpu/cpu_ops.c.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from engine.cpu.modules import (PackedAttention, PackedEmbedding, PackedHead, PackedMLP, PackedProjection, fuse_layer,
                                pack_embedding, pack_head, pack_projection, use_decode_kernels)
from engine.cpu.packed import BLOCK_BYTES, PACKED_TYPES, PackedLinear
from engine.lora import LoRALinear
from engine.model import Transformer

MODES = ("fp32", "bf16", "q4")


# --- the bf16 mode: dense copies beside the fp32 model -------------------------------------------------------------

def pack_model_bf16(model) -> dict:
    """Attach dense bf16 PackedLinear copies to every projection and the LM head of an fp32 CPU model; returns what
    was packed (model.pack_stats)."""
    if model.device.type != "cpu":
        raise ValueError("weights='bf16' packs for the CPU; on CUDA load with dtype=bfloat16 instead")
    n = step_bytes = 0
    with torch.no_grad():
        for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
            proj = model.get_submodule(name)
            step_bytes += pack_projection(model, name, PackedLinear(0, 32, proj.weight.to(torch.bfloat16),
                                                                    source="bf16")).packed.nbytes()
            n += 1
        step_bytes += pack_head(model, PackedLinear(0, 32, model.output_weight.to(torch.bfloat16),
                                                    source="bf16")).packed.nbytes()
    return {"weights": "bf16", "packed": {"bf16": n + 1}, "step_bytes": step_bytes}


class FileRows:
    """An untied embedding table left in the GGUF file: a read-only memory map of its blocks, rows decoded on lookup
    (PackedLinear.from_gguf of just those rows, then its exact dequantisation, so the values equal a packed copy's).
    Only the pages of rows looked up become resident, as with llama.cpp's mmap: Qwen2.5-Coder-0.5B's token_embd is
    94 MB (Q5_0) and 1.5B's 131 MB (Q4_K), of which a run touches a few MB. A tied table is the LM head too, read
    whole every step, so it is packed in memory instead."""

    def __init__(self, path, offset: int, type_name: str, n_rows: int, n_cols: int, name: str):
        per, nbytes = BLOCK_BYTES[type_name]
        self.type_name, self.out_features, self.in_features, self.source = type_name, n_rows, n_cols, name
        self.rows = np.memmap(path, np.uint8, "r", offset, (n_rows, n_cols // per * nbytes))

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 (out, in), or just `rows`."""
        idx = np.arange(self.out_features) if rows is None else rows.to(torch.int64).numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.out_features):
            raise IndexError(f"{self.source}: row index out of range for {self.out_features} rows")
        pk = PackedLinear.from_gguf(self.rows[idx], self.type_name, len(idx), self.in_features, self.source)
        return pk.dequantize()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> rows (B, T, in) fp32, each distinct token decoded once."""
        uniq, inv = torch.unique(tokens.reshape(-1), return_inverse=True)
        return self.dequantize(uniq)[inv].view(*tokens.shape, self.in_features)

    def nbytes(self) -> int:
        return 0                                   # nothing held in memory; a lookup reads its rows' pages


# --- the q4 mode: a model that holds only packed weights -----------------------------------------------------------

def _finish_inference_model(model, stats: dict):
    """Shared tail of both q4 loaders: meta buffers made real, tied head, fused calls, the decode kernels."""
    for mod_name, mod in model.named_modules():                   # non-persistent buffers (empty LoRA scales)
        for b_name, b in mod.named_buffers(recurse=False):
            if b.is_meta:
                mod.register_buffer(b_name, torch.empty(b.shape, dtype=b.dtype), persistent=False)
    missing = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and not isinstance(m, PackedProjection)]
    if missing or not isinstance(model.model.embed_tokens, PackedEmbedding):
        raise ValueError(f"no packed weight for {(missing or ['model.embed_tokens'])[0]} "
                         f"({len(missing)} projections missing)")
    if not isinstance(model.lm_head, PackedHead):
        pack_head(model, model.model.embed_tokens.rows)           # tied LM head: one copy serves both
    for layer in model.model.layers:                              # (the GGUF loader fuses each layer as it reads)
        fuse_layer(layer, model.cfg)
    use_decode_kernels(model)
    stats["step_bytes"] = sum(m.packed.nbytes() for m in model.modules() if isinstance(m, PackedProjection)) + \
        model.lm_head.packed.nbytes()
    stats["fused"] = sum(isinstance(layer.self_attn, PackedAttention) for layer in model.model.layers) + \
        sum(isinstance(layer.mlp, PackedMLP) for layer in model.model.layers)
    model.pack_stats = stats
    return model.eval()


def load_gguf_packed(path, header=None, dense_fallback: bool = False):
    """A GGUF file -> (Transformer for CPU inference, metadata): every 2-D tensor read from its blocks straight into
    a PackedLinear (read in row chunks: a few MB of scratch at a time, never the fp32 model); norms and biases fp32;
    an untied embedding table left in the file (FileRows). `header`: engine.loading.gguf_header.read_header(path) if
    the caller has it (hub.load_model builds the tokenizer from it first, so that its scratch is freed before the
    weights arrive). A tensor whose block type is not packed raises ValueError naming it, unless dense_fallback (then
    fp32 dense); so does a file shorter than its header says, before any weight is read."""
    from engine.loading.gguf_header import read_header
    from engine.loading.weights import check_gguf_tensors, gguf_config
    source = str(path)
    header = header or read_header(path)
    meta, tensors = header.meta, header.tensors
    short = next((t for t in tensors if t.have_bytes != t.n_bytes), None)
    if short is not None:
        raise ValueError(f"{source}: truncated GGUF file: tensor {short.name} has {short.have_bytes} of "
                         f"{short.n_bytes} bytes")
    shapes = {t.name: t.shape for t in tensors}
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{source}: no tensor token_embd.weight")
    cfg = gguf_config(meta, vocab_size=int(shapes["token_embd.weight"][1]), has_output="output.weight" in shapes,
                      source=source)
    check_gguf_tensors(cfg, [(t.name, t.tensor_type.name, t.shape) for t in tensors], source)   # before building
    with torch.device("meta"):
        model = Transformer(cfg)
    small, stats = {}, {"weights": "q4", "packed": {}}
    with open(path, "rb") as f:
        _read_tensors(tensors, f, model, cfg, source, small, stats, dense_fallback)
    missing, unexpected = model.load_state_dict(small, strict=False, assign=True)
    absent = [k for k in missing if not k.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight"))]
    if absent or unexpected:
        raise ValueError(f"{source}: missing tensors {absent[:5]}, unexpected {list(unexpected)[:5]}")
    return _finish_inference_model(model, stats), meta


def _read_dense(f, t) -> np.ndarray:
    """A small tensor (norm, bias, or a dense-fallback weight; t an engine.loading.gguf_header.TensorInfo) as fp32,
    shape in torch order."""
    from gguf.quants import dequantize
    raw = np.frombuffer(os.pread(f.fileno(), t.n_bytes, t.data_offset), dtype=np.uint8)
    kind = t.tensor_type.name
    arr = raw.view(np.float32) if kind == "F32" else raw.view(np.float16) if kind == "F16" else \
        dequantize(raw, t.tensor_type)
    return np.array(arr, dtype=np.float32).reshape(tuple(reversed(t.shape)))


def _fuse_when_read(model, hf: str) -> None:
    """Fuse a layer's QKV (gate/up) as soon as its parts are read, so that the parts' memory is reused by the next
    layer's reads: fusing every layer at the end raised the 0.5B's peak RSS by ~54 MB."""
    parts = hf.split(".")                                        # model.layers.{i}.self_attn.q_proj.weight
    if len(parts) >= 5 and parts[1] == "layers":
        fuse_layer(model.model.layers[int(parts[2])], model.cfg)  # each fuses once, when all its parts are packed


def _read_tensors(tensors, f, model, cfg, source, small, stats, dense_fallback):
    """load_gguf_packed's loop: 2-D tensors into PackedLinear copies on `model`, the rest (fp32) into `small`."""
    from engine.loading.weights import _unpermute, gguf_to_hf_name
    for t in tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            raise ValueError(f"{source}: unexpected tensor {t.name!r} (type {t.tensor_type.name})")
        kind = t.tensor_type.name
        heads = cfg.n_heads if "q_proj" in hf else cfg.n_kv_heads if "k_proj" in hf else 0
        if len(t.shape) == 2 and hf.endswith(".weight"):
            n_cols, n_rows = t.shape
            if kind in PACKED_TYPES and hf == "model.embed_tokens.weight" and not cfg.tie_embeddings:
                pack_embedding(model, FileRows(f.name, t.data_offset, kind, n_rows, n_cols,
                                               f"{source}: tensor {t.name}"))
                stats["packed"][kind] = stats["packed"].get(kind, 0) + 1
                continue
            if kind in PACKED_TYPES:
                pk = PackedLinear.from_gguf_file(f, t.data_offset, kind, n_rows, n_cols,
                                                 name=f"{source}: tensor {t.name}")
            elif dense_fallback:
                pk = PackedLinear(0, 32, torch.from_numpy(_read_dense(f, t)), source=f"dense({kind})")
            else:
                raise ValueError(f"{source}: tensor {t.name} has GGUF type {kind}, which weights='q4' does not pack "
                                 f"(packed: {', '.join(PACKED_TYPES)}); pass dense_fallback=True to load it as "
                                 f"dense fp32, or load with weights='fp32'")
            if cfg.arch == "llama" and heads:
                pk = pk.permute_rows(_unpermute(torch.arange(n_rows), heads))
            stats["packed"][pk.source] = stats["packed"].get(pk.source, 0) + 1
            if hf == "model.embed_tokens.weight":
                pack_embedding(model, pk)
            elif hf == "lm_head.weight":
                pack_head(model, pk)
            else:
                pack_projection(model, hf.removesuffix(".weight"), pk)
                _fuse_when_read(model, hf)
        else:
            w = torch.from_numpy(_read_dense(f, t))
            small[hf] = _unpermute(w, heads) if cfg.arch == "llama" and heads else w


def pack_dense_model(model):
    """An fp32 CPU model (HF directory, tests) -> the same model holding only packed weights: every projection, the
    embeddings and the LM head re-quantised to Q8_0's layout (PackedLinear.from_dense); fp32 weights dropped."""
    if model.device.type != "cpu":
        raise ValueError("weights='q4' packs for the CPU kernels; on CUDA load with dtype=bfloat16 instead")
    stats = {"weights": "q4", "packed": {}}
    meta = lambda p: torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)
    with torch.no_grad():
        for name in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
            proj = pack_projection(model, name, PackedLinear.from_dense(model.get_submodule(name).weight))
            proj.weight = meta(proj.weight)
            stats["packed"][proj.packed.source] = stats["packed"].get(proj.packed.source, 0) + 1
        if model.lm_head is not None:
            pack_head(model, PackedLinear.from_dense(model.lm_head.weight)).weight = meta(model.lm_head.weight)
        emb = pack_embedding(model, PackedLinear.from_dense(model.model.embed_tokens.weight))
        emb.weight = meta(emb.weight)
    return _finish_inference_model(model, stats)
