"""Preallocated KV cache with slots: one row of buffers per sequence in flight.

    cache = KVCache(cfg, n_slots=8, max_len=1024, dtype=torch.float32, device="cpu")
    logits = model(tokens, input_pos=pos, kv_cache=cache, cache_slots=slots)

Buffers are (n_layers, n_slots, n_kv_heads, max_len, head_dim). A slot is just a row index: the
generation loop and the continuous-batching scheduler decide which request owns which row.
Positions past a sequence's length may hold stale keys; attention masks them by position. One extra
cell per slot (index max_len, `scratch`) takes the writes of padding tokens in a right-padded prefill,
so padding never lands on a cell that holds a real key.
"""
from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        if max_len > cfg.max_seq_len:
            max_len = cfg.max_seq_len
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_len + 1, cfg.head_dim)   # +1: scratch cell
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_len, self.scratch = n_slots, max_len, max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, slots: torch.Tensor | None, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, nkv, T, hd) at positions pos (B, T) of the given slots (B,) (None = rows 0..B-1)."""
        B, T = pos.shape
        rows = torch.arange(B, device=pos.device) if slots is None else slots
        # cache[layer][rows[b], :, pos[b, t]] = k[b, :, t]; the result of the index is (B, T, nkv, hd).
        self.k[layer][rows[:, None], :, pos] = k.transpose(1, 2)
        self.v[layer][rows[:, None], :, pos] = v.transpose(1, 2)

    def read(self, layer: int, slots: torch.Tensor | None, kv_len: int, n_rows: int):
        """Keys and values (B, nkv, kv_len, hd) of the given slots; slots=None means rows 0..n_rows-1 (a view)."""
        if slots is None:
            return self.k[layer, :n_rows, :, :kv_len], self.v[layer, :n_rows, :, :kv_len]
        return self.k[layer, slots, :, :kv_len], self.v[layer, slots, :, :kv_len]
