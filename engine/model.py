"""The decoder: Llama / Qwen2 family in one file (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP).

Module names equal Hugging Face's (model.layers.N.self_attn.q_proj, ...), so an HF state dict loads
directly and PEFT adapter keys map one to one. Every projection is an `engine.lora.LoRALinear`: a plain
linear until adapters are attached, then base + per-token adapter through `kernels.multi_lora`.

    from engine.config import PRESETS
    from engine.model import Transformer
    model = Transformer(PRESETS["tiny"])
    logits = model(tokens)                              # (B, T, V)
    logits = model(tokens, adapter_ids=torch.tensor([0, 2, -1]))   # one adapter per sequence, -1 = base
    logits = model(tokens, input_pos=pos, kv_cache=cache)           # cached decoding, see engine/generate.py

Adapter ids travel explicitly through `forward`: (B,) per sequence or (B, T) per token. They are turned
into kernel segments once per forward and handed to every projection.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.lora import LoRABatch, LoRALinear, add_lora_delta
from engine.quant import PackedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernel = False         # CPU inference: engine/cpu_ops.c's rmsnorm (set by Transformer.set_decode_kernel)

    def forward(self, x):
        if self.kernel and x.dtype == torch.float32 and not torch.is_grad_enabled():
            from engine.cpu_kernels import rmsnorm
            return rmsnorm(x, self.weight, self.eps)
        # Normalise in fp32 (as HF does), scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); fp32 math as HF."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.int64).float() / hd))
    freqs = positions.float()[..., None] * inv_freq                   # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)                           # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos/sin (B, T, hd). Rotate-half convention (HF / GGUF-after-unpermute)."""
    cos, sin = cos[:, None], sin[:, None]                             # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.q_proj = LoRALinear(cfg.dim, nh * hd, bias=cfg.qkv_bias)
        self.k_proj = LoRALinear(cfg.dim, nkv * hd, bias=cfg.qkv_bias)
        self.v_proj = LoRALinear(cfg.dim, nkv * hd, bias=cfg.qkv_bias)
        self.o_proj = LoRALinear(nh * hd, cfg.dim, bias=False)
        self.qkv_packed = None      # engine.quant.PackedLinear of q|k|v stacked (CPU inference): one call, see fuse()
        self.decode_kernel = False  # one-token steps through engine/cpu_ops.c (RoPE + KV write + attention, one call)

    def fuse(self) -> None:
        """Stack the packed q, k, v projections into one (see PackedLinear.fuse: equal layouts share one weight,
        others are called side by side). Transformer.set_decode_kernel decides how one-token steps run. Once, and only
        when all three are packed (the GGUF loader calls it after each projection it reads)."""
        parts = [self.q_proj, self.k_proj, self.v_proj]
        if self.qkv_packed is None and all(p.packed is not None for p in parts):
            self.qkv_packed = PackedLinear.fuse(parts)

    def forward(self, x, cos, sin, lora, cache: KVCache | None, slots, input_pos, kv_len):
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        if self.qkv_packed is not None and not torch.is_grad_enabled():
            q, k, v = self.qkv_packed(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q, k, v = (_finish(p, x, y, lora) for p, y in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)))
        else:
            q, k, v = self.q_proj(x, lora), self.k_proj(x, lora), self.v_proj(x, lora)
        if self.decode_kernel and T == 1 and cache is not None and cache.k.dtype == torch.float32 \
                and not torch.is_grad_enabled():
            from engine.cpu_kernels import decode_attention
            rows = torch.arange(B) if slots is None else slots
            y = decode_attention(q.reshape(B, -1), k.reshape(B, -1), v.reshape(B, -1), cos.reshape(B, hd),
                                 sin.reshape(B, hd), cache.k[self.layer_idx], cache.v[self.layer_idx], rows,
                                 input_pos.reshape(B))
            return self.o_proj(y.view(B, 1, nh * hd), lora)
        q = q.view(B, T, nh, hd).transpose(1, 2)                          # (B, nh, T, hd)
        k = k.view(B, T, nkv, hd).transpose(1, 2)                         # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)                         # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            # Whole sequences from position 0: plain causal attention (right padding never leaks left).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=nkv != nh)
        else:
            cache.update(self.layer_idx, slots, input_pos, k, v)
            k_all, v_all = cache.read(self.layer_idx, slots, kv_len, B)     # (B, nkv, L, hd)
            # Key j is visible to the query at position p iff j <= p (per row: rows may sit at different positions).
            mask = torch.arange(kv_len, device=x.device)[None, None, :] <= input_pos[:, :, None]  # (B, T, L)
            if T <= 8 and not x.is_cuda:
                y = _small_q_attention(q, k_all, v_all, mask)
            else:
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], enable_gqa=nkv != nh)
        y = y.transpose(1, 2).reshape(B, T, nh * hd)                      # (B, T, nh*hd)
        return self.o_proj(y, lora)


