"""Packed weights for fast CPU inference: GGUF 4-bit blocks kept 4-bit, everything else in bf16.

A decode step of a small model on the CPU streams every weight once (SmolLM2-135M in fp32: 540 MB per step),
so its speed is bytes per step. `pack_model` attaches to every projection (and the LM head) a `PackedLinear`
that reads fewer bytes; the fp32 parameters stay the source of truth (training, LoRA merge, state dicts).

    model, tok = engine.hub.load_model("smollm2-135m", weights="q4")   # or weights="bf16"; default "fp32"

Modes:
  fp32  nothing packed: the exact reference (parity with transformers).
  bf16  every projection and the LM head as a dense bf16 copy; activations are rounded to bf16 at the matmul
        input, accumulate in fp32 inside oneDNN, and come back in the model dtype (the residual stream, norms,
        attention and softmax stay fp32).
  q4    as bf16, and the GGUF tensors stored as Q4_0 / Q4_1 are multiplied in their 4-bit form by torch's CPU
        int4 kernel (aten._weight_int4pack_mm_for_cpu, the kernel behind torchao's int4 weight-only CPU path)
        for calls of at most Q4_MAX_ROWS rows (decode); longer calls (prefill chunks) use the dense bf16 copy,
        where a GEMM beats unpacking.

The 4-bit form is the file's own, not a re-quantisation. GGUF blocks hold 32 weights of one row:
  Q4_1: w = d * q + m          (q in 0..15, d and m fp16)
  Q4_0: w = d * (q - 8)
and the int4 kernel computes w = (q - 8) * scale + zero per group of 32 along the input dimension, so
Q4_1 -> scale = d, zero = m + 8 d and Q4_0 -> scale = d, zero = 0. The kernel takes scale and zero in bf16 (8-bit
mantissa), so weights differ from the file's by at most one bf16 rounding of d and of the zero, the same
order as the bf16 rounding of the activations. tests/test_quant.py checks the packed layers against the
dequantised weights and greedy decoding against the fp32 model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("fp32", "bf16", "q4")
GROUP = 32                     # GGUF Q4 block size = int4 kernel group size
Q4_MAX_ROWS = 32               # above this many rows per call the dense bf16 GEMM is faster on this CPU


class PackedLinear:
    """y = x W^T in reduced precision. dense: (out, in) bf16; q4 / q4_scale_zero: the int4 kernel's operands."""

    def __init__(self, dense: torch.Tensor, q4: torch.Tensor | None = None, q4_scale_zero: torch.Tensor | None = None):
        self.dense, self.q4, self.q4_scale_zero = dense, q4, q4_scale_zero

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) of any float dtype -> (..., out) in x's dtype."""
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.q4 is not None and xb.shape[0] <= Q4_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.q4, GROUP, self.q4_scale_zero)
        else:
            y = F.linear(xb, self.dense)
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    def nbytes(self) -> int:
        """Bytes a small-batch call reads: the 4-bit form when there is one, else the dense copy."""
        if self.q4 is not None:
            return self.q4.numel() * self.q4.element_size() + self.q4_scale_zero.numel() * 2
        return self.dense.numel() * self.dense.element_size()


# --- GGUF 4-bit blocks ------------------------------------------------------------------------------------------

def gguf_q4_rows(data: np.ndarray, type_name: str, n_rows: int, n_cols: int):
    """Raw GGUF Q4_0/Q4_1 bytes -> (q uint8 (rows, cols) in 0..15, scale fp32 (rows, cols/32), zero fp32 (rows, cols/32))
    in the int4 kernel's convention w = (q - 8) * scale + zero. In a block, byte j holds element j in its low
    nibble and element j + 16 in its high nibble."""
    block = {"Q4_0": 18, "Q4_1": 20}[type_name]
    raw = np.ascontiguousarray(data).reshape(-1, block)
    if raw.shape[0] != n_rows * n_cols // GROUP:
        raise ValueError(f"{type_name} tensor of {raw.shape[0]} blocks does not hold {n_rows}x{n_cols} weights")
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    qs = raw[:, block - 16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=1)                                 # (blocks, 32)
    if type_name == "Q4_1":
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    rows = lambda a: torch.from_numpy(np.ascontiguousarray(a)).reshape(n_rows, -1)
    return rows(q), rows(d), rows(zero)


def pack_q4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    """q uint8 (out, in), scale/zero (out, in/32) -> the int4 kernel's (packed weight, scale_and_zero (in/32, out, 2) bf16)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def dequant_q4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The torch reference of what the kernel multiplies by: (q - 8) * scale + zero, fp32 (out, in)."""
    s = scale.repeat_interleave(GROUP, dim=1)
    z = zero.repeat_interleave(GROUP, dim=1)
    return (q.float() - 8) * s + z


# --- whole models -----------------------------------------------------------------------------------------------

def pack_model(model, mode: str, q4_tensors: dict | None = None) -> dict:
    """Attach PackedLinear copies to `model`'s projections and LM head (CPU, after the model is on its device).

    q4_tensors: HF weight name -> (q, scale, zero) from `gguf_q4_rows` (engine.weights.load_gguf_q4).
    Returns counts and bytes per step (what a small-batch decode reads) for logs."""
    from engine.lora import LoRALinear
    if mode not in MODES:
        raise ValueError(f"weights={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "fp32":
        return {"weights": "fp32", "packed_q4": 0, "dense_bf16": 0}
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"weights={mode!r} packs for the CPU kernels; on CUDA load with dtype=bfloat16 instead")
    q4_tensors = q4_tensors or {}
    n_q4 = n_dense = step_bytes = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, LoRALinear):
                continue
            pk = PackedLinear(mod.weight.to(torch.bfloat16))
            entry = q4_tensors.get(f"{name}.weight") if mode == "q4" else None
            if entry is not None:
                pk.q4, pk.q4_scale_zero = pack_q4(*entry)
                n_q4 += 1
            else:
                n_dense += 1
            mod.packed = pk
            step_bytes += pk.nbytes()
        model.output_packed = PackedLinear(model.output_weight.to(torch.bfloat16))
        step_bytes += model.output_packed.nbytes()
    return {"weights": mode, "packed_q4": n_q4, "dense_bf16": n_dense + 1, "step_bytes": step_bytes}
