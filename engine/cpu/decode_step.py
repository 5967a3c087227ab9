"""One-token decode steps of a packed CPU model with one C call per layer (engine/cpu/cpu_ops.c's decode_layer).

    steps = DecodeLayers.build(decoder.layers, cfg)   # .layers None: some projection does not fit the kernel
    x = steps.run(x, cos, sin, cache, slots, input_pos, ids)     # x (B, dim) fp32, updated through every layer

At batch 1 a small model's eager step is mostly Python: ~40 calls per layer (norms, the fused projections, bias,
adapters, attention, SiLU, residuals), each costing more than its arithmetic. decode_layer runs the same sequence of
the library's kernels; engine/cpu/modules.py's StepDecoder takes this path for one-token steps of weights="q4"
models while the decode kernels are on (the default), and the eager path otherwise, which tests/test_quant.py
compares it with. The structures (engine/cpu/cpu_kernels.h's, mirrored in engine/cpu/library.py) hold raw pointers:
they are rebuilt when the adapters' tensors change (StepDecoder checks adapter_key on every step).
"""
from __future__ import annotations

import ctypes

import torch

from engine.cpu.kernels import library, lora_apply_fits
from engine.cpu.library import DecodeLayer, LoraW, QWeight


def _qweight(args: tuple) -> QWeight:
    w, scale, sd, senc, wmin, md, menc, kind, G, N, _K = args
    return QWeight(w, scale, sd, wmin, md, senc, menc, kind, G, N)


def _parts(packed) -> list[tuple] | None:
    """weight_args of a PackedLinear or PackedParts (kind 0, dense, does not fit the kernel: None)."""
    parts = getattr(packed, "parts", None) or [packed]
    if packed is None or any(p.kind == 0 for p in parts):
        return None
    return [p.args() for p in parts]


def _lora(proj) -> LoraW | None:
    """The projection's stacked adapters, or LoraW() without; None when lora_apply cannot take them."""
    if proj.lora_A is None:
        return LoraW()
    A, B = proj.lora_A, proj.lora_B
    if A.dtype != torch.float32 or not (A.is_contiguous() and B.is_contiguous()) or \
            not lora_apply_fits(A.shape[1], proj.in_features, 1):       # rows: the step's batch is checked apart
        return None
    return LoraW(A.data_ptr(), B.data_ptr(), proj.lora_scale.data_ptr(), A.shape[1])


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class DecodeLayers:
    def __init__(self, layers: list[DecodeLayer] | None, key: tuple, keep: list):
        self.layers = layers                # None: the model does not fit the kernel (the eager path runs)
        self.key, self._keep = key, keep    # key: adapter_key at build time; _keep: tensors the pointers refer to

    @classmethod
    def build(cls, layers, cfg) -> "DecodeLayers":
        """layers: the model's blocks (engine.model.Block), their packed parts swapped in (engine/cpu/modules.py)."""
        out, keep = [], []
        for layer in layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv, gu = _parts(getattr(at, "qkv_packed", None)), _parts(getattr(mlp, "gate_up_packed", None))
            o, down = _parts(getattr(at.o_proj, "packed", None)), _parts(getattr(mlp.down_proj, "packed", None))
            loras = [_lora(p) for p in (at.q_proj, at.k_proj, at.v_proj, at.o_proj, mlp.gate_proj, mlp.up_proj,
                                        mlp.down_proj)]
            if None in (qkv, gu, o, down) or None in loras or len(qkv) > 3 or len(gu) > 2:
                return cls(None, adapter_key(layers), [])
            norms = [layer.input_layernorm.weight.detach().float().contiguous(),
                     layer.post_attention_layernorm.weight.detach().float().contiguous()]
            biases = [None if p.bias is None else p.bias.detach().float().contiguous()
                      for p in (at.q_proj, at.k_proj, at.v_proj)]
            keep += norms + biases
            ly = DecodeLayer(norm1=_ptr(norms[0]), norm2=_ptr(norms[1]), bq=_ptr(biases[0]), bk=_ptr(biases[1]),
                             bv=_ptr(biases[2]), eps=layer.input_layernorm.eps, n_qkv=len(qkv), n_gu=len(gu),
                             dim=cfg.dim, nh=cfg.n_heads, nkv=cfg.n_kv_heads, hd=cfg.head_dim,
                             inter=cfg.intermediate_size)
            for i, a in enumerate(qkv):
                ly.qkv[i] = _qweight(a)
            for i, a in enumerate(gu):
                ly.gu[i] = _qweight(a)
            ly.o, ly.down = _qweight(o[0]), _qweight(down[0])
            ly.lq, ly.lk, ly.lv, ly.lo, ly.lg, ly.lu, ly.ld = loras
            out.append(ly)
        return cls(out, adapter_key(layers), keep)

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, slots: torch.Tensor | None,
            input_pos: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """x (B, dim) fp32 contiguous, updated in place through every layer; cos / sin (B, head_dim); the tokens sit
        at input_pos (B,) of cache slots `slots` (None: rows 0..B-1); ids (B,) adapter per row or None."""
        B = x.shape[0]
        rows = (torch.arange(B) if slots is None else slots).to(torch.int64).contiguous()
        pos = input_pos.reshape(B).to(torch.int64).contiguous()
        ids = None if ids is None else ids.to(torch.int64).contiguous()
        cos, sin = cos.reshape(B, -1).float().contiguous(), sin.reshape(B, -1).float().contiguous()
        if not cache.k.is_contiguous() or not cache.v.is_contiguous():
            raise ValueError("decode_layer needs a contiguous KV cache")
        L, stride = cache.k.shape[3], cache.k.stride(0) * cache.k.element_size()
        lib, nt = library(), torch.get_num_threads()
        kp, vp = cache.k.data_ptr(), cache.v.data_ptr()
        for i, ly in enumerate(self.layers):
            rc = lib.decode_layer(ctypes.byref(ly), x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(), kp + i * stride,
                                  vp + i * stride, L, rows.data_ptr(), pos.data_ptr(), _ptr(ids), nt)
            if rc:
                raise ValueError(f"decode_layer failed in layer {i} (code {rc}): a position outside the KV cache "
                                 f"({L - 1} cells) or a layout the kernel lacks")
        return x


def adapter_key(layers) -> tuple:
    """What the structures' adapter pointers depend on: the first and last projection's stacks (their shapes and
    addresses; engine.lora's set_adapters replaces every layer's stacks at once) and the first one's scales."""
    first, last = layers[0].self_attn.q_proj, layers[-1].mlp.down_proj
    shape = None if first.lora_A is None else tuple(first.lora_A.shape)
    return shape, _ptr(first.lora_A), _ptr(first.lora_scale), _ptr(last.lora_B)
