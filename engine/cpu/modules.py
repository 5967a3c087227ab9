"""The CPU backend's modules: swapped into a model whose weights are packed (engine/cpu/packed.py), so that
engine/model.py stays the eager torch reference and never asks which backend runs.

    pack_projection(model, "model.layers.0.self_attn.q_proj", packed)   # a LoRALinear -> PackedProjection
    pack_embedding(model, rows); pack_head(model, packed)               # the embedding table, the LM head
    fuse_layer(model.model.layers[0], cfg)   # q|k|v and gate|up as one call each, once all parts are packed
    use_decode_kernels(model)             # RMSNorm, decode attention and whole decode steps through cpu_ops.c
    set_decode_kernel(model, False)       # one-token steps back on the eager torch ops (mcl generate --eager-decode)

engine/loading/packed_model.py calls these while it builds a packed model. Each module takes over the one it
replaces (its parameters, adapters and state-dict names), and overrides one of the seams the model exposes:
  LoRALinear  -> PackedProjection  x W^T through the packed weight, + bias, + the adapters' delta (add_lora_delta)
  Attention   -> PackedAttention   qkv(): q|k|v in one packed call; attend(): a one-token step's RoPE, KV write and
                                   attention in one C call (decode_attention)
  MLP         -> PackedMLP         gate_up(): gate|up in one packed call
  RMSNorm     -> KernelRMSNorm     cpu_ops.c's rmsnorm
  Embedding   -> PackedEmbedding   rows looked up in the packed table (a q4 model: no fp32 copy, so no autograd)
  lm_head     -> PackedHead        logits through the packed head (a tied head: the embedding's packed table)
  Decoder     -> StepDecoder       a one-token step as one decode_layer call per layer (engine/cpu/decode_step.py)
With autograd on, every module runs its exact torch path (a bf16 model keeps its fp32 weights); the kernels run on
fp32 activations without autograd.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.cpu.decode_step import DecodeLayers, adapter_key
from engine.cpu.kernels import decode_attention, lora_apply, lora_apply_fits, rmsnorm
from engine.cpu.packed import PackedLinear
from engine.lora import LoRABatch, LoRALinear
from engine.model import MLP, Attention, Decoder, RMSNorm


def add_lora_delta(proj: LoRALinear, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
    """y = x W^T (+ bias) of a packed projection -> + the adapters' delta (inference). A few fp32 rows on the CPU
    (decode): one call of engine/cpu/cpu_ops.c's lora_apply, in place; otherwise (prefill, where batched matmuls win)
    kernels.multi_lora.multi_lora_torch, also its reference."""
    if lora is None or proj.lora_A is None or not lora.seg.n_lora:
        return y
    x2 = x.reshape(-1, proj.in_features)
    if x2.shape[0] <= 32 and x2.dtype == y.dtype == proj.lora_A.dtype == torch.float32 and not x2.is_cuda \
            and y.stride(-1) == 1 and lora_apply_fits(proj.lora_A.shape[1], proj.in_features, x2.shape[0]):
        y2 = y.reshape(-1, proj.out_features)
        lora_apply(x2 if x2.stride(-1) == 1 else x2.contiguous(), y2, proj.lora_A, proj.lora_B, proj.lora_scale,
                   lora.seg.ids)
        return y2.view(y.shape)
    from kernels.multi_lora import multi_lora_torch
    shape_only = x.new_empty(()).expand(proj.out_features, proj.in_features)        # the weight may be meta (q4)
    return multi_lora_torch(x, shape_only, None, proj.lora_A, proj.lora_B, proj.lora_scale, lora.seg, base_out=y)


def _finish(proj: LoRALinear, x, y, lora):
    """y = x W^T of projection `proj` (its own packed call, or its slice of a fused one) -> + bias + the adapters'
    delta, as LoRALinear adds them."""
    if proj.bias is not None:
        y = y + proj.bias
    return add_lora_delta(proj, x, y, lora)


class PackedProjection(LoRALinear):
    """A LoRALinear whose base weight is packed: without autograd, y = packed(x) + bias + the adapters' delta; with
    it (or once merge() has changed the exact weight) LoRALinear's own path on `weight` (meta in a q4 model)."""

    def __init__(self, proj: LoRALinear, packed: PackedLinear):
        with torch.device("meta"):                                  # the skeleton only: proj's tensors move in
            super().__init__(proj.in_features, proj.out_features, bias=proj.bias is not None)
        self.weight, self.bias = proj.weight, proj.bias
        self.lora_A, self.lora_B, self.lora_scale, self.ranks = proj.lora_A, proj.lora_B, proj.lora_scale, proj.ranks
        self.packed: PackedLinear | None = packed        # None after merge(): the copy no longer matches `weight`

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if self.packed is None or torch.is_grad_enabled():
            return super().forward(x, lora)
        return _finish(self, x, self.packed(x), lora)

    def merge(self, idx: int) -> None:
        super().merge(idx)
        self.packed = None                               # fall back to the exact, merged weight


