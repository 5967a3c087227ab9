"""GPU-only checks of the compiled kernels at Qwen2.5-7B shapes, in bf16 and fp16 (marked `gpu`, skipped without CUDA).

The interpreter computes 16-bit cases in fp32 (see multi_lora._mma), so in-kernel bf16/fp16 rounding, the stores and
the wgmma paths are only exercised here. Forward and every gradient (dx, dA, dB) against an fp32 reference on the same
rounded inputs (multi_lora_torch in fp32, itself tested against the float64 oracle), by relative Frobenius norm
||got - ref|| / ||ref||; every buffer the launchers allocate starts as NaN. Also: a decode step (make_segments +
multi_lora) runs without a host sync and is captured and replayed in a CUDA graph.

    python -m pytest -m gpu tests/kernels -q          # on a machine with CUDA (scripts/gpu_check.sh runs it)
"""
import pytest
import torch

from kernels import multi_lora as ml

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Relative-norm bounds: a 16-bit store rounds at 2^-9 (bf16) / 2^-12 (fp16) relative; mid is rounded once more
# before the expand, and dA/dB sum thousands of rounded products in fp32. 4-8 units of rounding leave room for that.
REL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
SHAPES = {"q_proj": (3584, 3584, True), "k_proj": (3584, 512, True), "down_proj": (18944, 3584, False)}
N_ADAPTERS, RANK = 4, 32


def _case(n_in, n_out, bias, T, mix, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to("cuda", dtype)
    ids = torch.arange(T) % N_ADAPTERS if mix == "even" else \
        torch.tensor([-1, 0, 0, 0, 0, 0, 0, 1, 1, 2])[torch.randint(0, 10, (T,), generator=g)]
    return dict(x=rnd(T, n_in), weight=rnd(n_out, n_in, std=n_in ** -0.5), bias=rnd(n_out) if bias else None,
                lora_a=rnd(N_ADAPTERS, RANK, n_in, std=n_in ** -0.5), lora_b=rnd(N_ADAPTERS, n_out, RANK, std=0.2),
                scales=torch.tensor([2.0, -1.0, 0.5, 1.5], device="cuda"), dy=rnd(T, n_out),
                ids=ids[torch.randperm(T, generator=g)].to("cuda"))


def _run(case, backend, upcast=False):
    c = {k: (v.float() if upcast and torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    x, A, B = (c[k].detach().clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    seg = ml.make_segments(c["ids"], N_ADAPTERS)
    y = ml.multi_lora(x, c["weight"], c["bias"], A, B, c["scales"], seg, backend=backend)
    y.backward(c["dy"])
    return [y.detach(), x.grad, A.grad, B.grad]


def _rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(ml, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


# Every projection shape at T=8192 (skewed mix: the tail tiles and a big segment), q_proj also at T=256 (split-K
# shrink, 64-row tiles); few cases, because each new shape/dtype compiles its kernels on the loan's clock.
CASES = [("q_proj", 8192, "skewed"), ("k_proj", 8192, "skewed"), ("down_proj", 8192, "skewed"), ("q_proj", 256, "even")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op, T, mix", CASES)
def test_forward_and_grads_match_fp32(op, T, mix, dtype, poisoned):
    case = _case(*SHAPES[op], T, mix, dtype)
    got, ref = _run(case, "triton"), _run(case, "torch", upcast=True)
    errs = {name: _rel(g, r) for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref)}
    assert all(g.dtype == dtype for g in got)
    assert max(errs.values()) < REL[dtype], f"{op} T={T} {mix} {dtype}: relative norm errors {errs}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["q_proj", "k_proj"])
def test_decode_forward_matches_fp32(op, dtype, poisoned):
    case = _case(*SHAPES[op], 64, "skewed", dtype, seed=1)
    seg = ml.make_segments(case["ids"], N_ADAPTERS)
    args = (case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["scales"], seg)
    with torch.no_grad():
        ys = {d: ml.multi_lora(case["x"], *args, backend="triton", decode=d) for d in (True, False)}
        ref = ml.multi_lora_torch(case["x"].float(), *[a.float() if torch.is_tensor(a) and a.is_floating_point()
                                                        else a for a in args[:5]], seg)
    for d, y in ys.items():
        assert _rel(y, ref) < REL[dtype], f"{op} decode={d} {dtype}: relative norm error {_rel(y, ref):.2e}"


def test_decode_step_needs_no_sync_and_captures_in_a_cuda_graph():
    n_in, n_out, bias = SHAPES["q_proj"]
    case = _case(n_in, n_out, bias, 16, "skewed", torch.bfloat16, seed=2)
    ids = case["ids"].clone()
    w = (case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["scales"])

    def step():
        seg = ml.make_segments(ids, N_ADAPTERS)                        # CUDA default: no host counts, no sync
        return ml.multi_lora(case["x"], *w, seg, backend="triton")
    with torch.no_grad():
        eager = step()                                                 # autotune / compile outside the capture
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")                        # any host sync now raises
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        new_ids = torch.roll(case["ids"], 3)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        ids_ref = ml.make_segments(new_ids, N_ADAPTERS)
        ref = ml.multi_lora(case["x"], *w, ids_ref, backend="triton")
    assert not torch.equal(eager, ref), "the new ids must change the output for this check to mean anything"
    assert torch.equal(out, ref), "graph replay with new ids differs from eager"
