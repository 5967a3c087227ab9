"""engine/training/chunked_ce.py: the LM head + cross-entropy in chunks of rows equals F.cross_entropy on the full logits, in
value and in the gradient to the hidden states (fp32: to rounding; bf16: within bf16 tolerance), for chunk sizes
that do and do not divide the row count; bad shapes and a trainable head are refused.

    python -m pytest tests/train/test_chunked_ce.py -q
"""
import pytest
import torch
import torch.nn.functional as F

from engine.training.chunked_ce import linear_cross_entropy


def _inputs(K=37, dim=24, V=301, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(K, dim, generator=g) * 2).to(dtype).requires_grad_(True)
    w = torch.randn(V, dim, generator=g).to(dtype)
    y = torch.randint(0, V, (K,), generator=g)
    dce = torch.rand(K, generator=g)                      # an arbitrary incoming gradient, not just ones
    return h, w, y, dce


@pytest.mark.parametrize("dtype,rtol,atol,grad_tol", [(torch.float32, 1e-6, 1e-5, 1e-5),
                                                      (torch.bfloat16, 2e-2, 5e-2, 2e-2)])
@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_matches_full_logits(dtype, rtol, atol, grad_tol, chunk):
    h, w, y, dce = _inputs(dtype=dtype)
    ref = F.cross_entropy(F.linear(h, w).float(), y, reduction="none")
    (g_ref,) = torch.autograd.grad((ref * dce).sum(), h)
    got = linear_cross_entropy(h, w, y, chunk)
    (g_got,) = torch.autograd.grad((got * dce).sum(), h)
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    rel = float((g_got.float() - g_ref.float()).norm() / g_ref.float().norm())
    assert rel <= grad_tol, f"relative difference of the hidden-state gradient: {rel:.2e}"


def test_no_grad_and_errors():
    h, w, y, _ = _inputs()
    with torch.no_grad():
        ce = linear_cross_entropy(h, w, y, 5)
    assert ce.shape == (37,) and not ce.requires_grad
    with pytest.raises(ValueError, match=r"h \(37, 24\), weight \(301, 23\)"):
        linear_cross_entropy(h, w[:, :23], y)
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(h, w, y, 0)
    with pytest.raises(ValueError, match="must be frozen"):
        linear_cross_entropy(h, w.clone().requires_grad_(True), y)
