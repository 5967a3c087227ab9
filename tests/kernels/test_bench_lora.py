"""`mcl bench lora --quick --json --out DIR` on CPU: runs the torch paths on tiny shapes and emits the JSON the GPU run
will (device, versions, one row per op x T x mix x pass with every timing field), as the last stdout line and as
DIR/lora_<device>.json with the command inside. Timings are never asserted on.

    python -m pytest tests/kernels/test_bench_lora.py -q
"""
import argparse
import json

import torch

from kernels import bench
from kernels import multi_lora as ml

ROW_KEYS = {"op", "in", "out", "T", "mix", "pass", "base_ms", "ours_ms", "peft_loop_ms", "gather_bmm_ms",
            "unfused_ms", "ours_alt_ms", "ours_vs_base", "peft_loop_vs_ours", "rel_err", "block_m", "fuse_shrink"}


def test_cpu_quick_bench_json(tmp_path, capsys):
    args = argparse.Namespace(json=True, out=str(tmp_path), device="cpu", quick=True, model=None)
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"device", "torch", "triton", "rows", "goals", "command", "notes", "complete"} <= set(result)
    assert result["device"].startswith("cpu") and result["complete"] and result["goals"] == []
    assert any("not timed on CPU" in n for n in result["notes"])
    rows = result["rows"]
    assert len(rows) == 4 * 1 * 2 * 2                         # ops x T x mixes x passes
    assert {r["op"] for r in rows} == {"q_proj", "k_proj", "gate_proj", "down_proj"}
    assert {(r["mix"], r["pass"]) for r in rows} == {(m, p) for m in ("even", "skewed") for p in ("fwd", "fwd+bwd")}
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


def test_goals_summary():
    rows = [{"pass": "fwd", "T": 8192, "ours_vs_base": 1.02, "peft_loop_vs_ours": 3.0},
            {"pass": "fwd", "T": 8192, "ours_vs_base": 1.30, "peft_loop_vs_ours": 3.0},
            {"pass": "fwd+bwd", "T": 64, "ours_vs_base": 1.5, "peft_loop_vs_ours": 1.5}]
    goals = {g["goal"]: g for g in bench._goals(rows)}
    fwd = goals["fwd, T=8192: ours within 1.05x of base cuBLAS"]
    assert (fwd["rows"], fwd["met"], fwd["worst"]) == (2, 1, 1.30)
    peft = goals["fwd+bwd: ours >= 2x faster than the PEFT loop"]
    assert (peft["rows"], peft["met"], peft["worst"]) == (1, 0, 1.5)


def test_gpu_methods_agree_under_the_interpreter():
    """The methods the GPU run times (Triton ours / ours_alt / unfused included) compute the same y and grads as the
    PEFT loop; run once each here under the Triton interpreter on a tiny fp32 shape."""
    g = torch.Generator().manual_seed(0)
    T, n_in, n_out, R = 24, 32, 40, 8
    x, dy = torch.randn(T, n_in, generator=g), torch.randn(T, n_out, generator=g)
    W, b = torch.randn(n_out, n_in, generator=g) / 6, torch.randn(n_out, generator=g)
    A, B = torch.randn(4, R, n_in, generator=g) / 6, torch.randn(4, n_out, R, generator=g) / 3
    s = torch.tensor([2.0, 0.5, -1.0, 1.5])
    ids = bench._adapter_ids(T, "skewed", g)
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
