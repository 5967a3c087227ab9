"""`mcl bench lora --quick --json --out DIR` on CPU: runs the torch paths on tiny shapes and emits the JSON the GPU run
will (device, versions, ceilings, one row per op x T x mix x pass with every timing and roofline field, block totals),
as the last stdout line and as DIR/lora_<device>.json with the command inside. Timings are never asserted on. The
bench's Triton methods (ours, ours_alt, unfused) are checked for agreement on the device (the interpreter on CPU).

    python -m pytest tests/kernels/test_bench_lora.py -q
"""
import argparse
import json
import subprocess
import sys

import torch

from kernels import bench
from kernels import multi_lora as ml

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ROW_KEYS = {"op", "in", "out", "T", "mix", "pass", "base_ms", "ours_ms", "peft_loop_ms", "gather_bmm_ms",
            "unfused_ms", "ours_alt_ms", "ours_vs_base", "peft_loop_vs_ours", "rel_err", "block_m", "fuse_shrink",
            "decode_kernel", "flops", "bytes", "base_tflops", "ours_tflops", "base_gbs", "ours_gbs", "roof_ms",
            "ours_of_roof", "base_of_roof"}


def test_cpu_quick_bench_json(tmp_path, capsys):
    args = argparse.Namespace(json=True, out=str(tmp_path), device="cpu", quick=True, model=None)
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"device", "torch", "triton", "rows", "block", "goals", "command", "notes", "complete", "ceilings",
            "autotune"} <= set(result)
    assert result["ceilings"]["copy_gbs"] > 0 and result["ceilings"]["gemm_tflops"] > 0
    assert result["device"].startswith("cpu") and result["complete"] and result["goals"] == []
    assert any("not timed on CPU" in n for n in result["notes"])
    rows = result["rows"]
    assert len(rows) == 4 * 1 * 3 * 2                         # ops x T x mixes x passes
    assert {r["op"] for r in rows} == {"q_proj", "k_proj", "gate_proj", "down_proj"}
    assert {(r["mix"], r["pass"]) for r in rows} == {(m, p) for m in bench.MIXES for p in ("fwd", "fwd+bwd")}
    assert len(result["block"]) == 3 * 2 and all(b["projections"] == 7 for b in result["block"])
    for r in rows:
        assert set(r) == ROW_KEYS, set(r) ^ ROW_KEYS
        for k in ("base_ms", "ours_ms", "peft_loop_ms", "gather_bmm_ms", "ours_vs_base", "peft_loop_vs_ours"):
            assert isinstance(r[k], float) and r[k] > 0, (k, r)
        assert r["unfused_ms"] is None and r["ours_alt_ms"] is None   # Triton paths are not timed on CPU
        assert r["rel_err"] < 1e-5, r                          # ours (torch path) agrees with the PEFT loop
    files = list(tmp_path.glob("lora_cpu*.json"))
    assert len(files) == 1
    written = json.loads(files[0].read_text())
    assert written["rows"] == rows and written["command"] and written["complete"]


def test_goals_and_block_totals():
    rows = [{"op": "q_proj", "pass": "fwd", "T": 8192, "mix": "even", "base_ms": 1.0, "ours_ms": 1.02,
             "peft_loop_ms": 3.0, "flops": 10, "bytes": 5},
            {"op": "k_proj", "pass": "fwd", "T": 8192, "mix": "even", "base_ms": 0.5, "ours_ms": 0.65,
             "peft_loop_ms": 1.0, "flops": 2, "bytes": 1}]
    for r in rows:
        r["ours_vs_base"], r["peft_loop_vs_ours"] = r["ours_ms"] / r["base_ms"], r["peft_loop_ms"] / r["ours_ms"]
    block = bench._block(rows, {"o_proj": "q_proj", "v_proj": "k_proj"})
    assert len(block) == 1 and block[0]["projections"] == 4
    assert block[0]["base_ms"] == 3.0 and block[0]["ours_ms"] == 3.34 and block[0]["ours_vs_base"] == 1.113
    goals = {g["goal"]: g for g in bench._goals(rows, block)}
    fwd = goals["block fwd, T=8192: ours <= 1.05x base cuBLAS"]
    assert (fwd["rows"], fwd["met"], fwd["worst"], fwd["status"]) == (1, 0, 1.113, "missed")
    per = goals["per projection fwd, T=8192: ours <= 1.05x base"]
    assert (per["rows"], per["met"], per["worst"]) == (2, 1, 1.3)
    assert goals["block decode fwd, T=64, 4 adapters: ours <= 1.25x base"]["status"] == "unmeasured"


def test_bench_imports_nothing_of_the_engine():
    code = "import sys, kernels.bench; sys.exit(any(m == 'engine' or m.startswith('engine.') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "kernels/bench.py imports engine"


def test_unfused_expand_into():
    """The bench's unfused baseline (base GEMM, then _shrink, then the expand-only kernel adding into y) is exact;
    the shrink's output buffer starts as NaN (base rows stay unset, LoRA rows are all written)."""
    from test_multi_lora import assert_close, make_case, reference   # tests/kernels is on sys.path under pytest
    case = make_case(29, 40, 36, [8, 16], "random", torch.float32, seed=7)
    seg = ml.make_segments(case["ids"], 2)
    x, A, B = case["x"], case["lora_a"], case["lora_b"]
    mid = ml._shrink(x, A.transpose(1, 2), case["scales"], seg.perm, seg.tiles[16],
                     torch.full((29, 16), float("nan"), device=DEVICE), block_m=16)
    y = torch.nn.functional.linear(x, case["weight"], case["bias"])
    bench._expand_into(y, mid, B.transpose(1, 2), bench.ml.make_segments(case["ids"], 2), block_m=16)
    assert_close("y", y, reference(case)[0], torch.float32)


def test_gpu_methods_agree_under_the_interpreter():
    """The methods the GPU run times (Triton ours / ours_alt / unfused included) compute the same y and grads as the
    PEFT loop; run once each here under the Triton interpreter on a tiny fp32 shape."""
    g = torch.Generator().manual_seed(0)
    T, n_in, n_out, R = 24, 32, 40, 8
    dev = lambda t: t.to(DEVICE)                              # CUDA kernels need CUDA tensors on a GPU machine
    x, dy = dev(torch.randn(T, n_in, generator=g)), dev(torch.randn(T, n_out, generator=g))
    W, b = dev(torch.randn(n_out, n_in, generator=g) / 6), dev(torch.randn(n_out, generator=g))
    A, B = dev(torch.randn(4, R, n_in, generator=g) / 6), dev(torch.randn(4, n_out, R, generator=g) / 3)
    s = dev(torch.tensor([2.0, 0.5, -1.0, 1.5]))
    ids = dev(bench._adapter_ids(T, "skewed", g))
    methods, _ = bench._methods(x, W, b, A, B, s, ids, ml.make_segments(ids, 4), gpu=True)
    results = {}
    assert set(methods) == {"base", "peft_loop", "gather_bmm", "unfused", "ours", "ours_alt"}
    del methods["base"]                                        # no LoRA: nothing to compare
    for name, f in methods.items():
        xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
        y = f(xg, Ag, Bg)
        y.backward(dy)
        results[name] = [y.detach(), xg.grad, Ag.grad, Bg.grad]
    ref = results["peft_loop"]
    for name, got in results.items():
        for what, a, r in zip(("y", "dx", "dA", "dB"), got, ref):
            err = ((a - r).abs().max() / r.abs().max()).item()
            assert err < 1e-5, f"{name} {what}: relative error {err:.2e} against the PEFT loop"
