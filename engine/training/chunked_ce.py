"""The LM head and cross-entropy of the loss positions, in chunks of rows: no [tokens, vocab] tensor outlives a chunk.

    from engine.training.chunked_ce import linear_cross_entropy
    h = model(tokens, adapter_ids=ids, logits_at=at, return_hidden=True)       # (K, dim), after the final norm
    ce = linear_cross_entropy(h, model.output_weight, targets, chunk=256)      # (K,) fp32, = F.cross_entropy(
                                                                                #   h @ W^T .float(), y, reduction="none")
Forward, per chunk of c rows:  z = (h_c W^T).float()  (c, V);  lse = logsumexp(z);  ce = lse - z[y]
Backward: d ce_k / d h_k = (softmax(z_k) - onehot(y_k)) W, and the incoming gradient g (K,) only scales row k:
d h_k = g_k (softmax(z_k) - onehot(y_k)) W. So the forward computes that (K, dim) product while z is in hand, and the
backward is one row scaling: no recompute, and peak memory is one chunk's logits (c x V x 4 bytes) instead of
K x V x (4 + 4 + 4) for logits, log-softmax and their gradient. W is frozen (no gradient for it).
z is the matmul's output in h's dtype, cast to fp32 (as autocast + `.float()` does); in fp32 the result equals
F.cross_entropy on the full logits to rounding (tests/train/test_logits_at.py).
"""
from __future__ import annotations

import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        K = h.shape[0]
        ce = torch.empty(K, dtype=torch.float32, device=h.device)            # (K,)
        dh = torch.empty(K, h.shape[1], dtype=torch.float32, device=h.device) if ctx.needs_input_grad[0] else None
        w = weight.to(h.dtype)
        for s in range(0, K, chunk):
            hc, y = h[s:s + chunk], targets[s:s + chunk]                      # (c, dim), (c,)
            z = (hc @ w.t()).float()                                          # (c, V) logits, fp32
            lse = torch.logsumexp(z, dim=-1)                                  # (c,)
            ce[s:s + chunk] = lse - z.gather(1, y[:, None])[:, 0]
            if dh is not None:
                p = z.sub_(lse[:, None]).exp_()                               # (c, V) softmax, in place of z
                p[torch.arange(p.shape[0], device=p.device), y] -= 1          # softmax - onehot(y)
                dh[s:s + chunk] = p.to(h.dtype) @ w                           # (c, dim)
        ctx.save_for_backward(dh)
        ctx.h_dtype = h.dtype
        return ce

    @staticmethod
    def backward(ctx, dce):
        (dh,) = ctx.saved_tensors
        return (dh * dce[:, None]).to(ctx.h_dtype), None, None, None        # (K, dim): row k scaled by g_k


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-row CE (K,) fp32 of logits h @ weight^T (h (K, dim), weight (V, dim), frozen) against targets (K,).
    Call it outside autocast: the matmul runs in h's dtype."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)}; expected (K, dim), (V, dim), (K,)")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk={chunk}; expected >= 1 rows")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_cross_entropy: the output weight must be frozen (requires_grad=False)")
    return LinearCrossEntropy.apply(h, weight, targets, chunk)
