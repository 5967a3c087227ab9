"""The decoder: Llama / Qwen2 family in one file (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP).

Module names equal Hugging Face's (model.layers.N.self_attn.q_proj, ...), so an HF state dict loads
directly and PEFT adapter keys map one to one. Every projection is an `engine.lora.LoRALinear`: a plain
linear until adapters are attached, then base + per-token adapter through `kernels.multi_lora`.

    from engine.config import PRESETS
    from engine.model import Transformer
    model = Transformer(PRESETS["tiny"])
    logits = model(tokens)                              # (B, T, V)
    logits = model(tokens, adapter_ids=torch.tensor([0, 2, -1]))   # one adapter per sequence, -1 = base
    logits = model(tokens, input_pos=pos, kv_cache=cache)           # cached decoding, see engine/serving/steps.py

Adapter ids travel explicitly through `forward`: (B,) per sequence or (B, T) per token. They are turned
into kernel segments once per forward and handed to every projection.

This file is the eager torch model, and the reference: it does not ask which backend runs. A backend swaps its own
modules in (engine/cpu/modules.py: packed projections, fused QKV and gate/up calls, C kernels for RMSNorm, decode
attention and whole decode steps), overriding the seams the modules here expose: Attention.qkv / Attention.attend,
MLP.gate_up, Decoder.forward and the lm_head slot.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.lora import LoRABatch, LoRALinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
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

    def forward(self, x, cos, sin, lora, cache: KVCache | None, slots, input_pos, kv_len):
        q, k, v = self.qkv(x, lora)
        y = self.attend(q, k, v, cos, sin, cache, slots, input_pos, kv_len)  # (B, T, nh*hd)
        return self.o_proj(y, lora)

    def qkv(self, x, lora):
        """x (B, T, dim) -> q (B, T, nh*hd), k and v (B, T, nkv*hd)."""
        return self.q_proj(x, lora), self.k_proj(x, lora), self.v_proj(x, lora)

    def attend(self, q, k, v, cos, sin, cache: KVCache | None, slots, input_pos, kv_len):
        """RoPE, the KV-cache write and read, causal attention: q, k, v as qkv() gives them -> (B, T, nh*hd)."""
        B, T, _ = q.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
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
            mask = torch.arange(kv_len, device=q.device)[None, None, :] <= input_pos[:, :, None]  # (B, T, L)
            if T <= 8 and not q.is_cuda:
                y = _small_q_attention(q, k_all, v_all, mask)
            else:
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], enable_gqa=nkv != nh)
        return y.transpose(1, 2).reshape(B, T, nh * hd)                   # (B, T, nh*hd)


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

    def forward(self, x, lora):
        g, u = self.gate_up(x, lora)
        return self.down_proj(F.silu(g) * u, lora)

    def gate_up(self, x, lora):
        """x (B, T, dim) -> gate, up (B, T, intermediate)."""
        return self.gate_proj(x, lora), self.up_proj(x, lora)


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

    def forward(self, x, cos, sin, lora, cache, slots, input_pos, kv_len, checkpoint: bool = False):
        """x (B, T, dim) through every block (the embedding and the final norm are the caller's: Transformer)."""
        for layer in self.layers:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, lora, None, None, input_pos, None,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, lora, cache, slots, input_pos, kv_len)
        return x


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_embeddings else (       # None: tied (a backend may put its own head here)
            nn.utils.skip_init(nn.Linear, cfg.dim, cfg.vocab_size, bias=False, device="meta") if on_meta()
            else nn.Linear(cfg.dim, cfg.vocab_size, bias=False))
        self.adapter_names: list[str] = []      # adapter id i <-> adapter_names[i]; see engine.lora.add_adapters
        self.lora_backend = "auto"              # "auto" (Triton on CUDA, torch on CPU), "triton" or "torch"
        self.gradient_checkpointing = False
        self.adapter_specs: list = []           # engine.lora.AdapterSpec per adapter, same order as adapter_names
        self.pack_stats: dict = {}              # what a packing loader did (engine/loading/packed_model.py): counts
                                                # per layout, bytes one decode step reads; empty for plain weights

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight

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
                     head itself (engine/training/chunked_ce.py: the head and the loss in chunks, in training).
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        if kv_cache is not None and kv_len is None:
            kv_len = int(input_pos.max()) + 1
        if kv_cache is not None and kv_len > kv_cache.max_len:
            raise ValueError(f"sequence of {kv_len} tokens exceeds the KV cache length {kv_cache.max_len}")
        if lora is None and adapter_ids is not None and self.adapter_names:
            lora = LoRABatch.from_ids(adapter_ids, B, T, len(self.adapter_names), self.lora_backend)

        x = self.model.embed_tokens(tokens)                                   # (B, T, dim)
        cos, sin = rope_cos_sin(self.cfg, input_pos, x.dtype)                 # (B, T, hd)
        checkpoint = self.gradient_checkpointing and self.training and kv_cache is None
        x = self.model(x, cos, sin, lora, kv_cache, cache_slots, input_pos, kv_len, checkpoint)   # (B, T, dim)
        if last_idx is not None:
            x = x[torch.arange(B, device=x.device), last_idx][:, None]       # (B, 1, dim)
        elif logits_at is not None:
            x = x.reshape(B * T, -1)[logits_at]                               # (K, dim)
        x = self.model.norm(x)
        if return_hidden:
            return x                                                          # (B, T|1, dim) or (K, dim)
        if self.lm_head is not None:
            return self.lm_head(x)                                            # (B, T|1, V)
        return F.linear(x, self.output_weight)                                # (B, T|1, V), tied

    def num_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