class PackedAttention(Attention):
    """Attention whose q, k, v projections are packed and stacked into one call (PackedLinear.fuse: equal layouts
    share one weight, the parts' own copies become views of it; others run side by side as a PackedParts). With
    `decode_kernel` on, a one-token step's RoPE, KV-cache write and attention are one C call."""

    def __init__(self, attn: Attention, qkv_packed):
        with torch.device("meta"):
            super().__init__(attn.cfg, attn.layer_idx)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qkv_packed = qkv_packed                     # PackedLinear or PackedParts of q|k|v
        self.decode_kernel = False                       # set by use_decode_kernels / set_decode_kernel

    def qkv(self, x, lora):
        if torch.is_grad_enabled():
            return super().qkv(x, lora)
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q, k, v = self.qkv_packed(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        return tuple(_finish(p, x, y, lora) for p, y in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))

    def attend(self, q, k, v, cos, sin, cache, slots, input_pos, kv_len):
        B, T, _ = q.shape
        if not (self.decode_kernel and T == 1 and cache is not None and cache.k.dtype == torch.float32
                and not torch.is_grad_enabled()):
            return super().attend(q, k, v, cos, sin, cache, slots, input_pos, kv_len)
        hd, nh = self.cfg.head_dim, self.cfg.n_heads
        rows = torch.arange(B) if slots is None else slots
        y = decode_attention(q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1), cos.reshape(B, hd),
                             sin.reshape(B, hd), cache.k[self.layer_idx], cache.v[self.layer_idx], rows,
                             input_pos.reshape(B))
        return y.view(B, 1, nh * hd)                                         # (B, 1, nh*hd)


class PackedMLP(MLP):
    """The MLP with gate and up stacked into one packed call (as PackedAttention's q|k|v)."""

    def __init__(self, mlp: MLP, gate_up_packed, cfg):
        with torch.device("meta"):
            super().__init__(cfg)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up_packed = gate_up_packed             # PackedLinear or PackedParts of gate|up

    def gate_up(self, x, lora):
        if torch.is_grad_enabled():
            return super().gate_up(x, lora)
        g, u = self.gate_up_packed(x).chunk(2, dim=-1)
        return _finish(self.gate_proj, x, g, lora), _finish(self.up_proj, x, u, lora)


class KernelRMSNorm(RMSNorm):
    """RMSNorm through cpu_ops.c's rmsnorm (fp32, no autograd) while `kernel` is on; else the torch reference."""

    def __init__(self, norm: RMSNorm):
        with torch.device("meta"):
            super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.kernel = True

    def forward(self, x):
        if self.kernel and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return rmsnorm(x, self.weight, self.eps)
        return super().forward(x)


class PackedEmbedding(nn.Module):
    """The embedding table kept packed: a PackedLinear, or engine/loading/packed_model.py's FileRows (an untied
    table left in the GGUF file); tokens (B, T) -> rows (B, T, dim) fp32. `weight` is the replaced table's, on the
    meta device: the model holds no fp32 copy, so it runs for inference only."""

    def __init__(self, embedding: nn.Embedding, rows):
        super().__init__()
        self.weight = embedding.weight
        self.rows = rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("this model was loaded for inference (weights='q4': packed weights, no fp32 copy); "
                               "call it under torch.inference_mode() or load with weights='fp32' to train")
        return self.rows.embed(tokens)


class PackedHead(nn.Module):
    """The LM head kept packed: logits = x W^T through the kernels, in x's dtype. With autograd on, the exact weight:
    the replaced lm_head's own `weight` (meta in a q4 model), or for a tied head the embedding's, reached through
    `tied_to` (a tuple, so that the embedding is not registered a second time)."""

    def __init__(self, packed, head: nn.Linear | None, embedding: nn.Module):
        super().__init__()
        self.packed = packed
        self.weight = None if head is None else head.weight
        self.tied_to = (embedding,) if head is None else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.weight if self.weight is not None else self.tied_to[0].weight)
        return self.packed(x).to(x.dtype)                                    # (..., V)


