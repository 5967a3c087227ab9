"""kernels/multi_lora.py against the float64 oracle (multi_lora_ref): forward and the gradients to x, A and B, for the
Triton path (the interpreter on CPU, compiled on CUDA) and the plain-torch segment path; Segments invariants; poisoned
output buffers; ValueErrors at the boundary.

    python -m pytest tests/kernels/test_multi_lora.py -q     # tests/conftest.py sets TRITON_INTERPRET=1 without CUDA
"""
import dataclasses

import pytest
import torch

from kernels import multi_lora as ml

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, atol, rtol): |got - ref| <= atol * max|ref| + rtol * |ref|, elementwise, ref in float64.
TOLS = {torch.float32: (torch.float32, 1e-4, 1e-4), torch.bfloat16: (torch.bfloat16, 1e-2, 1e-2)}


def make_ids(pattern: str, T: int, n_adapters: int, g: torch.Generator) -> torch.Tensor:
    if pattern == "random":                                   # any order, base tokens included
        return torch.randint(-1, n_adapters, (T,), generator=g)
    if pattern == "all_base":
        return torch.full((T,), -1)
    if pattern == "empty_segments":                           # adapters 1 and 3 get no tokens
        return torch.tensor([-1, 0, 2])[torch.randint(0, 3, (T,), generator=g)]
    if pattern == "skewed_sorted":                            # one big segment, already grouped, descending ids
        ids = torch.zeros(T, dtype=torch.int64)
        ids[: T // 8] = n_adapters - 1
        ids[T // 8: T // 4] = -1
        return ids
    if pattern.startswith("sorted_"):                         # already grouped (the trainer's batches): in_order
        n_base = {"sorted_equal": 0, "sorted_equal_base": 8, "sorted_uneven": 5}[pattern]
        if pattern == "sorted_uneven":                        # uneven, adapter 1 empty
            counts = [T - n_base - 2 * (T // 7)] + [0] + [T // 7] * 2 + [0] * (n_adapters - 4)
        else:
            counts = [(T - n_base) // n_adapters] * n_adapters
        return torch.repeat_interleave(torch.arange(-1, n_adapters), torch.tensor([n_base] + counts))
    raise ValueError(pattern)


def make_case(T, n_in, n_out, ranks, pattern, dtype, bias=True, seed=0):
    """Inputs with adapters of the given ranks zero-padded to R = max(ranks); values never all zero."""
    g = torch.Generator().manual_seed(seed)
    NA, R = len(ranks), max(ranks)
    x = torch.randn(T, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    A, B = torch.zeros(NA, R, n_in), torch.zeros(NA, n_out, R)
    for a, r in enumerate(ranks):
        A[a, :r] = torch.randn(r, n_in, generator=g) / n_in ** 0.5
        B[a, :, :r] = torch.randn(n_out, r, generator=g) / r ** 0.5
    scales = (torch.rand(NA, generator=g) + 0.5) * torch.tensor([1.0, -1.0] * NA)[:NA]
    dy = torch.randn(T, n_out, generator=g)
    ids = make_ids(pattern, T, NA, g)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)
    return dict(x=cast(x), weight=cast(w), bias=cast(b), lora_a=cast(A), lora_b=cast(B),
                scales=scales.to(DEVICE), dy=cast(dy), ids=ids.to(DEVICE), ranks=ranks)


def reference(case):
    """Forward and grads of multi_lora_ref in float64 on the same (already rounded) inputs."""
    d = lambda t: None if t is None else t.detach().double()
    x, A, B = (d(case[k]).requires_grad_() for k in ("x", "lora_a", "lora_b"))
    y = ml.multi_lora_ref(x, d(case["weight"]), d(case["bias"]), A, B, case["scales"].double(), case["ids"])
    y.backward(d(case["dy"]))
    return y.detach(), x.grad, A.grad, B.grad


def run(case, backend, **kw):
    x, A, B = (case[k].detach().clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    seg = ml.make_segments(case["ids"], len(case["ranks"]))
    if backend == "torch_segments":                         # force the per-segment loop even for few tokens
        seg, backend = dataclasses.replace(seg, onehot=None), "torch"
    y = ml.multi_lora(x, case["weight"], case["bias"], A, B, case["scales"], seg, backend=backend, **kw)
    y.backward(case["dy"])
    if seg.n_lora == 0 and backend in ("torch", "torch_segments"):               # autograd leaves unused parameters' grads at None
        assert A.grad is None and B.grad is None
        return y.detach(), x.grad, torch.zeros_like(A), torch.zeros_like(B)
    return y.detach(), x.grad, A.grad, B.grad


def assert_close(name, got, ref, dtype):
    _, atol, rtol = TOLS[dtype]
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (got - ref).abs()
    bad = ~(diff <= atol * scale + rtol * ref.abs())         # NaN counts as bad
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name} ({dtype}): {int(bad.sum())} elements off; largest difference "
                             f"{diff.nan_to_num(float('inf')).max().item():.3e} (max|ref| {scale:.3e}); first at {i}: "
                             f"got {got[i].item():.6g}, ref {ref[i].item():.6g}")


def check_all(case, got, dtype):
    ref = reference(case)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        assert_close(name, g, r, dtype)
    _, _, dA, dB = got
    for a, r in enumerate(case["ranks"]):                     # zero padding gets exactly zero gradient
        assert (dA[a, r:] == 0).all() and (dB[a, :, r:] == 0).all(), f"padded rank entries of adapter {a} got gradient"


CASES = {  # name: (T, in, out, ranks, ids pattern, bias)
    "T1": (1, 16, 16, [8, 8], "random", True),
    "odd_5x123x77": (5, 123, 77, [4, 16, 8], "random", True),
    "ranks_8_16_32_64": (70, 80, 72, [8, 16, 32, 64], "random", False),
    "empty_segments": (37, 48, 33, [16, 16, 16, 16], "empty_segments", True),
    "all_base": (20, 40, 24, [8, 8], "all_base", True),
    "skewed_sorted": (53, 64, 80, [32, 8], "skewed_sorted", False),
    "sorted_equal": (72, 40, 56, [8, 8, 16, 8], "sorted_equal", True),        # one bmm pair, no gather/scatter
    "sorted_equal_base": (72, 40, 56, [8, 4, 8, 8], "sorted_equal_base", False),
    "sorted_uneven": (75, 48, 33, [16, 8, 16, 4], "sorted_uneven", True),     # slices, one empty segment
}


def test_sorted_patterns_take_the_in_order_path():
    """The sorted cases above really exercise the slice/bmm branches (in_order), the others the gather path."""
    g = torch.Generator().manual_seed(0)
    for name, (T, _, _, ranks, pattern, _) in CASES.items():
        seg = ml.make_segments(make_ids(pattern, T, len(ranks), g), len(ranks))
        if T > 1 and pattern != "all_base":                 # one token, or all base, is trivially in order
            assert seg.in_order == pattern.startswith("sorted_"), name
        if pattern.startswith("sorted_"):
            assert seg.n_tokens == T and (len(set(seg.counts)) == 1) == pattern.startswith("sorted_equal"), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch", "torch_segments"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, backend, dtype):
    T, n_in, n_out, ranks, pattern, bias = CASES[name]
    case = make_case(T, n_in, n_out, ranks, pattern, dtype, bias)
    check_all(case, run(case, backend), dtype)


@pytest.mark.parametrize("block_m", ml.BLOCK_MS)
@pytest.mark.parametrize("fuse_shrink", [True, False])
def test_triton_tilings(block_m, fuse_shrink):
    """Every tile height and both shrink placements (fused into the GEMM's K loop, or a separate kernel)."""
    case = make_case(67, 40, 36, [8, 32, 16], "random", torch.float32, seed=block_m)
    check_all(case, run(case, "triton", block_m=block_m, fuse_shrink=fuse_shrink), torch.float32)


def test_triton_3d_input_and_no_x_grad():
    """x [B, T, in] is flattened; with x frozen (the first projection in training) only dA, dB are computed."""
    case = make_case(18, 24, 20, [8, 16], "random", torch.float32, seed=3)
    ref_y, _, ref_dA, ref_dB = reference(case)
    A, B = (case[k].clone().requires_grad_() for k in ("lora_a", "lora_b"))
    seg = ml.make_segments(case["ids"].view(2, 9), 2)
    y = ml.multi_lora(case["x"].view(2, 9, 24), case["weight"], case["bias"], A, B, case["scales"], seg,
                      backend="triton")
    assert y.shape == (2, 9, 20)
    y.backward(case["dy"].view(2, 9, 20))
    for name, g, r in (("y", y.detach().view(18, 20), ref_y), ("dA", A.grad, ref_dA), ("dB", B.grad, ref_dB)):
        assert_close(name, g, r, torch.float32)


def test_poisoned_buffers_are_overwritten(monkeypatch):
    """Every buffer the launchers allocate starts as NaN; outputs and grads must still be exact."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ml, "_empty", nan_empty)
    for fuse in (True, False):
        case = make_case(45, 36, 28, [16, 8, 8], "empty_segments", torch.float32, seed=5)
        check_all(case, run(case, "triton", fuse_shrink=fuse), torch.float32)


@pytest.mark.parametrize("host_counts", [True, False])
def test_segments_invariants(host_counts):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 5, (200,), generator=g)
    ids[ids == 3] = 1                                         # adapter 3 empty
    seg = ml.make_segments(ids.to(DEVICE), 5, host_counts=host_counts)
    assert (seg.counts is None) == (not host_counts)
    seg = seg.with_counts()
    assert torch.equal(seg.perm.cpu(), torch.sort(ids, stable=True).indices)
    assert seg.n_base == int((ids == -1).sum()) and seg.counts == tuple(int((ids == a).sum()) for a in range(5))
    assert seg.offsets.tolist() == torch.tensor([seg.n_base, *seg.counts]).cumsum(0).tolist()
    sorted_ids = ids[seg.perm.cpu()]
    for bm, tiles in seg.tiles.items():
        assert tiles.shape == (200 // bm + 6, 3), "the table's size depends on T and N only"
        covered = torch.zeros(200, dtype=torch.int64)
        real = [row for row in tiles.tolist() if row[1] > row[0]]
        assert tiles.tolist()[len(real):] == [[0, 0, -1]] * (tiles.shape[0] - len(real)), "padding rows last"
        for i, (start, end, adapter) in enumerate(real):
            assert 0 < end - start <= bm
            assert (sorted_ids[start:end] == adapter).all(), f"BLOCK_M={bm}: tile {i} straddles adapters"
            covered[start:end] += 1
        adapters = [row[2] for row in real]
        assert adapters == sorted(adapters), "base tiles first, then adapters in order"
        assert (covered == 1).all(), f"BLOCK_M={bm}: positions not covered exactly once"


def test_make_segments_does_not_sync():
    """The device tables are computed without reading any value back to the host: on the meta device (no data at
    all) any .item(), .tolist(), bool(tensor) or nonzero would raise, and the tables' shapes are still known."""
    T, N = 77, 4
    seg = ml.make_segments(torch.empty(T, dtype=torch.int64, device="meta"), N, host_counts=False)
    assert seg.perm.shape == (T,) and seg.offsets.shape == (N + 1,) and seg.counts is None
    assert all(t.shape == (T // bm + N + 1, 3) and t.is_meta for bm, t in seg.tiles.items())
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check is real: a sync on meta raises
        seg.with_counts()


def test_segments_empty_batch_and_no_adapters():
    seg = ml.make_segments(torch.zeros(0, dtype=torch.int64), 3)
    assert seg.n_tokens == 0 and seg.counts == (0, 0, 0)
    assert all(t.tolist() == [[0, 0, -1]] * 4 for t in seg.tiles.values())
    seg = ml.make_segments(torch.full((4,), -1), 0)
    assert seg.n_base == 4 and seg.counts == ()


@pytest.mark.parametrize("ids, n", [([0, 3, 1], 3), ([0, -2], 3), ([0.0, 1.0], 3)])
def test_make_segments_rejects_bad_ids(ids, n):
    with pytest.raises(ValueError, match="adapter_ids"):
        ml.make_segments(torch.tensor(ids), n)


def _bad(case, **changes):
    return {**case, **changes}


BAD = {  # name: (change to a valid case, word the error must name)
    "x_width": (lambda c: _bad(c, x=c["x"][:, :-1]), "x"),
    "x_tokens": (lambda c: _bad(c, x=c["x"][:-1]), "tokens"),
    "weight_dim": (lambda c: _bad(c, weight=c["weight"][0]), "weight"),
    "weight_dtype": (lambda c: _bad(c, weight=c["weight"].double()), "weight"),
    "weight_device": (lambda c: _bad(c, weight=c["weight"].to("meta")), "weight"),
    "bias_shape": (lambda c: _bad(c, bias=c["bias"][:-1]), "bias"),
    "lora_a_shape": (lambda c: _bad(c, lora_a=c["lora_a"][:1]), "lora_a"),
    "lora_b_rank": (lambda c: _bad(c, lora_b=c["lora_b"][..., :-1]), "lora_b"),
    "scales_dtype": (lambda c: _bad(c, scales=c["scales"].double()), "scales"),
    "rank_too_big": (lambda c: _bad(c, lora_a=torch.zeros(2, 129, 16), lora_b=torch.zeros(2, 12, 129)), "lora_a"),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(BAD))
def test_rejects_bad_inputs(name, backend):
    change, word = BAD[name]
    c = change(make_case(6, 16, 12, [8, 4], "random", torch.float32, seed=1))
    seg = ml.make_segments(c["ids"], 2)
    with pytest.raises(ValueError, match=word):
        ml.multi_lora(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scales"], seg, backend=backend)


def test_rejects_bad_backend_and_trainable_weight():
    c = make_case(6, 16, 12, [8, 4], "random", torch.float32, seed=1)
    seg = ml.make_segments(c["ids"], 2)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scales"], seg)
    with pytest.raises(ValueError, match="backend"):
        ml.multi_lora(*args, backend="cuda")
    with pytest.raises(ValueError, match="block_m"):
        ml.multi_lora(*args, backend="triton", block_m=48)
    with pytest.raises(ValueError, match="frozen"):
        ml.multi_lora(c["x"], c["weight"].clone().requires_grad_(), *args[2:], backend="triton")


def test_strided_bias_and_scales():
    """bias and scales given as strided views (every other element of a longer tensor) give the same result as
    contiguous copies: the op makes them contiguous before the kernels, which read them with unit stride."""
    case = make_case(21, 24, 20, [8, 16, 8], "random", torch.float32, seed=11)
    bias2 = torch.stack([case["bias"], torch.full_like(case["bias"], 1e3)], dim=1)     # [out, 2]
    scales2 = torch.stack([case["scales"], torch.full_like(case["scales"], -7.0)], dim=1)
    strided = dict(case, bias=bias2[:, 0], scales=scales2[:, 0])
    assert not strided["bias"].is_contiguous() and not strided["scales"].is_contiguous()
    check_all(case, run(strided, "triton"), torch.float32)
    with torch.no_grad():                                     # the decode kernel reads them too
        seg = ml.make_segments(case["ids"], 3)
        y = ml.multi_lora(case["x"], case["weight"], strided["bias"], case["lora_a"], case["lora_b"],
                          strided["scales"], seg, backend="triton", decode=True)
    assert_close("y (decode)", y, reference(case)[0], torch.float32)


def test_triton_path_with_device_only_segments():
    """Segments made without host counts (what CUDA gets by default) drive the Triton forward and backward."""
    case = make_case(40, 32, 28, [8, 16, 8], "empty_segments", torch.float32, seed=4)
    x, A, B = (case[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b"))
    seg = ml.make_segments(case["ids"], 3, host_counts=False)
    assert seg.counts is None
    y = ml.multi_lora(x, case["weight"], case["bias"], A, B, case["scales"], seg, backend="triton")
    y.backward(case["dy"])
    check_all(case, (y.detach(), x.grad, A.grad, B.grad), torch.float32)


DECODE_CASES = ["T1", "odd_5x123x77", "empty_segments", "all_base", "ranks_8_16_32_64"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", DECODE_CASES)
def test_decode_kernel_matches_reference(name, dtype, monkeypatch):
    """The few-token forward (_decode_kernel: one row tile over all tokens in their own order, every adapter's shrink
    at once, each token keeping its own block) against the float64 oracle; output buffers poisoned with NaN."""
    monkeypatch.setattr(ml, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    T, n_in, n_out, ranks, pattern, bias = CASES[name]
    T = min(T, ml.DECODE_MAX_T)
    case = make_case(T, n_in, n_out, ranks, pattern, dtype, bias, seed=2)
    seg = ml.make_segments(case["ids"], len(ranks), host_counts=False)
    with torch.no_grad():
        y = ml.multi_lora(case["x"], case["weight"], case["bias"], case["lora_a"], case["lora_b"], case["scales"], seg,
                          backend="triton")                   # decode is the default here: no grad, T <= 64
    assert_close("y", y, reference(case)[0], dtype)


def test_decode_is_forward_only():
    case = make_case(6, 16, 12, [8, 4], "random", torch.float32, seed=1)
    seg = ml.make_segments(case["ids"], 2)
    with pytest.raises(ValueError, match="decode"):
        ml.multi_lora(case["x"].requires_grad_(), case["weight"], case["bias"], case["lora_a"], case["lora_b"],
                      case["scales"], seg, backend="triton", decode=True)


class _Block(torch.nn.Module):
    """Two LoRA projections with an activation between, as a decoder block uses them."""

    def __init__(self, case, backend):
        super().__init__()
        self.case, self.backend = case, backend
        self.A = torch.nn.Parameter(case["lora_a"].clone())
        self.B = torch.nn.Parameter(case["lora_b"].clone())

    def forward(self, x, seg):
        c = self.case
        h = ml.multi_lora(x, c["weight"], c["bias"], self.A, self.B, c["scales"], seg, backend=self.backend)
        h = torch.nn.functional.silu(h[:, : x.shape[1]])
        return ml.multi_lora(h, c["weight"], c["bias"], self.A, self.B, c["scales"], seg, backend=self.backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_compile_traces_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces a module using the op (the Triton path as registered custom ops with fake
    impls and autograd; the torch path natively), forward and backward, and matches eager; dynamo counts 0 breaks."""
    import torch._dynamo
    torch._dynamo.reset()
    case = make_case(24, 32, 32, [8, 16], "random", torch.float32, seed=9)
    seg = ml.make_segments(case["ids"], 2, host_counts=backend == "torch")   # the torch path reads host counts
    model = _Block(case, backend)
    explain = torch._dynamo.explain(model)(case["x"], seg)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outs = []
    for f in (model, compiled):
        x = case["x"].clone().requires_grad_()
        y = f(x, seg)
        y.backward(case["dy"][:, :32])
        outs.append([y.detach(), x.grad, model.A.grad.clone(), model.B.grad.clone()])
        model.A.grad = model.B.grad = None
    for name, a, b in zip(("y", "dx", "dA", "dB"), *outs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name
    if backend == "triton":
        with torch.no_grad():                                 # the decode op traces too
            y = torch.compile(model, backend="aot_eager", fullgraph=True)(case["x"][:16].contiguous(),
                                                                          ml.make_segments(case["ids"][:16], 2,
                                                                                           host_counts=False))
        assert y.shape == (16, 32)


@pytest.mark.parametrize("split", [2, 8])
def test_split_k_shrink(split, monkeypatch):
    """The separate shrink with its K loop cut into parts (partial sums added in the GEMM's epilogue; 8 parts of
    4 K tiles leaves parts empty), forward and backward, poisoned buffers: same as the oracle."""
    monkeypatch.setattr(ml, "_pick_split", lambda n_tiles, k, device: split)
    monkeypatch.setattr(ml, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    case = make_case(50, 100, 104, [8, 16, 4], "random", torch.float32, seed=split)
    check_all(case, run(case, "triton", fuse_shrink=False, block_m=16), torch.float32)


def test_pick_split():
    cpu = torch.device("cpu")                                 # 4 "SMs" off CUDA
    assert [ml._pick_split(n, 3584, cpu) for n in (1, 2, 4)] == [4, 2, 1]   # tiles x parts <= SMs
    assert ml._pick_split(1, 600, cpu) == 2 and ml._pick_split(1, 500, cpu) == 1   # parts keep >= 256 columns


@pytest.mark.parametrize("chunks", [3, 8])
def test_segment_outer_token_chunks(chunks, monkeypatch):
    """dA / dB with every adapter's segment cut into token chunks (partial sums added by the launcher; 8 chunks of a
    few tokens leave chunks empty), on a skewed sorted mix and a random one; poisoned buffers."""
    monkeypatch.setattr(ml, "_pick_chunks", lambda n_tokens, n_adapters, n_blocks, device: chunks)
    monkeypatch.setattr(ml, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))
    for pattern in ("skewed_sorted", "random"):
        case = make_case(61, 40, 36, [8, 16], pattern, torch.float32, seed=chunks)
        check_all(case, run(case, "triton"), torch.float32)


def test_pick_chunks():
    cpu = torch.device("cpu")                                 # 4 "SMs" off CUDA
    assert ml._pick_chunks(8192, 4, 1, cpu) == 4 and ml._pick_chunks(8192, 4, 4, cpu) == 1
    assert ml._pick_chunks(1000, 4, 1, cpu) == 1              # < 2 x 256 tokens per adapter: one chunk


def test_autotune_setting_is_read_at_launch(monkeypatch):
    """MCL_AUTOTUNE=0 keeps each kernel to its first config; read when a launch prunes, not at import."""
    import kernels.multi_lora as ml
    configs = ["a", "b", "c"]
    monkeypatch.delenv("MCL_AUTOTUNE", raising=False)
    assert ml._prune_first(configs, {}) == configs
    assert ml._prune_gemm(configs, {}, BLOCK_M=16) == ml._GEMM_DECODE
    monkeypatch.setenv("MCL_AUTOTUNE", "0")
    assert ml._prune_first(configs, {}) == ["a"]
    assert ml._prune_gemm(configs, {}, BLOCK_M=128) == ml._GEMM_WIDE[:1]