def _small_q_attention(q, k, v, mask):
    """Attention for a few queries per row (decode) on the CPU, where SDPA's flash path costs ~10 ms a call.

    q (B, nh, T, hd); k, v (B, nkv, L, hd); mask (B, T, L). The query heads of one KV group are stacked so
    the GQA product is one batched matmul without repeating K/V."""
    B, nh, T, hd = q.shape
    nkv, L = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, nkv, g * T, hd)                                        # (B, nkv, g*T, hd)
    s = (qg @ k.transpose(-1, -2)).float() * hd ** -0.5                     # (B, nkv, g*T, L)
    m = mask[:, None, None].expand(B, 1, g, T, L).reshape(B, 1, g * T, L)
    p = s.masked_fill(~m, float("-inf")).softmax(-1).to(v.dtype)
    return (p @ v).reshape(B, nh, T, hd)                                     # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = LoRALinear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = LoRALinear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = LoRALinear(cfg.intermediate_size, cfg.dim, bias=False)
        self.gate_up_packed = None  # engine.quant.PackedLinear of gate|up stacked (CPU inference), see fuse()

    def fuse(self) -> None:
        """As Attention.fuse, for gate|up."""
        if self.gate_up_packed is None and self.gate_proj.packed is not None and self.up_proj.packed is not None:
            self.gate_up_packed = PackedLinear.fuse([self.gate_proj, self.up_proj])

    def forward(self, x, lora):
        if self.gate_up_packed is not None and not torch.is_grad_enabled():
            g, u = self.gate_up_packed(x).chunk(2, dim=-1)
            g, u = _finish(self.gate_proj, x, g, lora), _finish(self.up_proj, x, u, lora)
        else:
            g, u = self.gate_proj(x, lora), self.up_proj(x, lora)
        return self.down_proj(F.silu(g) * u, lora)


def _finish(proj: LoRALinear, x, y, lora):
    """A fused call's slice y = x W^T of projection `proj` -> + bias + the adapters' delta (as LoRALinear does)."""
    if proj.bias is not None:
        y = y + proj.bias
    return add_lora_delta(proj, x, y, lora)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, lora, cache, slots, input_pos, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lora, cache, slots, input_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


def on_meta() -> bool:
    """True inside `with torch.device("meta")` (a model whose weights are loaded next): random init is skipped there,
    as torch's meta-device init path imports torch._dynamo and with it triton (~60 MB resident, ~0.5 s) for nothing."""
    return torch.empty(()).is_meta