class StepDecoder(Decoder):
    """The decoder whose one-token steps (up to 64 rows, fp32, no autograd) run as one engine/cpu/cpu_ops.c
    decode_layer call per layer, while `decode_kernel` is on and every layer fits the kernel; other calls (prefill,
    a layer the kernel lacks) go through the blocks as Decoder does."""

    def __init__(self, decoder: Decoder, cfg):
        with torch.device("meta"):
            super().__init__(cfg)
        self.embed_tokens, self.layers, self.norm = decoder.embed_tokens, decoder.layers, decoder.norm
        self.cfg = cfg
        self.decode_kernel = True
        self.steps: DecodeLayers | None = None           # built on the first step, rebuilt when the adapters change

    def forward(self, x, cos, sin, lora, cache, slots, input_pos, kv_len, checkpoint: bool = False):
        B, T, _ = x.shape
        if self.decode_kernel and T == 1 and cache is not None and B <= 64 and not torch.is_grad_enabled() \
                and cache.k.dtype == x.dtype == torch.float32:
            if self.steps is None or self.steps.key != adapter_key(self.layers):
                self.steps = DecodeLayers.build(self.layers, self.cfg)
            if self.steps.layers is not None:
                ids = None if lora is None or not lora.seg.n_lora else lora.seg.ids
                return self.steps.run(x.reshape(B, -1).contiguous(), cos, sin, cache, slots, input_pos,
                                      ids).view(B, 1, -1)
        return super().forward(x, cos, sin, lora, cache, slots, input_pos, kv_len, checkpoint)


# --- swapping them in ------------------------------------------------------------------------------------------------

def pack_projection(model: nn.Module, path: str, packed: PackedLinear) -> PackedProjection:
    """The LoRALinear at `path` (e.g. model.layers.0.self_attn.q_proj) -> a PackedProjection multiplying by `packed`."""
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path)
    proj = PackedProjection(getattr(owner, name), packed)
    setattr(owner, name, proj)
    return proj


def pack_embedding(model, rows) -> PackedEmbedding:
    """model.model.embed_tokens -> a PackedEmbedding looking rows up in `rows` (PackedLinear or FileRows)."""
    emb = model.model.embed_tokens = PackedEmbedding(model.model.embed_tokens, rows)
    return emb


def pack_head(model, packed) -> PackedHead:
    """The LM head (model.lm_head, or the tied embedding's) -> a PackedHead multiplying by `packed`."""
    head = model.lm_head = PackedHead(packed, model.lm_head, model.model.embed_tokens)
    return head


def fuse_layer(block, cfg) -> None:
    """A block's q, k, v (gate, up) projections as one call each: its Attention becomes a PackedAttention, its MLP a
    PackedMLP. Once, and only when all the parts are packed and none is dense (PackedLinear.cat)."""
    at, mlp = block.self_attn, block.mlp
    parts = [at.q_proj, at.k_proj, at.v_proj]
    if not isinstance(at, PackedAttention) and all(isinstance(p, PackedProjection) and p.packed is not None
                                                   for p in parts):
        fused = PackedLinear.fuse(parts)
        if fused is not None:
            block.self_attn = PackedAttention(at, fused)
    parts = [mlp.gate_proj, mlp.up_proj]
    if not isinstance(mlp, PackedMLP) and all(isinstance(p, PackedProjection) and p.packed is not None
                                              for p in parts):
        fused = PackedLinear.fuse(parts)
        if fused is not None:
            block.mlp = PackedMLP(mlp, fused, cfg)


def use_decode_kernels(model) -> None:
    """A packed model's RMSNorms, one-token attention and whole one-token steps through engine/cpu/cpu_ops.c (where
    a layer does not fit decode_layer, its RMSNorms and attention still do)."""
    if not isinstance(model.model, StepDecoder):
        model.model = StepDecoder(model.model, model.cfg)
    for block in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(block, name), KernelRMSNorm):
                setattr(block, name, KernelRMSNorm(getattr(block, name)))
    if not isinstance(model.model.norm, KernelRMSNorm):
        model.model.norm = KernelRMSNorm(model.model.norm)
    set_decode_kernel(model, True)


def set_decode_kernel(model, on: bool) -> None:
    """On: the C kernels that use_decode_kernels swapped in run. Off: the eager torch ops, the reference (the packed
    and fused matmuls stay). A model without them is left as it is."""
    for m in model.modules():
        if isinstance(m, (PackedAttention, StepDecoder)):
            m.decode_kernel = on
        elif isinstance(m, KernelRMSNorm):
            m.kernel = on