class Decoder(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        if not on_meta():
            nn.init.normal_(self.embed_tokens.weight)                 # nn.Embedding's own init
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.rms_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_embeddings else (
            nn.utils.skip_init(nn.Linear, cfg.dim, cfg.vocab_size, bias=False, device="meta") if on_meta()
            else nn.Linear(cfg.dim, cfg.vocab_size, bias=False))
        self.adapter_names: list[str] = []      # adapter id i <-> adapter_names[i]; see engine.lora.add_adapters
        self.lora_backend = "auto"              # "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"
        self.gradient_checkpointing = False
        self.adapter_specs: list = []           # engine.lora.AdapterSpec per adapter, same order as adapter_names
        # CPU inference (engine/quant.py, engine.hub.load_model's `weights`):
        self.output_packed: PackedLinear | None = None   # the LM head, packed
        self.embed_packed: PackedLinear | None = None    # the embedding table, packed (weights="q4"; rows looked up)
        self.inference_only = False             # weights="q4": projection weights live only in packed form (meta)
        self.pack_stats: dict = {}              # what was packed: counts per layout, bytes one decode step reads
        self.decode_layers = None               # engine.decode_step.DecodeLayers: one C call per layer per decode step

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def fuse_packed(self) -> None:
        """Fused QKV and gate/up calls from the projections' packed copies (CPU inference); one-token decode steps
        through engine/cpu_ops.c (set_decode_kernel(False) keeps the eager torch path, the tests' reference)."""
        for layer in self.model.layers:                          # (the GGUF loader fuses each layer as it reads)
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.set_decode_kernel(True)

    def set_decode_kernel(self, on: bool) -> None:
        """On: a packed CPU model's one-token steps run as one engine/cpu_ops.c call per layer (engine/decode_step.py;
        where a layer does not fit, its RMSNorms and attention still go through cpu_ops.c). Off: the eager torch ops,
        the reference."""
        for layer in self.model.layers:
            layer.self_attn.decode_kernel = on and layer.self_attn.qkv_packed is not None
            layer.input_layernorm.kernel = layer.post_attention_layernorm.kernel = on
        self.model.norm.kernel = on

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random weights (tests, speed work at real shapes): normal(0, std), norms at 1, biases small."""
        gens: dict[torch.device, torch.Generator] = {}          # drawn where the weights live: a 7B model on a
        for name, p in self.named_parameters():                  # GPU never round-trips 7.6B numbers via the CPU
            if "lora_" in name:
                continue
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)
        return self

    def forward(self, tokens: torch.Tensor, adapter_ids: torch.Tensor | None = None, *,
                input_pos: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                cache_slots: torch.Tensor | None = None, kv_len: int | None = None,
                last_idx: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                lora: LoRABatch | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) at `last_idx` (B,), or (K, V) at `logits_at` (K,).

        adapter_ids: None, (B,) per sequence or (B, T) per token; -1 = base only.
        input_pos:   (B, T) absolute positions (default 0..T-1); needed with kv_cache.
        kv_cache / cache_slots: the cache and the slot (B,) each row uses (default rows 0..B-1).
        kv_len:      keys attended = cache positions [0, kv_len) (default max(input_pos) + 1).
        logits_at:   flattened positions b * T + t (K,) whose logits are wanted (training: the loss positions);
                     the final norm and the LM head, the largest matmul per token, skip every other position.
        lora:        precomputed LoRABatch (overrides adapter_ids; lets a caller reuse segments).
        return_hidden: the final-normed hidden states (.., dim) instead of logits, for a caller that applies the LM
                     head itself (engine/chunked_ce.py: the head and the loss in chunks, in training).
        """
        B, T = tokens.shape
        if self.inference_only and torch.is_grad_enabled():
            raise RuntimeError("this model was loaded for inference (weights='q4': packed weights, no fp32 copy); "
                               "call it under torch.inference_mode() or load with weights='fp32' to train")
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        if kv_cache is not None and kv_len is None:
            kv_len = int(input_pos.max()) + 1
        if kv_cache is not None and kv_len > kv_cache.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache length {kv_cache.max_len}")
        if lora is None and adapter_ids is not None and self.adapter_names:
            lora = LoRABatch.from_ids(adapter_ids, B, T, len(self.adapter_names), self.lora_backend)

        if self.embed_packed is not None:
            x = self.embed_packed.embed(tokens)                               # (B, T, dim)
        else:
            x = self.model.embed_tokens(tokens)                               # (B, T, dim)
        cos, sin = rope_cos_sin(self.cfg, input_pos, x.dtype)                 # (B, T, hd)
        step = None
        if T == 1 and kv_cache is not None and self.inference_only and B <= 64 and not torch.is_grad_enabled() \
                and self.model.layers[0].self_attn.decode_kernel and kv_cache.k.dtype == x.dtype == torch.float32:
            from engine.decode_step import decode_layers
            step = decode_layers(self)                                        # None: a layer the kernel lacks
        if step is not None:                                                  # a decode step: one C call per layer
            ids = None if lora is None or not lora.seg.n_lora else lora.seg.ids
            x = step.run(x.reshape(B, -1).contiguous(), cos, sin, kv_cache, cache_slots, input_pos, ids).view(B, 1, -1)
        for layer in (self.model.layers if step is None else ()):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, lora, None, None, input_pos, None,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, lora, kv_cache, cache_slots, input_pos, kv_len)
        if last_idx is not None:
            x = x[torch.arange(B, device=x.device), last_idx][:, None]       # (B, 1, dim)
        elif logits_at is not None:
            x = x.reshape(B * T, -1)[logits_at]                               # (K, dim)
        x = self.model.norm(x)
        if return_hidden:
            return x                                                          # (B, T|1, dim) or (K, dim)
        if self.output_packed is not None and not torch.is_grad_enabled():
            return self.output_packed(x).to(x.dtype)                          # (B, T|1, V), see engine/quant.py
        return F.linear(x, self.output_weight)                                # (B, T|1, V)

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

